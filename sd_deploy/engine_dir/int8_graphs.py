"""The int8-weight OpenVINO graph `sd-quantize` writes beside a component, and whether it
still matches the component's ONNX graph.

    <engine dir>/<component>/int8/model.xml    OpenVINO IR: int8 weights, fp32 I/O
    <engine dir>/<component>/int8/model.bin
    <engine dir>/<component>/int8/int8.json    Int8Metadata below

Like a TensorRT plan, the graph is derived from the component's `model.onnx` and only
correct for it: the metadata records the ONNX hash it came from and the IR's own hash, so
the runtime can refuse a stale or swapped graph with the command that remakes it. Pure
Python (json, hashlib): readable by a service that never imports OpenVINO.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sd_deploy.engine_dir.atomic import write_atomic
from sd_deploy.engine_dir.hashing import files_sha256
from sd_deploy.engine_dir.layout import relative
from sd_deploy.engine_dir.manifest import ComponentSpec
from sd_deploy.engine_dir.plans import Fresh, Stale, metadata_object, source_onnx_sha256

INT8_DIR = "int8"
INT8_XML = "model.xml"
INT8_BIN = "model.bin"
INT8_METADATA = "int8.json"
INT8_METADATA_VERSION = 1
# What sd-quantize makes: NNCF's per-channel asymmetric int8 weights, activations untouched.
INT8_WEIGHTS_MODE = "int8-weights"


def int8_dir(engine_dir: str | Path, component: str) -> Path:
    return Path(engine_dir) / component / INT8_DIR


def int8_graph_path(engine_dir: str | Path, component: str) -> Path:
    return int8_dir(engine_dir, component) / INT8_XML


def quantize_command(engine_dir: str | Path, component: str | None = None) -> str:
    """The sd-quantize command line that (re)makes int8 graphs: the fix every stale-graph
    message names."""
    command = f"sd-quantize --engine {engine_dir}"
    return f"{command} --component {component}" if component and component != "unet" else command


def int8_files_sha256(folder: Path) -> str:
    """sha256 over the IR's two files (the hash the metadata keeps)."""
    return files_sha256(folder, [folder / INT8_XML, folder / INT8_BIN])


def int8_files_bytes(folder: Path) -> int:
    return sum((folder / f).stat().st_size for f in (INT8_XML, INT8_BIN))


@dataclass
class Int8Metadata:
    """What an int8 graph came from and how it was made."""

    component: str
    onnx_sha256: str  # the component's graph it was made from (manifest `onnx_sha256`)
    ir_sha256: str  # of model.xml + model.bin (int8_files_sha256)
    ir_bytes: int  # their total size: catches a truncated or swapped file cheaply
    mode: str
    kept_full_precision: list[str] = field(default_factory=list)  # layers left unquantized
    openvino_version: str = ""
    nncf_version: str = ""
    seconds: float = 0.0
    made_at: str = ""
    sd_deploy_version: str = ""
    metadata_version: int = INT8_METADATA_VERSION

    @staticmethod
    def from_json(data: Any) -> Int8Metadata:
        """Parse; raises ValueError naming the first missing or malformed field."""
        data = metadata_object(data, INT8_METADATA_VERSION)
        for name in ("component", "onnx_sha256", "ir_sha256", "mode"):
            if not isinstance(data.get(name), str):
                raise ValueError(f"field {name!r} is missing or not a string")
        if not isinstance(data.get("ir_bytes"), int):
            raise ValueError("field 'ir_bytes' is missing or not an integer")
        kept = data.get("kept_full_precision", [])
        if not isinstance(kept, list) or not all(isinstance(k, str) for k in kept):
            raise ValueError("field 'kept_full_precision' is not a list of names")
        if not isinstance(data.get("seconds", 0.0), int | float):
            raise ValueError("field 'seconds' is not a number")
        known = set(Int8Metadata.__dataclass_fields__)
        return Int8Metadata(**{k: v for k, v in data.items() if k in known})


def write_int8_metadata(folder: Path, metadata: Int8Metadata) -> None:
    write_atomic(folder / INT8_METADATA, json.dumps(asdict(metadata), indent=2) + "\n")


def int8_status(
    engine_dir: str | Path, spec: ComponentSpec, verify: bool = False
) -> Fresh[Int8Metadata] | Stale:
    """Whether `spec`'s int8 graph can be used (Fresh, with the metadata) or why not (Stale).

    A truncated or swapped file is caught by its size; `verify` also re-hashes the files
    (seconds for the SD 1.5 UNet's 0.8 GB: sd-quantize does, loading does not)."""
    folder = int8_dir(engine_dir, spec.name)
    name = relative(folder, engine_dir)
    missing = [f for f in (INT8_XML, INT8_BIN, INT8_METADATA) if not (folder / f).is_file()]
    if len(missing) == 3:
        return Stale(f"no int8 graph at {name}")
    if missing:
        return Stale(f"{name} is incomplete ({', '.join(missing)} missing)")
    try:
        metadata = Int8Metadata.from_json(json.loads((folder / INT8_METADATA).read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        return Stale(f"{name}/{INT8_METADATA} is corrupt: {str(exc).splitlines()[0]}")
    if metadata.component != spec.name:
        return Stale(f"{name} says it is the {metadata.component} graph, not {spec.name}")
    if metadata.onnx_sha256 != source_onnx_sha256(engine_dir, spec):
        return Stale(f"{name} was made from another {spec.name} graph (re-exported since)")
    if int8_files_bytes(folder) != metadata.ir_bytes or (
        verify and int8_files_sha256(folder) != metadata.ir_sha256
    ):
        return Stale(f"{name}'s files do not match their metadata (changed or truncated)")
    return Fresh(metadata)


__all__ = [
    "INT8_DIR",
    "INT8_WEIGHTS_MODE",
    "Int8Metadata",
    "int8_dir",
    "int8_files_bytes",
    "int8_files_sha256",
    "int8_graph_path",
    "int8_status",
    "quantize_command",
    "write_int8_metadata",
]
