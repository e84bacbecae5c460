"""ONNX graph of an engine dir -> an OpenVINO graph with int8 weights (sd-quantize).

Why: OpenVINO runs the fp32 SD 1.5 UNet from a 3.4 GB file and keeps that copy mapped
beside the bf16 weights it computes with. NNCF's int8 weight compression (per output
channel, asymmetric; activations untouched, so no calibration data) makes the graph
0.8 GB and the process's peak smaller, at bf16's speed and bf16's image quality (numbers:
benchmarks/results/openvino-cpu/README.md).

Kept in full precision: the graph's first and last convolutions (the UNet's conv_in and
output conv, 0.1% of its weights). With them in int8 the default model's shape score
dropped 4 points on its held-out prompts; kept, it scores as fp32 does. Full int8
(NNCF's hybrid quantization: int8 activations into the convolutions) ran the UNet 1.4x
faster but dropped colour scores 4-35 points: not offered.

openvino and nncf are imported inside `quantize_components` (extra `quantize`).
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sd_deploy
from sd_deploy.engine_dir import read_manifest
from sd_deploy.engine_dir.atomic import staged_dir
from sd_deploy.engine_dir.int8_graphs import (
    INT8_WEIGHTS_MODE,
    INT8_XML,
    Int8Metadata,
    int8_dir,
    int8_files_bytes,
    int8_files_sha256,
    int8_status,
    write_int8_metadata,
)
from sd_deploy.engine_dir.layout import relative
from sd_deploy.engine_dir.plans import Fresh, source_onnx_sha256
from sd_deploy.errors import EngineDirError, UserError, first_line

DEFAULT_COMPONENTS = ("unet",)


@dataclass
class QuantizeResult:
    component: str
    path: Path
    skipped: bool  # already up to date
    seconds: float
    onnx_bytes: int
    int8_bytes: int


def import_quantizer() -> tuple[Any, Any]:
    """openvino and nncf, or one line saying how to install them."""
    try:
        import nncf
        import openvino
    except ImportError as exc:
        raise UserError(
            f"sd-quantize needs openvino and nncf ({exc.name} is missing): "
            "pip install 'sd-deploy[quantize]'"
        ) from None
    return openvino, nncf


def edge_convolutions(model: Any) -> list[str]:
    """Names of the graph's first and last convolutions in execution order (none for a
    graph without convolutions): the layers kept in full precision."""
    convs = [
        op.get_friendly_name()
        for op in model.get_ordered_ops()
        if op.get_type_name() in ("Convolution", "GroupConvolution")
    ]
    return sorted({convs[0], convs[-1]}) if convs else []


def fold_weight_transposes(model: Any) -> int:
    """Make each MatMul whose weight comes through a Transpose [1, 0] (how sd-export stores
    MatMul weights: `exporter.onnx_export.store_weights_out_in`) take the weight itself with
    transpose_b flipped, in place; returns how many. Why: NNCF compresses only weights that
    feed a MatMul directly, and left these fp32 (the SD 1.5 UNet's int8 graph 1.48 GB, not
    0.81). Exact: the same products."""
    folded = 0
    for op in model.get_ordered_ops():
        transpose = op.input_value(1).get_node() if op.get_type_name() == "MatMul" else None
        if transpose is None or transpose.get_type_name() != "Transpose":
            continue
        weight, perm = (transpose.input_value(i).get_node() for i in (0, 1))
        constants = {weight.get_type_name(), perm.get_type_name()} == {"Constant"}
        if constants and list(perm.get_data()) == [1, 0]:
            op.input(1).replace_source_output(weight.output(0))
            op.set_attribute("transpose_b", not op.get_attributes()["transpose_b"])
            folded += 1
    # The bypassed Transpose nodes go with the last references to them, on return: until
    # then their weights still list them as consumers (NNCF fails on such a graph).
    model.validate_nodes_and_infer_types()
    return folded


def quantize_components(
    engine_dir: str | Path,
    components: Sequence[str] = DEFAULT_COMPONENTS,
    force: bool = False,
) -> list[QuantizeResult]:
    """Write `<component>/int8/` for each component (skipping up-to-date ones unless
    `force`). Every user-fixable problem is one UserError line; an interrupted run leaves
    the previous int8 graph (or none) in place."""
    root = Path(engine_dir)
    manifest = read_manifest(root, require=())
    unknown = [c for c in components if c not in manifest.components]
    if unknown:
        have = ", ".join(manifest.components)
        raise UserError(f"{root} has no {', '.join(unknown)} to quantize (it has {have})")
    results = []
    for name in dict.fromkeys(components):
        spec = manifest.components[name]
        onnx_bytes = sum((root / f).stat().st_size for f in spec.files)
        folder = int8_dir(root, name)
        status = None if force else int8_status(root, spec, verify=True)  # re-hashes the IR
        if isinstance(status, Fresh):
            ir_bytes = status.metadata.ir_bytes
            results.append(QuantizeResult(name, folder, True, 0.0, onnx_bytes, ir_bytes))
            continue
        metadata = _quantize(root, spec.name, root / spec.onnx, source_onnx_sha256(root, spec))
        results.append(
            QuantizeResult(name, folder, False, metadata.seconds, onnx_bytes, metadata.ir_bytes)
        )
    return results


def _quantize(root: Path, component: str, onnx: Path, onnx_sha256: str) -> Int8Metadata:
    ov, nncf = import_quantizer()
    start = time.perf_counter()
    try:
        model = ov.Core().read_model(os.fspath(onnx))
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses for bad graphs
        raise EngineDirError(
            f"cannot read {relative(onnx, root)} with OpenVINO: {first_line(exc)}"
        ) from None
    fold_weight_transposes(model)
    kept = edge_convolutions(model)
    compressed = nncf.compress_weights(
        model,
        mode=nncf.CompressWeightsMode.INT8_ASYM,
        ignored_scope=nncf.IgnoredScope(names=kept) if kept else None,
    )
    folder = int8_dir(root, component)
    with staged_dir(folder) as stage:
        # compress_to_fp16=False: the weights not made int8 (norms, biases, kept layers)
        # stay as exported.
        ov.save_model(compressed, os.fspath(stage / INT8_XML), compress_to_fp16=False)
        metadata = Int8Metadata(
            component=component,
            onnx_sha256=onnx_sha256,
            ir_sha256=int8_files_sha256(stage),
            ir_bytes=int8_files_bytes(stage),
            mode=INT8_WEIGHTS_MODE,
            kept_full_precision=kept,
            openvino_version=ov.__version__.split("-")[0],
            nncf_version=nncf.__version__,
            seconds=round(time.perf_counter() - start, 1),
            made_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            sd_deploy_version=sd_deploy.__version__,
        )
        write_int8_metadata(stage, metadata)
    return metadata


__all__ = [
    "DEFAULT_COMPONENTS",
    "QuantizeResult",
    "edge_convolutions",
    "fold_weight_transposes",
    "quantize_components",
]
