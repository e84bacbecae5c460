"""Backends and the choice between them.

`select_backend` turns a user's `--backend` into a Backend and a one-line reason,
importing only the library the choice needs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sd_deploy.engine_dir.manifest import Manifest
from sd_deploy.errors import UserError
from sd_deploy.runtime.backends.base import Backend, ComponentSession
from sd_deploy.runtime.backends.tensorrt_checks import tensorrt_ready
from sd_deploy.runtime.request import BackendOptions

BACKEND_NAMES = (
    "auto",
    "tensorrt",
    "onnxruntime",
    "onnxruntime-cpu",
    "onnxruntime-cuda",
    "onnxruntime-trt",
)


def select_backend(
    name: str, engine_dir: Path, manifest: Manifest, options: BackendOptions | None = None
) -> tuple[Backend, str]:
    """Backend for `name` plus why it was chosen (shown to the user).

    auto: TensorRT when its library, a GPU and up-to-date plans are all present; else
    ONNX Runtime with CUDA if available, else CPU. `options` (BackendOptions) go to
    whichever backend is chosen.
    """
    options = options or BackendOptions()
    threads, graph_cache = options.threads, options.graph_cache
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise UserError(f"threads must be >= 1, got {threads}")
    if name not in BACKEND_NAMES:
        raise UserError(f"unknown backend {name!r}; choose from {', '.join(BACKEND_NAMES)}")
    if name == "tensorrt":
        from sd_deploy.runtime.backends.tensorrt import TensorRTBackend

        backend = TensorRTBackend(engine_dir, manifest, cuda_graph=options.cuda_graph)
        return backend, "requested --backend tensorrt"
    if name.startswith("onnxruntime"):
        from sd_deploy.runtime.backends.onnxruntime import OnnxRuntimeBackend

        provider = {"onnxruntime": "auto", "onnxruntime-trt": "tensorrt"}.get(
            name, name.removeprefix("onnxruntime-")
        )
        backend = OnnxRuntimeBackend(provider, threads=threads, graph_cache=graph_cache)
        return backend, f"requested --backend {name}"

    trt_ok, trt_reason = tensorrt_ready(engine_dir, manifest)
    if trt_ok:
        from sd_deploy.runtime.backends.tensorrt import TensorRTBackend

        backend = TensorRTBackend(engine_dir, manifest, cuda_graph=options.cuda_graph)
        return backend, f"auto: {trt_reason}"
    if importlib.util.find_spec("onnxruntime") is None:
        raise UserError(
            f"no usable backend: {trt_reason}, and onnxruntime is not installed "
            "(pip install 'sd-deploy[ort]')"
        )
    from sd_deploy.runtime.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend("auto", threads=threads, graph_cache=graph_cache)
    return backend, f"auto: ONNX Runtime {backend.provider.upper()} because {trt_reason}"


__all__ = ["BACKEND_NAMES", "Backend", "ComponentSession", "select_backend", "tensorrt_ready"]
