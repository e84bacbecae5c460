"""Plain-Python checks of the TensorRT backend: may a plan run here, do its I/O match
the manifest, does a request fit its profile, and is the backend ready at all.

No library calls here except through `current_environment`, so all of it is tested
without TensorRT or a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sd_deploy.engine_dir import shapes
from sd_deploy.engine_dir.layout import REQUIRED_COMPONENTS, build_command, plan_path
from sd_deploy.engine_dir.libraries import installed
from sd_deploy.engine_dir.manifest import ComponentSpec, Manifest
from sd_deploy.engine_dir.plans import Stale, plan_status
from sd_deploy.errors import BuildError, RequestError, first_line
from sd_deploy.runtime.backends import tensorrt_cuda

__all__ = ["TensorInfo", "check_feeds", "check_io", "require_fresh_plan", "tensorrt_ready"]


def require_fresh_plan(
    engine_dir: str | Path, spec: ComponentSpec, current: Mapping[str, str]
) -> Any:
    """The plan's PlanMetadata when it may run here, else a BuildError naming the fix."""
    status = plan_status(engine_dir, spec, current)
    if isinstance(status, Stale):
        raise BuildError(
            f"cannot use the {spec.name} TensorRT plan: {status.reason}; rebuild it with "
            f"{build_command(engine_dir, spec.name)}"
        )
    return status.metadata


@dataclass(frozen=True)
class TensorInfo:
    """One engine I/O tensor; inputs carry the profile's min and max shapes."""

    name: str
    is_input: bool
    dtype: np.dtype
    min_shape: tuple[int, ...] = ()
    max_shape: tuple[int, ...] = ()


def check_io(
    spec: ComponentSpec, tensors: Mapping[str, TensorInfo], engine_dir: str | Path
) -> None:
    """The plan's I/O names and dtypes must be the manifest's; else the plan is out of date."""
    fix = f"rebuild it with {build_command(engine_dir, spec.name)}"
    for wanted, is_input in ((spec.inputs, True), (spec.outputs, False)):
        have = sorted(t.name for t in tensors.values() if t.is_input == is_input)
        want = sorted(t.name for t in wanted)
        if have != want:
            kind = "inputs" if is_input else "outputs"
            raise BuildError(
                f"the {spec.name} plan's {kind} {have} are not the manifest's {want}; {fix}"
            )
        for t in wanted:
            if tensors[t.name].dtype != np.dtype(t.dtype):
                raise BuildError(
                    f"the {spec.name} plan's {t.name} is {tensors[t.name].dtype} but the manifest "
                    f"says {t.dtype}; {fix}"
                )


def check_feeds(
    component: str,
    feeds: Mapping[str, np.ndarray],
    inputs: Sequence[TensorInfo],
    engine_dir: str | Path,
) -> dict[str, np.ndarray]:
    """Contiguous arrays of the engine's dtypes, refused (RequestError) outside the profile."""
    arrays: dict[str, np.ndarray] = {}
    for info in inputs:
        if info.name not in feeds:
            raise ValueError(f"{component} needs input {info.name!r}; got {sorted(feeds)}")
        array = np.ascontiguousarray(feeds[info.name], dtype=info.dtype)
        shape = tuple(int(d) for d in array.shape)
        if len(shape) != len(info.min_shape):
            raise ValueError(
                f"{component} input {info.name} has rank {len(shape)}, the plan expects "
                f"{len(info.min_shape)}"
            )
        if shapes.shape_outside(shape, info.min_shape, info.max_shape):
            raise RequestError(
                f"{component} input {info.name} shape {list(shape)} is outside the TensorRT plan's "
                f"profile {list(info.min_shape)}..{list(info.max_shape)} (rebuild with "
                f"{build_command(engine_dir, component)} and a wider --batch/--height/--width)"
            )
        arrays[info.name] = array
    return arrays


def tensorrt_ready(
    engine_dir: str | Path, manifest: Manifest, current: Mapping[str, str] | None = None
) -> tuple[bool, str]:
    """Whether the TensorRT backend can run this engine dir's txt2img components here, and
    why not (one line). Never raises: `auto` uses it to choose.

    `current` is this machine's TensorRT version and GPU (`current_environment`); when
    None it is found here, and a missing library or GPU is the reason.
    """
    try:
        missing = [c for c in REQUIRED_COMPONENTS if c not in manifest.components]
        if missing:
            return False, f"{engine_dir} has no {missing[0]} graph to build a TensorRT plan from"
        if current is None:
            if not installed("tensorrt"):
                return False, "the tensorrt library is not installed"
            try:
                current = tensorrt_cuda.current_environment()
            except BuildError as exc:
                return False, str(exc)
        if not any(plan_path(engine_dir, c).is_file() for c in REQUIRED_COMPONENTS):
            return False, f"no TensorRT plans in {engine_dir} (run {build_command(engine_dir)})"
        for component in REQUIRED_COMPONENTS:
            status = plan_status(engine_dir, manifest.components[component], current)
            if isinstance(status, Stale):
                return False, (
                    f"the {component} TensorRT plan is not usable: {status.reason} "
                    f"(run {build_command(engine_dir)})"
                )
        return True, f"TensorRT plans are up to date on {current['gpu_name']}"
    except Exception as exc:  # noqa: BLE001 - readiness is advisory: report, never crash auto
        return False, f"TensorRT could not be checked ({first_line(exc)})"
