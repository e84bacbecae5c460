"""`build_engines`: ONNX graphs of an engine dir -> strongly typed TensorRT plans.

Each component's plan is built through Polygraphy from the graph exactly as it is
typed: `NetworkFromOnnxPath(path, strongly_typed=True)`, so an FP16 graph written by
`sd-export --fp16` gives an FP16 engine. No precision builder flag is set
(`BuilderFlag.FP16` / `CreateConfig(fp16=True)` were deprecated in TensorRT 10.12 and
removed in 11). Up-to-date plans are skipped (see `sd_deploy.engine_dir.plans`);
plans and their metadata are written atomically.

tensorrt and polygraphy are imported inside `build_engines` only (through
`sd_deploy.engine_dir.libraries.import_optional`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sd_deploy
from sd_deploy.engine_dir.atomic import replacing
from sd_deploy.engine_dir.layout import COMPONENTS
from sd_deploy.engine_dir.libraries import import_optional
from sd_deploy.engine_dir.manifest import Manifest, read_manifest
from sd_deploy.engine_dir.plans import (
    Fresh,
    PlanMetadata,
    plan_metadata_path,
    plan_path,
    plan_status,
    relative,
    source_onnx_sha256,
    write_metadata,
)
from sd_deploy.engine_dir.shapes import ProfileShapes, build_ranges, check_within, wanted_profile
from sd_deploy.errors import BuildError, EngineDirError, first_line

DEFAULT_TIMING_CACHE = "tensorrt_timing.cache"

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass
class BuildResult:
    """What happened to one component: built or skipped, why, how long, where."""

    component: str
    status: str  # "built" or "skipped"
    reason: str
    seconds: float
    plan: Path
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        """One line for the CLI: component, built/skipped, time, why, plan path."""
        if self.status == "built":
            return (
                f"{self.component:13s} built in {self.seconds:.1f} s ({self.reason}) -> {self.plan}"
            )
        return f"{self.component:13s} {self.status} ({self.reason}) -> {self.plan}"


def parse_workspace(value: str | int | None) -> int | None:
    """'4G', '512M', '64K', '1.5G' or a byte count -> bytes (binary units); None stays None."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        text = str(value).strip()
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?", text)
        if not match:
            raise BuildError(f"--workspace {value!r} is not a size such as 4G, 512M or 1073741824")
        size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise BuildError(f"--workspace {value!r} must be a positive size")
    return size


def resolve_components(names: Sequence[str], manifest: Manifest, engine_dir: Path) -> list[str]:
    """'all' -> every exported component (manifest order); explicit names must be exported."""
    result: list[str] = []
    for name in names:
        if name == "all":
            wanted = [c for c in COMPONENTS if c in manifest.components]
        elif name not in COMPONENTS:
            raise BuildError(
                f"unknown component {name!r}; choose from {', '.join(COMPONENTS)} or all"
            )
        elif name not in manifest.components:
            raise BuildError(
                f"{engine_dir} has no {name} graph (export it with sd-export --component {name})"
            )
        else:
            wanted = [name]
        result.extend(c for c in wanted if c not in result)
    if not result:
        raise BuildError(f"{engine_dir} has no components to build")
    return result


def import_builder() -> dict[str, Any]:
    """The TensorRT and Polygraphy entry points the build uses, or a one-line BuildError."""
    tensorrt = import_optional("tensorrt", "the tensorrt library")
    backend = import_optional("polygraphy.backend.trt", "polygraphy")
    exception = import_optional("polygraphy.exception", "polygraphy")
    logger = import_optional("polygraphy.logger", "polygraphy")
    CreateConfig = backend.CreateConfig
    NetworkFromOnnxPath = backend.NetworkFromOnnxPath
    Profile = backend.Profile
    engine_from_network = backend.engine_from_network
    save_engine = backend.save_engine
    PolygraphyException = exception.PolygraphyException
    G_LOGGER = logger.G_LOGGER
    return {
        "trt": tensorrt,
        "CreateConfig": CreateConfig,
        "NetworkFromOnnxPath": NetworkFromOnnxPath,
        "Profile": Profile,
        "engine_from_network": engine_from_network,
        "save_engine": save_engine,
        "PolygraphyException": PolygraphyException,
        "G_LOGGER": G_LOGGER,
    }


def build_plan(
    lib: dict[str, Any],
    onnx: Path,
    profile: ProfileShapes,
    destination: Path,
    timing_cache: Path | None,
    optimization_level: int | None,
    workspace: int | None,
    refittable: bool = False,
) -> None:
    """One strongly typed build through Polygraphy, serialized to `destination`.

    refittable: weights can be replaced later by initializer name (`trt.Refitter`), which
    run-time LoRA switching does (`sd_deploy.runtime.lora.refit_engine`)."""
    polygraphy_profile = lib["Profile"]()
    for name, dims in profile.items():
        polygraphy_profile.add(name, min=dims["min"], opt=dims["opt"], max=dims["max"])
    pools = None
    if workspace is not None:
        pools = {lib["trt"].MemoryPoolType.WORKSPACE: workspace}
    logger = lib["G_LOGGER"]
    # Quiet from the config on: CreateConfig itself prints "[I] TF32 is disabled by default"
    # to stdout (seen with the real polygraphy 0.53.6 over the real bindings).
    with logger.verbosity(logger.WARNING):
        config = lib["CreateConfig"](
            profiles=[polygraphy_profile],
            load_timing_cache=(
                str(timing_cache) if timing_cache and timing_cache.is_file() else None
            ),
            builder_optimization_level=optimization_level,
            memory_pool_limits=pools,
            **({"refittable": True} if refittable else {}),
        )
        network = lib["NetworkFromOnnxPath"](str(onnx), strongly_typed=True)
        engine = lib["engine_from_network"](
            network, config=config, save_timing_cache=str(timing_cache) if timing_cache else None
        )
        lib["save_engine"](engine, path=str(destination))


def _say(message: str, progress: bool) -> None:
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)


def build_engines(
    engine_dir: str | Path,
    components: Sequence[str] = ("all",),
    batch: str | None = None,
    height: str | None = None,
    width: str | None = None,
    static: bool = False,
    timing_cache: str | Path | None = None,
    optimization_level: int | None = None,
    workspace: str | int | None = None,
    force: bool = False,
    progress: bool = True,
    refittable: bool = False,
) -> list[BuildResult]:
    """Build (or skip when up to date) a TensorRT plan per component of an engine dir.

    `batch`, `height`, `width` are 'MIN:OPT:MAX' (or 'N') flag texts narrowing the
    exported ranges; `static` builds one shape (the opt values). The timing cache
    defaults to `<engine_dir>/tensorrt_timing.cache` and is updated by every build.
    Warnings (an fp32 graph) are in each result and, with `progress`, shown at once.
    `refittable` builds plans whose weights run-time LoRAs can refit (a fresh plan built
    without it is rebuilt).
    Every user-fixable problem is a one-line BuildError / EngineDirError.
    """
    root = Path(engine_dir)
    manifest = read_manifest(root, require=())
    names = resolve_components(components, manifest, root)
    workspace_bytes = parse_workspace(workspace)
    if optimization_level is not None and (
        isinstance(optimization_level, bool)
        or not isinstance(optimization_level, int)
        or optimization_level < 0
    ):
        raise BuildError(f"--optimization-level {optimization_level!r} must be an integer >= 0")
    scale = manifest.model.vae_scale_factor
    profiles: dict[str, ProfileShapes] = {}
    for name in names:
        spec = manifest.components[name]
        profile = wanted_profile(spec, scale, batch, height, width, static)
        check_within(profile, spec.profile_shapes, f"{name} profile")
        profiles[name] = profile

    lib = import_builder()
    # engines -> runtime.backends, the one allowed edge: a plan's metadata must record the
    # TensorRT version and GPU exactly as the runtime reads them before loading it.
    from sd_deploy.runtime.backends import tensorrt_cuda

    current = tensorrt_cuda.current_environment()
    cache = Path(timing_cache) if timing_cache is not None else root / DEFAULT_TIMING_CACHE
    flags = {
        "optimization_level": optimization_level,
        "workspace_bytes": workspace_bytes,
        "static": static,
        "strongly_typed": True,
        "batch": batch,
        "height": height,
        "width": width,
        "refittable": refittable,
    }

    from tqdm.auto import tqdm

    results: list[BuildResult] = []
    bar = tqdm(names, desc="sd-build", unit="component", disable=not progress, file=sys.stderr)
    for name in bar:
        spec = manifest.components[name]
        plan = plan_path(root, name)
        onnx_sha = source_onnx_sha256(root, spec)
        status = plan_status(root, spec, current, profiles[name], onnx_sha)
        unrefittable = (
            refittable
            and isinstance(status, Fresh)
            and not status.metadata.build_flags.get("refittable")
        )
        if isinstance(status, Fresh) and not force and not unrefittable:
            results.append(
                BuildResult(name, "skipped", f"up to date on {current['gpu_name']}", 0.0, plan)
            )
            continue
        reason = "forced (--force)" if force else getattr(status, "reason", "")
        if unrefittable and not force:
            reason = "the plan is not refittable (--refittable)"
        notes: list[str] = []
        if spec.precision != "fp16":
            notes.append(
                f"{name} graph is {spec.precision}: a strongly typed build keeps it "
                f"{spec.precision} (no FP16 speed-up); re-export with sd-export --fp16 "
                "for FP16 engines"
            )
            _say(f"warning: {notes[-1]}", progress)
        bar.set_description(f"build {name} ({spec.precision})")
        seconds = _build_one(
            lib,
            root,
            name,
            spec.onnx,
            profiles[name],
            plan,
            cache,
            optimization_level,
            workspace_bytes,
            refittable,
        )
        metadata = PlanMetadata(
            component=name,
            tensorrt_version=current["trt_version"],
            gpu_name=current["gpu_name"],
            compute_capability=current["compute_capability"],
            onnx_sha256=onnx_sha,
            precision=spec.precision,
            profile=profiles[name],
            shape_ranges=build_ranges(spec, batch, height, width, static).to_json(),
            plan_bytes=plan.stat().st_size,
            build_flags=flags,
            build_seconds=round(seconds, 3),
            built_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            sd_deploy_version=sd_deploy.__version__,
        )
        try:
            write_metadata(plan_metadata_path(plan), metadata)
        except OSError as exc:
            where = plan_metadata_path(plan)
            raise BuildError(f"cannot write {where}: {exc.strerror or exc}") from None
        bar.set_postfix_str(f"{name} {seconds:.1f}s")
        results.append(BuildResult(name, "built", reason, seconds, plan, notes))
    bar.close()
    return results


def _build_one(
    lib: dict[str, Any],
    root: Path,
    name: str,
    onnx_rel: str,
    profile: ProfileShapes,
    plan: Path,
    cache: Path,
    optimization_level: int | None,
    workspace: int | None,
    refittable: bool = False,
) -> float:
    """Build into a temporary sibling, then swap it in; returns the build seconds.

    The old metadata goes first, so an interruption leaves a plan without metadata,
    which the next run sees as stale, never a new plan described by old metadata.
    """
    onnx = root / onnx_rel
    try:
        plan.parent.mkdir(parents=True, exist_ok=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EngineDirError(f"cannot write into {plan.parent}: {exc.strerror or exc}") from None
    start = time.perf_counter()
    try:
        with replacing(plan) as tmp:
            build_plan(lib, onnx, profile, tmp, cache, optimization_level, workspace, refittable)
            if not tmp.is_file() or tmp.stat().st_size == 0:
                raise BuildError(f"building {name} produced no plan file")
            with contextlib.suppress(FileNotFoundError):
                plan_metadata_path(plan).unlink()
    except lib["PolygraphyException"] as exc:
        raise BuildError(
            f"building {name} from {relative(onnx, root)} failed: {first_line(exc)}"
        ) from None
    except RuntimeError as exc:  # TensorRT's pybind errors
        raise BuildError(
            f"building {name} from {relative(onnx, root)} failed: {first_line(exc)}"
        ) from None
    except TypeError as exc:
        # pybind11's "factory function returned nullptr": libnvinfer could not make a
        # Builder (no usable GPU or TensorRT libraries). Any other TypeError is a bug.
        if "returned nullptr" not in str(exc):
            raise
        raise BuildError(
            f"building {name} from {relative(onnx, root)} failed: TensorRT could not create "
            f"its builder ({first_line(exc)}; is libnvinfer a real TensorRT with a GPU?)"
        ) from None
    except OSError as exc:
        raise BuildError(f"cannot write {plan}: {exc.strerror or exc}") from None
    return time.perf_counter() - start
