"""Types and ranges of manifest.json's fields, checked before anything reads them.

`read_manifest` calls `check_manifest_data` on the parsed JSON, so a damaged or hostile
manifest gets one EngineDirError line naming the field, instead of a TypeError deep in the
pipeline or a scheduler allocating a 10^12-step noise schedule. Fields not listed here are
left to `Manifest.from_json`; every value an older exporter wrote passes (found by fuzzing:
tools/fuzz, target `manifest`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from sd_deploy.errors import EngineDirError

MAX_DIM = 1 << 20  # any size, channel count or range bound
MAX_TIMESTEPS = 100_000  # the noise schedule is an array this long


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return (_int(v) or isinstance(v, float)) and math.isfinite(v)


def _count(hi: int = MAX_DIM) -> Any:
    return lambda v: _int(v) and 1 <= v <= hi, f"an integer in 1..{hi}"


def _index(hi: int = (1 << 31) - 1) -> Any:
    return lambda v: _int(v) and 0 <= v <= hi, f"an integer in 0..{hi}"


STR = (lambda v: isinstance(v, str), "a string")
BOOL = (lambda v: isinstance(v, bool), "true or false")
NUMBER = (_number, "a finite number")
OPT_STR = (lambda v: v is None or isinstance(v, str), "a string or null")
DICT = (lambda v: isinstance(v, dict), "an object")
BETA = (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)")

MODEL = {
    "family": STR,
    "prediction_type": STR,
    "latent_channels": _count(4096),
    "vae_scale_factor": _count(64),
    "scaling_factor": NUMBER,
    "text_embed_dim": _count(),
    "default_height": _count(),
    "default_width": _count(),
    "clip_skip_max": _count(1024),
    "fixed_text_layer": BOOL,
    "pooled_embed_dim": _index(MAX_DIM),
}
TOKENIZER = {
    "path": STR,
    "max_length": (lambda v: _int(v) and 2 <= v <= 1 << 16, "an integer in 2..65536"),
    "bos_token_id": _index(),
    "eos_token_id": _index(),
    "pad_token_id": _index(),
}
SCHEDULER = {
    "num_train_timesteps": _count(MAX_TIMESTEPS),
    "beta_start": BETA,
    "beta_end": BETA,
    "beta_schedule": STR,
    "trained_betas": (
        lambda v: (
            v is None
            or (isinstance(v, list) and len(v) <= MAX_TIMESTEPS and all(_number(b) for b in v))
        ),
        "null or a list of numbers",
    ),  # fmt: skip
    "prediction_type": STR,
    "timestep_spacing": STR,
    "steps_offset": _index(MAX_TIMESTEPS),
    "clip_sample": BOOL,
    "clip_sample_range": NUMBER,
    "set_alpha_to_one": BOOL,
    "rescale_betas_zero_snr": BOOL,
    "thresholding": BOOL,
    "original_inference_steps": _count(MAX_TIMESTEPS),
    "timestep_scaling": NUMBER,
    "default_sampler": STR,
    "default_steps": _count(MAX_TIMESTEPS),
    "default_guidance": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
}
PROVENANCE = {
    "source": OPT_STR,
    "source_sha256": OPT_STR,
    "loras": (
        lambda v: v is None or (isinstance(v, list) and all(isinstance(x, dict) for x in v)),
        "null or a list of objects",
    ),
}
TENSOR = {"name": STR, "dtype": STR}
COMPONENT = {"onnx": STR, "precision": STR, "onnx_sha256": STR, "validation": DICT}


def _fields(path: Path, where: str, data: Any, schema: Mapping[str, Any]) -> None:
    if not isinstance(data, dict):
        raise EngineDirError(f"{path}: {where} is {_shown(data)}, expected an object")
    for key, (ok, what) in schema.items():
        if key in data and not ok(data[key]):
            raise EngineDirError(f"{path}: {where}.{key} is {_shown(data[key])}, expected {what}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _relative_file(path: Path, where: str, rel: Any) -> None:
    """A path inside the engine dir: relative, no '..' (a manifest must not point outside)."""
    if not isinstance(rel, str) or not rel:
        raise EngineDirError(f"{path}: {where} is {_shown(rel)}, expected a relative path")
    parts = PurePosixPath(rel.replace("\\", "/"))
    if parts.is_absolute() or ".." in parts.parts or "\x00" in rel:
        raise EngineDirError(f"{path}: {where} {rel!r} points outside the engine dir")


def _range(path: Path, where: str, value: Any) -> None:
    if not (
        isinstance(value, list)
        and len(value) == 3
        and all(_int(v) for v in value)
        and 1 <= value[0] <= value[1] <= value[2] <= MAX_DIM
    ):
        raise EngineDirError(
            f"{path}: {where} is {_shown(value)}, expected [min, opt, max] with "
            f"1 <= min <= opt <= max <= {MAX_DIM}"
        )


def _component(path: Path, name: str, comp: Any) -> None:
    where = f"components.{name}"
    _fields(path, where, comp, COMPONENT)
    _relative_file(path, f"{where}.onnx", comp.get("onnx", "x"))
    files = comp.get("files", [])
    if not isinstance(files, list):
        raise EngineDirError(f"{path}: {where}.files is {_shown(files)}, expected a list")
    for rel in files:
        _relative_file(path, f"{where}.files entry", rel)
    for io in ("inputs", "outputs"):
        specs = comp.get(io, [])
        if not isinstance(specs, list):
            raise EngineDirError(f"{path}: {where}.{io} is {_shown(specs)}, expected a list")
        for spec in specs:
            _fields(path, f"{where}.{io} entry", spec, TENSOR)
            shape = spec.get("shape", [])
            if not isinstance(shape, list) or not all(
                isinstance(d, str) or (_int(d) and 0 <= d <= MAX_DIM) for d in shape
            ):
                raise EngineDirError(
                    f"{path}: {where}.{io} {spec.get('name')!r} has shape {_shown(shape)}, "
                    "expected a list of sizes and axis names"
                )
    ranges = comp.get("shape_ranges", {})
    _fields(path, f"{where}.shape_ranges", ranges, {})
    for key, value in ranges.items():
        _range(path, f"{where}.shape_ranges.{key}", value)
    profiles = comp.get("profile_shapes", {})
    _fields(path, f"{where}.profile_shapes", profiles, {})
    for input_name, profile in profiles.items():
        _fields(path, f"{where}.profile_shapes.{input_name}", profile, {})
        for key in ("min", "opt", "max"):
            dims = profile.get(key)
            if not isinstance(dims, list) or not all(_int(d) and 0 <= d <= MAX_DIM for d in dims):
                raise EngineDirError(
                    f"{path}: {where}.profile_shapes.{input_name}.{key} is {_shown(dims)}, "
                    "expected a list of sizes"
                )


def check_manifest_data(data: dict[str, Any], path: Path) -> None:
    """Refuse a manifest whose known fields have the wrong type or an impossible value."""
    _fields(path, "model", data.get("model", {}), MODEL)
    for key in ("tokenizer", "tokenizer_2"):
        if key in data and (key == "tokenizer" or data[key]):
            _fields(path, key, data[key], TOKENIZER)
            _relative_file(path, f"{key}.path", data[key].get("path", "x"))
    _fields(path, "scheduler", data.get("scheduler", {}), SCHEDULER)
    _fields(path, "provenance", data.get("provenance", {}), PROVENANCE)
    conventions = data.get("io_conventions", {})
    _fields(path, "io_conventions", conventions, {})
    components = data.get("components", {})
    _fields(path, "components", components, {})
    for name, comp in components.items():
        _component(path, name, comp)
