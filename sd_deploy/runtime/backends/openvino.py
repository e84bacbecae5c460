"""OpenVINO backend: the engine dir's own `model.onnx` graphs on the CPU, bf16 where the
CPU does bf16 matrix work in hardware.

Why: on the Xeon this project measures on (AMX-BF16, AVX512-BF16), OpenVINO runs our fp32
SD 1.5 UNet graph in bf16 3.7x faster than ONNX Runtime's fp32 CPU path, from the same
file: no new export.

Precision rule (per component, `resolve_precision`): `auto` is bf16 where /proc/cpuinfo
shows `amx_bf16` or `avx512_bf16` and the component is in BF16_COMPONENTS, else fp32;
`fp32` forces f32 everywhere; `bf16` asks for bf16 and is refused on a CPU without bf16
instructions (OpenVINO would emulate it, slower than f32). What each component was compiled
with is read back from OpenVINO and kept in `OpenVinoBackend.precisions`.

Int8 weights (`sd-quantize`): a component with a fresh `<component>/int8/` graph (NNCF
int8 weights, see sd_deploy/engine_dir/int8_graphs.py) runs it under `auto` and `int8`,
computing at the precision the rule above gives (recorded as "int8-bf16" / "int8-fp32");
`int8` refuses to run without the UNet's, `auto` warns about a stale one and runs the ONNX
graph; `fp32` and `bf16` always run the ONNX graphs.

Compiled-model cache: OpenVINO's own (its CACHE_DIR property), kept at
<component>/openvino_cache/<graph hash>-<openvino version>-<precision>/, so a second
`sd-run` imports the compiled model instead of compiling it. The folder is named by the
component's graph hash (manifest `onnx_sha256`, which covers external weights) and the
precision because OpenVINO keys a model compiled from a path by that path, not by its
contents nor its precision hint: a re-export with new weights gets a new folder and the
old one is removed.

Shapes: `static_shapes=True` reshapes the graph to each call's exact input shapes before
compiling (one compiled model per shape kept at a time); False compiles the dynamic graph
once. See STATIC_SHAPES_DEFAULT for what measured faster here.

openvino is imported when a backend is created, never at module import, so
`sd_deploy.runtime` stays light.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sd_deploy.engine_dir.atomic import write_atomic
from sd_deploy.engine_dir.int8_graphs import (
    int8_dir,
    int8_graph_path,
    int8_status,
    quantize_command,
)
from sd_deploy.engine_dir.manifest import ComponentSpec, Manifest
from sd_deploy.engine_dir.plans import Fresh
from sd_deploy.errors import UserError, first_line
from sd_deploy.runtime.backends.base import Backend, ComponentSession
from sd_deploy.runtime.backends.mapped_pages import Mapping as MappedFile
from sd_deploy.runtime.backends.mapped_pages import (
    PageReleaser,
    mappings_under,
    owned_all,
    read_back,
    release,
)
from sd_deploy.runtime.request import PRECISIONS

log = logging.getLogger("sd_deploy")

# CPU flags (as /proc/cpuinfo spells them) that run bf16 matrix math in hardware.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# Components `auto` runs in bf16 on such a CPU. Measured on the shipped default model and
# the SD 1.5 architecture: see benchmarks/results/openvino-cpu/README.md.
BF16_COMPONENTS = frozenset({"text_encoder", "unet", "vae_decoder", "vae_encoder"})
# OpenVINO's element type names for ours.
OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}
FROM_OV_PRECISION = {"f32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}
CACHE_DIR_NAME = "openvino_cache"
TRUSTED_BLOBS = "imported.json"  # in a cache entry: the blobs that compiled or imported
# One compile at a time in the process: the mappings a compile adds under its component's
# folder are then its compiled model's own, which the session may hand back (mapped_pages).
_COMPILING = threading.Lock()
STATIC_SHAPES_DEFAULT = False


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise UserError("openvino is not installed: pip install 'sd-deploy[openvino]'") from None
    return openvino


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The first CPU's instruction-set flags from /proc/cpuinfo (empty where unreadable)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def bf16_hardware(flags: frozenset[str] | None = None) -> str | None:
    """The flag that makes bf16 fast on this CPU (amx_bf16 first), or None."""
    flags = cpu_flags() if flags is None else flags
    return next((f for f in BF16_CPU_FLAGS if f in flags), None)


def resolve_precision(
    requested: str, component: str, flags: frozenset[str] | None = None
) -> tuple[str, str]:
    """The precision `component` computes at for `requested` (auto|fp32|bf16|int8), and why
    (int8 is about weights: its components compute as auto says)."""
    if requested not in PRECISIONS:
        raise UserError(f"unknown precision {requested!r}; choose from {', '.join(PRECISIONS)}")
    hardware = bf16_hardware(flags)
    if requested == "fp32":
        return "fp32", "asked for fp32"
    if requested == "bf16":
        if hardware is None:
            raise UserError(
                "bf16 asked for, but this CPU has no bf16 instructions "
                f"({' or '.join(BF16_CPU_FLAGS)}); use --precision fp32 or auto"
            )
        return "bf16", f"asked for bf16 ({hardware})"
    if hardware is None:
        return "fp32", f"{requested}: the CPU has no bf16 instructions"
    if component not in BF16_COMPONENTS:
        return "fp32", f"{requested}: {component} is kept in fp32"
    return "bf16", f"{requested}: the CPU has {hardware}"


def _blob_stamps(entry: Path) -> dict[str, list[int]]:
    """Each blob's name: [size, mtime_ns]."""
    stamps = {}
    for blob in sorted(entry.glob("*.blob")):
        stat = blob.stat()
        stamps[blob.name] = [stat.st_size, stat.st_mtime_ns]
    return stamps


def _recorded_blobs(entry: Path) -> dict:
    """What trust_blobs recorded in the entry ({} when nothing readable is there)."""
    try:
        recorded = json.loads((entry / TRUSTED_BLOBS).read_text())
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def trusted_blobs(entry: Path) -> frozenset[str]:
    """The compiled-model blobs in a cache entry that OpenVINO compiled or imported before,
    unchanged since (size and mtime, recorded by trust_blobs): they import, so the plugin
    keeps them mapped through the load."""
    try:
        current = _blob_stamps(entry)
    except OSError:
        return frozenset()
    recorded = _recorded_blobs(entry)
    root = entry.resolve()
    return frozenset(
        os.fspath(root / name) for name, stamp in current.items() if recorded.get(name) == stamp
    )


def trust_blobs(entry: Path) -> None:
    """Record the entry's blobs after a compile that wrote or imported them succeeded
    (unless the record already says so)."""
    try:
        stamps = _blob_stamps(entry)
        if stamps and _recorded_blobs(entry) != stamps:
            write_atomic(entry / TRUSTED_BLOBS, json.dumps(stamps))
    except OSError as exc:
        log.debug("cannot record the compiled-model blobs in %s: %s", entry, first_line(exc))


class OpenVinoSession(ComponentSession):
    """One component on OpenVINO: a compiled model (one per input shape when static)."""

    def __init__(
        self,
        spec: ComponentSpec,
        backend: OpenVinoBackend,
        path: Path,
        config: dict[str, Any],
        static_shapes: bool,
    ) -> None:
        super().__init__(spec)
        self.backend = backend
        self.path = path
        self.config = config
        self.static_shapes = static_shapes
        self.output_names = [o.name for o in spec.outputs]
        self.compiled: Any = None
        self.request: Any = None
        self.shapes: tuple[tuple[int, ...], ...] | None = None
        # Whether the last compile was an import from the compiled-model cache.
        self.loaded_from_cache = False
        # The compiled model's mappings of the weights (cache blob or graph) that its first
        # call copies into its own packed buffers: their pages go back as it goes.
        self.unpacked: list[MappedFile] = []
        if not static_shapes:
            self.compile_from(self.path)

    def compile_from(self, model: Any) -> None:
        """Compile, handing back the weight pages the plugin maps under the component's
        folder as it goes (mapped_pages.py). While it compiles, the plugin may unmap what it
        mapped (a graph's weights after compiling them, a blob that fails to import) and
        reuse the addresses, so only MADV_PAGEOUT is used there, but on a cache blob that
        imported before (unchanged since: `trusted_blobs`). What the compiled model itself
        maps, it keeps mapped until it is dropped: those pages go back with MADV_DONTNEED
        after the compile and during the first call (run). A reshaped model (static shapes)
        was read before, so its graph's mapping is someone else's and is left alone."""
        folder = self.path.parent
        entry = self.config.get("CACHE_DIR")
        trusted = trusted_blobs(Path(entry)) if entry else frozenset()
        with _COMPILING:  # so that what gets mapped under the folder meanwhile is this model's
            before = set(mappings_under(folder))

            def added() -> list[MappedFile]:
                return [m for m in mappings_under(folder) if m not in before]

            with PageReleaser(added, owned=lambda m: m.path in trusted):
                compiled = self.backend.compile(model, self.config)
            own = added()
        if entry:
            trust_blobs(Path(entry))
        read_back(m for m in own if m.path not in trusted)
        release(own, owned_all)
        self.set_compiled(compiled)
        self.unpacked = own

    def set_compiled(self, compiled: Any) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.loaded_from_cache = bool(compiled.get_property("LOADED_FROM_CACHE"))

    @property
    def precision(self) -> str:
        """What OpenVINO compiled the component at (fp32 or bf16); None before a compile."""
        if self.compiled is None:
            return ""
        value = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        name = value.to_string() if hasattr(value, "to_string") else str(value)
        return FROM_OV_PRECISION.get(name, name)

    def request_for(self, feeds: Mapping[str, np.ndarray]) -> Any:
        """The infer request for these inputs' shapes (compiling on a new static shape)."""
        if not self.static_shapes:
            return self.request
        shapes = tuple(tuple(feeds[s.name].shape) for s in self.spec.inputs)
        if shapes != self.shapes:
            # One shape at a time: each compiled model holds its own copy of the weights.
            self.request = self.compiled = None
            model = self.backend.read(self.path)
            inputs = zip(self.spec.inputs, shapes, strict=True)
            model.reshape({spec.name: list(shape) for spec, shape in inputs})
            self.compile_from(model)
            self.shapes = shapes
        return self.request

    def run(
        self, feeds: Mapping[str, np.ndarray], release_scratch: bool = False
    ) -> dict[str, np.ndarray]:
        request = self.request_for(feeds)
        unpacked, self.unpacked = self.unpacked, []
        # The first call packs the weights: the pages it has copied go back as it goes.
        releasing = PageReleaser(lambda: unpacked, owner=self.compiled) if unpacked else None
        with releasing or contextlib.nullcontext():
            # share_inputs: the pipeline hands contiguous arrays of the declared dtypes;
            # outputs are copied because the request reuses its buffers on the next call.
            outputs = request.infer(dict(feeds), share_inputs=True)
        result = {name: np.array(outputs[name]) for name in self.output_names}
        if release_scratch:
            self.compiled.release_memory()
        return result

    def close(self) -> None:
        """Drop the compiled model: OpenVINO frees its weights and buffers with it."""
        self.request = self.compiled = None
        self.unpacked = []


class OpenVinoBackend(Backend):
    """Runs the ONNX graphs with OpenVINO on the CPU."""

    name = "openvino"

    def __init__(
        self,
        precision: str = "auto",
        threads: int | None = None,
        cache: bool = True,
        static_shapes: bool | None = None,
        engine_dir: Path | None = None,
        manifest: Manifest | None = None,
    ) -> None:
        """`precision`: auto, fp32 or bf16 (see the module docstring); `threads`: OpenVINO's
        inference threads (None: its default, one per physical core); `cache`: keep compiled
        models in the engine dir; `static_shapes`: None takes STATIC_SHAPES_DEFAULT;
        `engine_dir` and its `manifest`, where known, let describe() say before anything is
        opened whether the UNet will run its int8 graph."""
        if precision not in PRECISIONS:
            raise UserError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
        if threads is not None and threads < 1:
            raise UserError(f"threads must be >= 1, got {threads}")
        self._ov = import_openvino()
        self.version = self._ov.__version__.split("-")[0]
        self.core = self._ov.Core()
        self.requested_precision = precision
        self.threads = threads
        self.cache = cache
        self.static_shapes = STATIC_SHAPES_DEFAULT if static_shapes is None else static_shapes
        # Component name -> (precision, why), filled as components are opened.
        self.precisions: dict[str, tuple[str, str]] = {}
        self.engine_dir, self.manifest = engine_dir, manifest

    def describe(self) -> str:
        chosen = ", ".join(f"{name} {p}" for name, (p, _) in self.precisions.items())
        if not chosen:  # nothing opened yet (sd-run prints this first): the rule's answer
            precision, why = resolve_precision(self.requested_precision, "unet")
            weights = "int8-" if self.will_run_int8_unet() else ""
            chosen = f"{weights}{precision}, {why}"
        shapes = "static" if self.static_shapes else "dynamic"
        details = f"CPU, {shapes} shapes" + (f"; {chosen}" if chosen else "")
        return f"openvino {self.version} ({details})"

    def will_run_int8_unet(self) -> bool:
        """Whether opening the UNet will pick its int8 graph (int8 asked for, or auto with a
        fresh one in the engine dir, when the engine dir is known)."""
        if self.requested_precision == "int8":
            return True
        unet = self.manifest.components.get("unet") if self.manifest else None
        if self.requested_precision != "auto" or unet is None or self.engine_dir is None:
            return False
        return isinstance(int8_status(self.engine_dir, unet), Fresh)

    def compute_precision(self) -> str:
        """For image parameters and reports: the UNet's precision (where the time goes), with
        the others' named where they differ, e.g. "bf16 (vae_decoder fp32)"."""
        main = self.precisions.get("unet", (None, ""))[0]
        main = main or resolve_precision(self.requested_precision, "unet")[0]
        others = [f"{n} {p}" for n, (p, _) in self.precisions.items() if p != main]
        return main + (f" ({', '.join(others)})" if others else "")

    def read(self, path: Path) -> Any:
        try:
            return self.core.read_model(os.fspath(path))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses for bad graphs
            raise UserError(f"cannot load {path} with OpenVINO: {first_line(exc)}") from None

    def compile(self, model: Any, config: dict[str, Any]) -> Any:
        """Compile a model or a graph path for the CPU (through the cache when configured)."""
        try:
            return self.core.compile_model(
                os.fspath(model) if isinstance(model, Path) else model, "CPU", config
            )
        except Exception as exc:
            what = model if isinstance(model, Path) else "the reshaped graph"
            raise UserError(f"cannot compile {what} with OpenVINO: {first_line(exc)}") from None

    def int8_graph(self, engine_dir: Path, spec: ComponentSpec) -> str | None:
        """The int8 graph's hash when `spec` runs its int8 graph (see the module docstring),
        None when it runs the ONNX graph."""
        if self.requested_precision not in ("auto", "int8"):
            return None
        status = int8_status(engine_dir, spec)
        if isinstance(status, Fresh):
            return status.metadata.ir_sha256
        fix = quantize_command(engine_dir, spec.name)
        if self.requested_precision == "int8" and spec.name == "unet":
            raise UserError(f"precision int8: {status.reason}; make it: {fix}")
        if int8_dir(engine_dir, spec.name).exists():  # a graph there, but not a usable one
            log.warning("not using the int8 %s: %s (remake it: %s)", spec.name, status.reason, fix)
        return None

    def cache_dir(
        self, engine_dir: Path, spec: ComponentSpec, precision: str, int8: str | None = None
    ) -> Path | None:
        """This component's cache folder for `precision` (the int8 graph's, in its own
        folder, when `int8` gives its hash), created (older graphs' folders removed); None
        when caching is off or the engine dir is not writable (then every load compiles).
        One folder per precision: OpenVINO's key for a model compiled from a path ignores
        INFERENCE_PRECISION_HINT, and an f32 blob imported under a bf16 hint gave NaN text
        embeddings (measured, OpenVINO 2026.4.1)."""
        if not self.cache:
            return None
        base = int8_dir(engine_dir, spec.name) if int8 else Path(engine_dir) / spec.name
        root = base / CACHE_DIR_NAME
        graph = f"{(int8 or spec.onnx_sha256)[:16] or 'unhashed'}-{self.version}"
        entry = root / f"{graph}-{precision}"
        try:
            entry.mkdir(parents=True, exist_ok=True)
            probe = entry / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            log.warning(
                "not caching OpenVINO's compiled %s (every load compiles it again): %s",
                spec.name,
                first_line(exc),
            )
            return None
        for other in root.iterdir():
            if other.is_dir() and not other.name.startswith(f"{graph}-"):
                shutil.rmtree(other, ignore_errors=True)
        return entry

    def config(
        self, engine_dir: Path, spec: ComponentSpec, precision: str, int8: str | None = None
    ) -> dict[str, Any]:
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": OV_PRECISION[precision],
            "PERFORMANCE_HINT": "LATENCY",
        }
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        cache = self.cache_dir(engine_dir, spec, precision, int8)
        if cache is not None:
            config["CACHE_DIR"] = os.fspath(cache)
        return config

    def open(self, engine_dir: Path, spec: ComponentSpec) -> ComponentSession:
        engine_dir = Path(engine_dir)
        precision, why = resolve_precision(self.requested_precision, spec.name)
        int8 = self.int8_graph(engine_dir, spec)
        path = int8_graph_path(engine_dir, spec.name) if int8 else engine_dir / spec.onnx
        config = self.config(engine_dir, spec, precision, int8)
        session = OpenVinoSession(spec, self, path, config, self.static_shapes)
        # Record what OpenVINO says it compiled, which is what ran (static: compiled on
        # first run, so the request stands until then).
        computed = session.precision or precision
        if int8:
            computed, why = f"int8-{computed}", f"int8 weights (sd-quantize), {why}"
        self.precisions[spec.name] = (computed, why)
        return session


__all__ = [
    "BF16_COMPONENTS",
    "OpenVinoBackend",
    "OpenVinoSession",
    "bf16_hardware",
    "cpu_flags",
    "resolve_precision",
]
