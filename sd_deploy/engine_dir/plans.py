"""The small JSON written beside each TensorRT plan, and whether a plan is still good.

    <engine dir>/<component>/model.plan        the serialized TensorRT engine
    <engine dir>/<component>/model.plan.json   PlanMetadata below

A plan only runs on the TensorRT version and the GPU it was built with, for the
shapes of its optimization profile, and is only correct for the ONNX graph it came
from. The metadata records all four so that `sd-build` can skip up-to-date plans
and the runtime can refuse a plan built elsewhere with a message that says why,
before TensorRT itself fails on it.

Pure Python (json, hashlib): the checks take the running environment as a plain
mapping instead of asking TensorRT, so they are tested without a GPU.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from sd_deploy.engine_dir.atomic import write_atomic
from sd_deploy.engine_dir.hashing import files_sha256
from sd_deploy.engine_dir.layout import plan_metadata_path, plan_path, relative
from sd_deploy.engine_dir.manifest import ComponentSpec
from sd_deploy.engine_dir.shapes import ProfileShapes, profile_difference

METADATA_VERSION = 1
M = TypeVar("M")


def metadata_object(data: Any, version: int) -> dict[str, Any]:
    """Parsed JSON as a metadata object of `version` (a plan's or an int8 graph's), or a
    ValueError saying what it is instead."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    found = data.get("metadata_version")
    if found != version:
        raise ValueError(f"metadata_version {found!r}, this sd-deploy reads {version}")
    return data


def source_onnx_sha256(engine_dir: str | Path, spec: ComponentSpec) -> str:
    """The manifest's hash of the component's graph files (model.onnx and its external
    weights), recomputed when it has none."""
    root = Path(engine_dir)
    return spec.onnx_sha256 or files_sha256(root, [root / f for f in spec.files])


@dataclass
class PlanMetadata:
    """Everything a plan depends on, plus how and when it was built."""

    component: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    onnx_sha256: str
    precision: str  # of the source graph: "fp16" or "fp32" (strongly typed: the plan's too)
    profile: ProfileShapes
    shape_ranges: dict[str, list[int]]  # image-level batch/height/width the profile came from
    plan_bytes: int  # size of model.plan, catches a truncated or swapped file cheaply
    build_flags: dict[str, Any] = field(default_factory=dict)
    build_seconds: float = 0.0
    built_at: str = ""
    sd_deploy_version: str = ""
    metadata_version: int = METADATA_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: Any) -> PlanMetadata:
        """Parse; raises ValueError naming the first missing or malformed field."""
        data = metadata_object(data, METADATA_VERSION)
        text_fields = (
            "component",
            "tensorrt_version",
            "gpu_name",
            "compute_capability",
            "onnx_sha256",
            "precision",
        )
        for name in text_fields:
            if not isinstance(data.get(name), str):
                raise ValueError(f"field {name!r} is missing or not a string")
        if not isinstance(data.get("plan_bytes"), int):
            raise ValueError("field 'plan_bytes' is missing or not an integer")
        profile = data.get("profile")
        if not isinstance(profile, dict) or not all(
            isinstance(s, dict) and all(isinstance(s.get(k), list) for k in ("min", "opt", "max"))
            for s in profile.values()
        ):
            raise ValueError("field 'profile' is missing or malformed")
        if not isinstance(data.get("shape_ranges"), dict):
            raise ValueError("field 'shape_ranges' is missing or not an object")
        optional = {
            "build_flags": (dict, "an object"),
            "build_seconds": (int | float, "a number"),
            "built_at": (str, "a string"),
            "sd_deploy_version": (str, "a string"),
        }
        for name, (kind, what) in optional.items():
            if name in data and not isinstance(data[name], kind):
                raise ValueError(f"field {name!r} is not {what}")
        known = set(PlanMetadata.__dataclass_fields__)
        return PlanMetadata(**{k: v for k, v in data.items() if k in known})


def write_metadata(path: Path, metadata: PlanMetadata) -> None:
    """Write atomically, so a reader never sees half a metadata file."""
    write_atomic(path, json.dumps(metadata.to_json(), indent=2) + "\n")


def read_metadata(path: Path) -> PlanMetadata:
    """Read a plan's metadata; raises ValueError (unreadable or malformed) or FileNotFoundError."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"unreadable ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    return PlanMetadata.from_json(data)


@dataclass(frozen=True)
class Fresh(Generic[M]):
    """The derived file (a plan: its ONNX graph, this TensorRT, this GPU and the wanted
    profile; an int8 graph: its ONNX graph) can be used; `metadata` is what it records."""

    metadata: M

    @property
    def fresh(self) -> bool:
        return True


@dataclass(frozen=True)
class Stale:
    """The plan cannot be used as it is; `reason` says why in words (one line)."""

    reason: str

    @property
    def fresh(self) -> bool:
        return False


PlanStatus = Fresh[PlanMetadata] | Stale


def describe_gpu(name: str, compute_capability: str) -> str:
    return f"{name} (compute capability {compute_capability})"


def environment_mismatch(metadata: PlanMetadata, current: Mapping[str, str]) -> str:
    """Why a plan cannot run here (TensorRT version, then GPU), or '' when it can."""
    if metadata.tensorrt_version != current["trt_version"]:
        return (
            f"built with TensorRT {metadata.tensorrt_version} but this is TensorRT "
            f"{current['trt_version']}"
        )
    if (
        metadata.compute_capability != current["compute_capability"]
        or metadata.gpu_name != current["gpu_name"]
    ):
        return (
            f"built on {describe_gpu(metadata.gpu_name, metadata.compute_capability)} but this "
            f"GPU is {describe_gpu(current['gpu_name'], current['compute_capability'])}"
        )
    return ""


def plan_status(
    engine_dir: str | Path,
    spec: ComponentSpec,
    current: Mapping[str, str],
    wanted_profile: ProfileShapes | None = None,
    onnx_sha256: str | None = None,
) -> PlanStatus:
    """Whether `spec`'s plan can be used as it is, checked in the order a user fixes things.

    `current` holds the running machine's trt_version, gpu_name and compute_capability.
    `wanted_profile` None accepts any profile (the runtime checks each request against
    the plan's own profile instead);
    `onnx_sha256` None takes the manifest's hash (or recomputes it).
    """
    plan = plan_path(engine_dir, spec.name)
    meta_file = plan_metadata_path(plan)
    name = relative(plan, engine_dir)
    if not plan.is_file():
        return Stale(f"no plan at {name}")
    try:
        metadata = read_metadata(meta_file)
    except FileNotFoundError:
        return Stale(f"{name} has no metadata ({meta_file.name} is missing)")
    except ValueError as exc:
        return Stale(f"metadata {relative(meta_file, engine_dir)} is corrupt: {exc}")
    if metadata.component != spec.name:
        return Stale(f"{name} says it is the {metadata.component} plan, not {spec.name}")
    size = plan.stat().st_size
    if size != metadata.plan_bytes:
        return Stale(
            f"{name} has {size} bytes but its metadata says {metadata.plan_bytes} "
            "(interrupted or replaced)"
        )
    expected = onnx_sha256 if onnx_sha256 is not None else source_onnx_sha256(engine_dir, spec)
    if metadata.onnx_sha256 != expected:
        return Stale(f"the ONNX graph {spec.onnx} changed since the plan was built")
    mismatch = environment_mismatch(metadata, current)
    if mismatch:
        return Stale(mismatch)
    if wanted_profile is not None:
        difference = profile_difference(metadata.profile, wanted_profile)
        if difference:
            return Stale(f"profile differs: {difference}")
    return Fresh(metadata)
