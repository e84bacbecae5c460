"""The PyTorch reference modules behind the runtime's Backend interface.

Running the same `Pipeline` loop on this backend and on an engine backend isolates
exactly what export changed: tokenizer, sampler and guidance code are shared, only
the component executor differs. Used by parity tests and sd-bench.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from sd_deploy.engine_dir.manifest import ComponentSpec
from sd_deploy.exporter.components import component_graphs
from sd_deploy.models import LoadedModels
from sd_deploy.runtime.backends.base import Backend, ComponentSession


class TorchSession(ComponentSession):
    """numpy in, a torch callable (a module or a diffusers forward), numpy out."""

    def __init__(
        self,
        spec: ComponentSpec,
        forward: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__(spec)
        self.forward = forward
        self.device = device
        self.dtype = dtype

    def run(
        self, feeds: Mapping[str, np.ndarray], release_scratch: bool = False
    ) -> dict[str, np.ndarray]:
        args = []
        for spec in self.spec.inputs:
            tensor = torch.from_numpy(np.asarray(feeds[spec.name])).to(self.device)
            if tensor.is_floating_point() and spec.name != "timestep":
                tensor = tensor.to(self.dtype)
            args.append(tensor)
        with torch.inference_mode():
            out = self.forward(*args)
        outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {
            o.name: t.float().cpu().numpy() for o, t in zip(self.spec.outputs, outs, strict=True)
        }


def ieee_fp32_on_cuda() -> None:
    """Make fp32 on CUDA mean fp32: PyTorch lets cuDNN convolutions use TF32 (10-bit
    mantissa) by default, which puts the reference UNet ~1e-3 (rel L2) off the CPU's.
    The global torch.backends.fp32_precision does not reach cuDNN's conv setting
    (measured on PyTorch 2.11), so each operator family is set."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    else:  # PyTorch before the fp32_precision settings
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


class TorchBackend(Backend):
    """Runs `models` (already loaded) for each component of an engine dir."""

    name = "torch"

    def __init__(
        self, models: LoadedModels, device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        self.models = models
        self.device = torch.device(device)
        self.dtype = dtype
        self._graphs = component_graphs(models)
        if self.device.type == "cuda" and dtype == torch.float32:
            ieee_fp32_on_cuda()

    def describe(self) -> str:
        return f"PyTorch {torch.__version__} ({self.device.type}, {str(self.dtype).split('.')[-1]})"

    def open(self, engine_dir: Path, spec: ComponentSpec) -> ComponentSession:
        graph = self._graphs[spec.name]
        module = graph.build(self.models).eval()
        module.to(device=self.device, dtype=self.dtype)
        declared = {t.name for t in spec.inputs}
        if [i.name for i in graph.inputs if i.name not in declared] == ["clip_skip"]:
            # An engine dir exported before Clip skip: its graph always reads the last
            # layer, which is Clip skip 1.
            last_layer = torch.ones(1, dtype=torch.int32, device=self.device)
            return TorchSession(spec, lambda ids: module(ids, last_layer), self.device, self.dtype)
        return TorchSession(spec, module, self.device, self.dtype)
