"""Run-time LoRA switching on an engine dir exported with `sd-export --lora-ready`.

Each LoRA-ready component (unet, text_encoder) has `lora_targets.json` (written by the
exporter): which ONNX initializer holds each LoRA-targetable weight, transposed or not,
its dtype, and where its bytes lie in `model.onnx_data`. Applying a set of LoRAs:

1. read the files (numpy, `engine_dir.lora`) and match every layer onto a target, with the
   same one-line errors as a merge at export;
2. for the touched initializers only: base (memory-mapped, read-only) + the summed deltas,
   computed in float32 and cast to the initializer's dtype;
3. the backend makes sessions from those arrays: ONNX Runtime a new session per component
   with the arrays as overriding initializers, TensorRT a refit by initializer name.

The files on disk never change, and no LoRA means the base sessions, untouched: switching
back gives the base outputs bit for bit, not base + delta - delta.

`LoraSessionCache` keeps the patched session sets of the last few LoRA sets (LRU), so
alternating between two styles costs one switch each, not one per request.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sd_deploy.engine_dir.lora import (
    LORA_COMPONENTS,
    LORA_TARGETS_NAME,
    LoraError,
    LoraFile,
    LoraSpec,
    ResolvedLayer,
    TargetTable,
    addnet_hash,
    parse_lora_arg,
    parse_scale,
    read_lora,
    resolve,
)
from sd_deploy.runtime.weight_patch import WeightPatch, stored_arrays

# Patched session sets kept loaded at once, besides the base sessions. Each holds new
# sessions of the patched components: a LoRA over every SD 1.5 layer costs ~5 GiB on the
# CPU (fp32, measured: docs/lora.md), so one by default; raise `Pipeline.lora.cache.max_sets`
# to alternate between sets without reloading.
DEFAULT_MAX_LORA_SETS = 1

LoraSetKey = tuple[tuple[str, float], ...]  # ((file sha256, scale), ...) in request order


@dataclass(frozen=True)
class AppliedLoraInfo:
    """One LoRA in effect for a generation: for the PNG parameters and results."""

    name: str
    scale: float
    sha256: str
    short_hash: str  # A1111's "Lora hashes" value: the safetensors data hash, 12 hex digits


class ComponentTargets:
    """One component's `lora_targets.json` and read-only access to its base weights."""

    def __init__(self, engine_dir: Path, component: str, data: Mapping[str, Any]) -> None:
        self.engine_dir = Path(engine_dir)
        self.component = component
        self.targets: dict[str, dict[str, Any]] = dict(data["targets"])
        self.unmapped = set(data.get("unmapped", ()))
        self.unused = set(data.get("unused", ()))  # weights the graph never reads
        self.data = data
        self._maps: dict[str, np.memmap] = {}

    @classmethod
    def load(cls, engine_dir: Path, component: str) -> ComponentTargets | None:
        path = Path(engine_dir) / component / LORA_TARGETS_NAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("schema") != 1 or data.get("component") != component:
                raise ValueError("unknown schema")
        except (OSError, ValueError, AttributeError) as exc:
            raise LoraError(f"{path} cannot be read ({exc}); re-export with --lora-ready") from None
        return cls(engine_dir, component, data)

    def add_to(self, table: TargetTable) -> None:
        table.aliases[self.component] = dict(self.data["aliases"])
        table.shapes[self.component] = {t: tuple(s) for t, s in self.data["shapes"].items()}
        table.context_dim = table.context_dim or self.data.get("context_dim")
        table.text_width = table.text_width or self.data.get("text_width")

    def base(self, target: str) -> np.ndarray:
        """The exported initializer of `target`, as stored (a read-only memmap view)."""
        return self._read(self.targets[target])

    def initializer(self, name: str) -> np.ndarray | None:
        """Any exported initializer by name (base values), None if not recorded."""
        record = self.data.get("initializers", {}).get(name)
        return None if record is None else self._read(record)

    def _read(self, record: Mapping[str, Any]) -> np.ndarray:
        file = record["file"]
        if file not in self._maps:
            self._maps[file] = np.memmap(self.engine_dir / self.component / file, mode="r")
        raw = self._maps[file][record["offset"] : record["offset"] + record["length"]]
        return raw.view(np.dtype(record["dtype"])).reshape(record["shape"])

    def patch(self, target: str, layers: Sequence[ResolvedLayer]) -> tuple[str, WeightPatch]:
        """(initializer name, its patch by `layers`), computed when a backend asks for it."""
        record = self.targets[target]
        pairs = [(r.layer, r.user_scale) for r in layers]
        return record["initializer"], WeightPatch.of(
            self.base(target), bool(record["transpose"]), pairs
        )


class LoraLibrary:
    """Reads LoRA files (cached by path, size and mtime) and turns sets of them into patches."""

    def __init__(self, engine_dir: Path) -> None:
        self.engine_dir = Path(engine_dir)
        self.components: dict[str, ComponentTargets] = {}
        for component in LORA_COMPONENTS:
            targets = ComponentTargets.load(self.engine_dir, component)
            if targets is not None:
                self.components[component] = targets
        self._files: dict[tuple[str, int, int], tuple[LoraFile, str]] = {}

    @property
    def ready(self) -> bool:
        return "unet" in self.components

    def read(self, path: Path) -> tuple[LoraFile, str]:
        path = Path(path)
        try:
            stat = path.stat()
        except OSError:
            raise LoraError(f"LoRA file {path} does not exist") from None
        key = (os.fspath(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._files:
            lora = read_lora(path)
            self._files[key] = (lora, addnet_hash(path)[:12])
        return self._files[key]

    def table(self) -> TargetTable:
        family = next(iter(self.components.values())).data["family"]
        table = TargetTable(family=family)
        for targets in self.components.values():
            targets.add_to(table)
        return table

    def resolve(self, specs: Sequence[LoraSpec]) -> tuple[LoraSetKey, list[ResolvedLayer], list]:
        """Read and match a LoRA set; returns (key, resolved layers, applied infos)."""
        if not self.ready:
            raise LoraError(
                f"{self.engine_dir} was exported without --lora-ready: LoRAs cannot be switched "
                "at run time (re-export with sd-export --lora-ready, or merge them with "
                "sd-export --lora FILE:SCALE)"
            )
        files = [self.read(spec.path) for spec in specs]
        table = self.table()
        resolved = resolve(((f, s.scale) for (f, _), s in zip(files, specs, strict=True)), table)
        # a pair on a weight the graph never reads changes nothing, merged or switched
        resolved = [r for r in resolved if r.target not in self.components[r.component].unused]
        for r in resolved:
            targets = self.components[r.component]
            if r.target not in targets.targets:
                raise LoraError(
                    f"LoRA {r.source}: {r.layer.key} touches {r.component} weight {r.target}, "
                    "which the exported graph does not keep as a separate initializer; merge "
                    "this LoRA at export (sd-export --lora) instead"
                )
        key = tuple((f.sha256, float(s.scale)) for (f, _), s in zip(files, specs, strict=True))
        infos = [
            AppliedLoraInfo(f.name, float(s.scale), f.sha256, short)
            for (f, short), s in zip(files, specs, strict=True)
        ]
        return key, resolved, infos

    def patches(self, resolved: Iterable[ResolvedLayer]) -> dict[str, dict[str, WeightPatch]]:
        """component -> {initializer name: its patch} for the touched initializers."""
        layers: dict[tuple[str, str], list[ResolvedLayer]] = {}
        for r in resolved:
            layers.setdefault((r.component, r.target), []).append(r)
        result: dict[str, dict[str, WeightPatch]] = {}
        for (component, target), group in layers.items():
            name, patch = self.components[component].patch(target, group)
            result.setdefault(component, {})[name] = patch
        return result


class LoraSessionCache:
    """Patched session sets of the last `max_sets` LoRA sets, least recently used evicted."""

    def __init__(self, max_sets: int = DEFAULT_MAX_LORA_SETS) -> None:
        if max_sets < 1:
            raise ValueError("max_sets must be at least 1")
        self.max_sets = max_sets
        self._sets: OrderedDict[LoraSetKey, dict[str, Any]] = OrderedDict()

    def __contains__(self, key: LoraSetKey) -> bool:
        return key in self._sets

    def __len__(self) -> int:
        return len(self._sets)

    def get(self, key: LoraSetKey, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if key in self._sets:
            self._sets.move_to_end(key)
            return self._sets[key]
        while len(self._sets) >= self.max_sets:
            _, evicted = self._sets.popitem(last=False)
            close_all(evicted.values())
        sessions = build()
        self._sets[key] = sessions
        return sessions

    def clear(self) -> None:
        while self._sets:
            _, evicted = self._sets.popitem(last=False)
            close_all(evicted.values())


def close_all(sessions: Iterable[Any]) -> None:
    for session in sessions:
        close = getattr(session, "close", None)
        if close is not None:
            close()


def refit_engine(
    trt: Any,
    engine: Any,
    logger: Any,
    weights: Mapping[str, np.ndarray],
    base: Callable[[str], np.ndarray | None],
    what: str,
) -> None:
    """Refit a refittable TensorRT engine's named weights in place (`trt.Refitter`).

    `weights`: initializer name -> new values (the initializer's dtype and layout). TensorRT
    may ask for more weights than were set (`get_missing_weights`: weights it fused with
    them); those get their base values from `base`. A plan built without `--refittable`,
    or a name the engine does not know, is a BuildError saying how to rebuild.
    """
    from sd_deploy.errors import BuildError

    if not getattr(engine, "refittable", False):
        raise BuildError(
            f"the {what} TensorRT plan is not refittable; rebuild it with sd-build --refittable "
            "to switch LoRAs at run time"
        )
    refitter = trt.Refitter(engine, logger)
    keep: list[Any] = []  # trt.Weights points into these arrays until the refit is done

    def put(name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        keep.append(array)
        if not refitter.set_named_weights(name, trt.Weights(array)):
            raise BuildError(
                f"TensorRT cannot refit {what} weight {name} (not a refittable weight of this "
                "plan); rebuild it with sd-build --refittable"
            )

    for name, array in weights.items():
        put(name, array)
    for name in refitter.get_missing_weights():
        known = base(name)
        if known is None:
            raise BuildError(f"TensorRT needs {what} weight {name} to refit, and it is not known")
        put(name, known)
    if not refitter.refit_cuda_engine():
        raise BuildError(f"TensorRT could not refit the {what} engine")


class RefitState:
    """Which LoRA set a refittable engine holds now, and which initializers differ from base."""

    def __init__(self) -> None:
        self.key: LoraSetKey = ()
        self.touched: set[str] = set()
        self.session: Any = None  # the session whose engine holds that set

    def follow(self, session: Any) -> None:
        """A session loaded anew (keep_loaded=False reloads) holds the base weights."""
        if session is not self.session:
            self.key, self.touched, self.session = (), set(), session

    @property
    def open(self) -> bool:
        return self.session is not None and getattr(self.session, "engine", True) is not None

    def plan(
        self,
        key: LoraSetKey,
        patches: Mapping[str, np.ndarray],
        base: Callable[[str], np.ndarray | None],
    ) -> dict[str, np.ndarray]:
        """The weights to set for moving from the current set to `key`: the new patches,
        and the base values of everything the old set touched that the new one does not."""
        weights = dict(patches)
        for name in self.touched - set(patches):
            array = base(name)
            if array is None:
                raise LoraError(f"base weight {name} is not recorded; re-export with --lora-ready")
            weights[name] = array
        return weights

    def done(self, key: LoraSetKey, touched: Iterable[str]) -> None:
        self.key = key
        self.touched = set(touched)


class PipelineLoras:
    """A Pipeline's run-time LoRAs: the active set, and sessions that carry it.

    ONNX Runtime (a backend with `open_patched`): each LoRA set gets its own unet /
    text_encoder sessions, kept in a `LoraSessionCache`; the base sessions stay as loaded.
    TensorRT (a backend with `refit`): the one engine per component is refit to the set a
    generation asks for (and back to base values when it asks for none).
    """

    def __init__(
        self,
        engine_dir: Path,
        backend: Any,
        spec_of: Callable[[str], Any],
        base_session: Callable[[str], Any],
        max_sets: int = DEFAULT_MAX_LORA_SETS,
        workers: int = 1,
    ) -> None:
        """`spec_of(name)`: the component's ComponentSpec; `base_session(name)`: its base
        session (loaded if needed), which a TensorRT refit updates in place; `workers`:
        weights a refit computes at once."""
        self.engine_dir = Path(engine_dir)
        self.backend = backend
        self.spec_of = spec_of
        self.base_session = base_session
        self.cache = LoraSessionCache(max_sets)
        self._library: LoraLibrary | None = None
        self.key: LoraSetKey = ()
        self._resolved: list[ResolvedLayer] = []
        self._patches: dict[str, dict[str, WeightPatch]] | None = None
        self._refit: dict[str, RefitState] = {}
        self.workers = workers

    @property
    def library(self) -> LoraLibrary:
        if self._library is None:
            self._library = LoraLibrary(self.engine_dir)
        return self._library

    def check(self, specs: Sequence[LoraSpec]) -> tuple[LoraSetKey, list[AppliedLoraInfo]]:
        """Read and match a set now (validation): a bad LoRA fails before any work."""
        if not specs:
            return (), []
        self._check_backend()
        key, _, infos = self.library.resolve(specs)
        return key, infos

    @property
    def supported(self) -> bool:
        """Whether the backend can switch LoRAs at run time (ONNX Runtime, TensorRT)."""
        return hasattr(self.backend, "open_patched") or hasattr(self.backend, "refit")

    def _check_backend(self) -> None:
        if not self.supported:
            raise LoraError(
                f"the {self.backend.name} backend cannot switch LoRAs at run time; use "
                "--backend onnxruntime or tensorrt, or merge them at export (sd-export --lora)"
            )

    def select_pairs(self, pairs: Sequence[tuple[str, float]]) -> list[AppliedLoraInfo]:
        """`select` from a ResolvedRequest's (file, scale) pairs."""
        return self.select([LoraSpec(Path(path), scale) for path, scale in pairs])

    def select(self, specs: Sequence[LoraSpec]) -> list[AppliedLoraInfo]:
        """Make `specs` the set the next component runs use."""
        if not specs:
            self.key, self._resolved, self._patches = (), [], None
            self._restore_refits()
            return []
        key, resolved, infos = self.library.resolve(specs)
        if key != self.key:
            self.key, self._resolved, self._patches = key, resolved, None
        self._check_backend()
        if not hasattr(self.backend, "open_patched"):
            self._apply_refits()
        return infos

    def _patches_now(self) -> dict[str, dict[str, WeightPatch]]:
        if self._patches is None:
            self._patches = self.library.patches(self._resolved)
        return self._patches

    def session(self, name: str) -> Any | None:
        """The session carrying the active set for `name`, or None: use the base session."""
        if not self.key or name not in LORA_COMPONENTS or not hasattr(self.backend, "open_patched"):
            return None
        if self.key in self.cache:
            sessions = self.cache.get(self.key, dict)
        else:
            patches = self._patches_now()
            sessions = self.cache.get(self.key, lambda: {"_patches": patches})
        if name not in sessions:
            patches = sessions["_patches"].get(name)
            if patches is None:
                return None  # the set does not touch this component
            sessions[name] = self.backend.open_patched(self.engine_dir, self.spec_of(name), patches)
        return sessions[name]

    def release(self, name: str) -> None:
        """Free `name`'s patched session of the active set (keep_loaded=False)."""
        if self.key in self.cache:
            sessions = self.cache.get(self.key, dict)
            session = sessions.pop(name, None)
            if session is not None:
                session.close()

    def _apply_refits(self) -> None:
        patches = self._patches_now()
        for name in LORA_COMPONENTS:
            targets = self.library.components.get(name)
            if targets is None:
                continue
            state = self._refit.setdefault(name, RefitState())
            wanted = patches.get(name, {})
            session = self.base_session(name)
            state.follow(session)
            if state.key == self.key and state.touched == set(wanted):
                continue
            weights = state.plan(self.key, stored_arrays(wanted, self.workers), targets.initializer)
            self.backend.refit(session, weights, targets.initializer)
            state.done(self.key, wanted)

    def _restore_refits(self) -> None:
        for name, state in self._refit.items():
            if state.touched and state.open:  # a closed engine is reloaded with base weights
                targets = self.library.components[name]
                weights = state.plan((), {}, targets.initializer)
                self.backend.refit(state.session, weights, targets.initializer)
            state.done((), {})

    def close(self) -> None:
        self.cache.clear()


# A1111's extra-network tag for LoRAs: <lora:name> or <lora:name:scale>.
_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?>")


def extract_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its `<lora:name:scale>` tags (as A1111 strips them before the text
    encoder), and the tags' (name, scale) in order; a scale that is not a number is a
    one-line LoraError."""
    tags = []
    for m in _LORA_TAG.finditer(prompt):
        name = m[1].strip()
        scale = 1.0 if not m[2] or not m[2].strip() else parse_scale(m[2].strip(), f"<lora:{name}>")
        tags.append((name, scale))
    text = _LORA_TAG.sub("", prompt)
    return re.sub(r"[ \t]{2,}", " ", text).strip() if tags else prompt, tags


def _spec(item: Any) -> LoraSpec:
    if isinstance(item, LoraSpec):
        return item
    if isinstance(item, str | Path):
        return parse_lora_arg(os.fspath(item))
    try:
        path, scale = item
    except (TypeError, ValueError):
        raise LoraError(f"a LoRA is FILE[:SCALE] or (file, scale), got {item!r}") from None
    if isinstance(scale, str):
        return LoraSpec(Path(path), parse_scale(scale, str(path)))
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not np.isfinite(scale):
        raise LoraError(f"LoRA scale {scale!r} for {path} is not a number")
    return LoraSpec(Path(path), float(scale))


def resolve_request_loras(
    loras: Sequence[Any],
    tags: Sequence[tuple[str, float]],
    lora_dirs: Sequence[Path],
    merged: Sequence[Mapping[str, Any]] = (),
) -> list[LoraSpec]:
    """A request's run-time LoRAs: its `loras`, then its prompt tags found as
    `<dir>/<name>.safetensors`. A tag naming a LoRA merged at export (at the same scale)
    or already in `loras` (same scale) adds nothing: weights are never applied twice."""
    specs = [_spec(item) for item in loras]
    for name, scale in tags:
        done = [m for m in merged if m.get("name") == name]
        if done:
            if float(done[0].get("scale", 1.0)) != scale:
                raise LoraError(
                    f"<lora:{name}:{scale:g}>: {name} is merged into this engine dir at "
                    f"{float(done[0]['scale']):g}; re-export to change it"
                )
            continue
        given = [s for s in specs if s.name == name]
        if given:
            if given[0].scale != scale:
                raise LoraError(
                    f"<lora:{name}:{scale:g}> disagrees with the LoRA {given[0].path} at "
                    f"{given[0].scale:g} in the same request"
                )
            continue
        for folder in lora_dirs:
            path = Path(folder) / f"{name}.safetensors"
            if path.is_file():
                specs.append(LoraSpec(path, scale))
                break
        else:
            where = ", ".join(str(d) for d in lora_dirs) or "no LoRA folder"
            raise LoraError(
                f"<lora:{name}:{scale:g}> in the prompt: no {name}.safetensors in {where} "
                "(sd-run --lora-dir DIR, or Pipeline.lora_dirs)"
            )
    return specs
