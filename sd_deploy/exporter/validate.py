"""Validation that is part of every export: checker, shape inference, ORT vs PyTorch.

The reference is always the fp32 PyTorch module; an fp16 graph is judged against it
too, so the number in the manifest is the error a user actually gets.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sd_deploy.errors import ExportError, first_line
from sd_deploy.exporter.components import ComponentGraph, sample_inputs
from sd_deploy.metrics import max_abs_error, relative_l2

# fp32: ORT and PyTorch differ only in kernel summation order (~1e-6 on these models).
# fp16: 10-bit mantissa gives ~5e-4 per op; accumulated through the UNet ~1e-3..5e-3.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


def check_graph(path: Path) -> None:
    """onnx.checker plus strict shape inference; works past 2 GB by going through paths."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=False)
        with tempfile.TemporaryDirectory() as tmp:
            onnx.shape_inference.infer_shapes_path(
                str(path), str(Path(tmp) / "inferred.onnx"), strict_mode=True
            )
    except Exception as exc:  # onnx raises several unrelated types here
        raise ExportError(f"{path}: ONNX check failed: {first_line(exc)}") from None


def ort_session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # fp16-on-CPU cast insertion warnings are expected
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def reference_outputs(
    reference: nn.Module, graph: ComponentGraph, inputs: dict[str, np.ndarray]
) -> list[np.ndarray]:
    """The fp32 module's outputs for one sample input (fp16 inputs cast up)."""
    with torch.no_grad():
        torch_inputs = [torch.from_numpy(inputs[i.name]) for i in graph.inputs]
        torch_inputs = [t.float() if t.is_floating_point() else t for t in torch_inputs]
        expected = reference(*torch_inputs)
    if isinstance(expected, torch.Tensor):
        expected = (expected,)
    return [want.float().numpy() for want in expected]


def compare(
    session: Any,
    graph: ComponentGraph,
    shapes: dict[str, list[int]],
    inputs: dict[str, np.ndarray],
    expected: list[np.ndarray],
) -> dict[str, Any]:
    """Run one sample input through ORT; errors per output against the reference's."""
    outputs = session.run(None, inputs)
    case: dict[str, Any] = {"input_shapes": shapes, "outputs": {}}
    for (name, _), got, want in zip(graph.outputs, outputs, expected, strict=True):
        got = np.asarray(got, dtype=np.float32)
        case["outputs"][name] = {
            "rel_l2": relative_l2(got, want),
            "max_abs": max_abs_error(got, want),
            "finite": bool(np.isfinite(got).all()),
        }
    return case


def validate_component(
    path: Path,
    reference: nn.Module,
    graph: ComponentGraph,
    shape_cases: list[dict[str, list[int]]],
    precision: str,
    seed: int = 0,
    parked: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
) -> dict[str, Any]:
    """Check the graph, run every shape case, raise ExportError if out of tolerance.

    The reference's outputs come first; ONNX Runtime runs inside `parked()`, which may take
    the module's weights out of memory meanwhile (the full-size SDXL UNet: 10.3 GB that
    would otherwise sit beside the session's own copy)."""
    check_graph(path)
    fp16 = precision == "fp16"
    inputs = [sample_inputs(graph, shapes, fp16, seed + i) for i, shapes in enumerate(shape_cases)]
    expected = [reference_outputs(reference, graph, x) for x in inputs]
    with parked():
        session = ort_session(path)
        cases = [
            compare(session, graph, *case)
            for case in zip(shape_cases, inputs, expected, strict=True)
        ]
        del session
    tolerance = TOLERANCE[precision]
    worst = max(o["rel_l2"] for c in cases for o in c["outputs"].values())
    result = {
        "validated": True,
        "reference": "PyTorch fp32 module",
        "runtime": "onnxruntime CPUExecutionProvider",
        "tolerance_rel_l2": tolerance,
        "max_rel_l2": worst,
        "cases": cases,
    }
    for case in cases:
        for name, out in case["outputs"].items():
            if not out["finite"]:
                raise ExportError(
                    f"{graph.name} ({precision}) output {name} has NaN/Inf at input shapes "
                    f"{case['input_shapes']}"
                )
    if not worst <= tolerance:
        raise ExportError(
            f"{graph.name} ({precision}) differs from PyTorch: relative L2 {worst:.3g} > "
            f"{tolerance:g} (use --no-validate to keep it anyway)"
        )
    return result
