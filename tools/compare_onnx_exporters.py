"""Export one UNet with both torch.onnx exporters and compare time, size and accuracy.

    python tools/compare_onnx_exporters.py tiny      # or sd15 (minutes, ~12 GB RAM)

Evidence for the exporter choice in docs/exporter.md.
"""

from __future__ import annotations

import collections
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from sd_deploy.exporter.components import UNetGraph
from sd_deploy.models import build_random, get_preset

NAMES = ["sample", "timestep", "encoder_hidden_states"]


def export_torchscript(graph: torch.nn.Module, args: tuple, path: Path) -> None:
    axes = {
        "sample": {0: "b", 2: "h", 3: "w"},
        "timestep": {0: "b"},
        "encoder_hidden_states": {0: "b"},
        "model_output": {0: "b", 2: "h", 3: "w"},
    }
    torch.onnx.export(
        graph,
        args,
        str(path),
        input_names=NAMES,
        output_names=["model_output"],
        opset_version=17,
        dynamo=False,
        dynamic_axes=axes,
    )


def export_dynamo(graph: torch.nn.Module, args: tuple, path: Path) -> None:
    b = torch.export.Dim("b", min=1, max=16)
    h = torch.export.Dim("h", min=2, max=128)
    w = torch.export.Dim("w", min=2, max=128)
    shapes = {"sample": {0: b, 2: h, 3: w}, "timestep": {0: b}, "encoder_hidden_states": {0: b}}
    program = torch.onnx.export(
        graph,
        args,
        dynamo=True,
        input_names=NAMES,
        output_names=["model_output"],
        opset_version=18,
        dynamic_shapes=shapes,
    )
    program.save(str(path))


def main(preset: str) -> None:
    warnings.simplefilter("ignore")
    models = build_random(get_preset(preset))
    graph = UNetGraph(models).eval()
    dim = models.config.text_encoder.hidden_size
    args = (torch.randn(2, 4, 8, 8), torch.tensor([10.0, 20.0]), torch.randn(2, 77, dim))
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((3, 4, 12, 10), dtype=np.float32),
        "timestep": np.array([1, 500, 999], np.float32),
        "encoder_hidden_states": rng.standard_normal((3, 77, dim), dtype=np.float32),
    }
    with torch.no_grad():
        want = graph(*[torch.from_numpy(v) for v in feeds.values()]).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        for name, export in (("torchscript", export_torchscript), ("dynamo", export_dynamo)):
            path = Path(tmp) / f"{name}.onnx"
            start = time.perf_counter()
            try:
                export(graph, args, path)
            except Exception as exc:  # noqa: BLE001 - report whatever the exporter raised
                print(f"{name}: failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")
                continue
            seconds = time.perf_counter() - start
            model = onnx.load(str(path))
            ops = collections.Counter(n.op_type for n in model.graph.node)
            got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
                None, feeds
            )[0]
            err = np.linalg.norm(got - want) / np.linalg.norm(want)
            print(
                f"{name}: {seconds:.1f} s, {len(model.graph.node)} nodes "
                f"{ops.most_common(4)}, rel L2 at an unseen shape {err:.2e}"
            )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny")
