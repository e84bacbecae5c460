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
from sd_deploy.runtime.request import PRECISIONS, BackendOptions

BACKEND_NAMES = (
    "auto",
    "tensorrt",
    "onnxruntime",
    "onnxruntime-cpu",
    "onnxruntime-cuda",
    "onnxruntime-trt",
    "openvino",
)
# Precisions only OpenVINO computes in (the others run the graphs as exported).
OPENVINO_PRECISIONS = ("bf16", "int8")


def select_backend(
    name: str, engine_dir: Path, manifest: Manifest, options: BackendOptions | None = None
) -> tuple[Backend, str]:
    """Backend for `name` plus why it was chosen (shown to the user).

    auto: TensorRT when its library, a GPU and up-to-date plans are all present; else
    ONNX Runtime with CUDA if available; else, on a CPU with bf16 instructions (AMX or
    AVX512-BF16), OpenVINO in bf16 when installed; else ONNX Runtime CPU. `options`
    (BackendOptions) go to whichever backend is chosen; precisions bf16 and int8 (the
    int8-weight graphs of sd-quantize) need OpenVINO.
    """
    options = options or BackendOptions()
    threads = options.threads
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise UserError(f"threads must be >= 1, got {threads}")
    check_precision(name, options.precision)
    backend, reason = _select(name, engine_dir, manifest, options)
    if options.precision in OPENVINO_PRECISIONS and backend.name != "openvino":
        raise UserError(
            _needs_openvino(options.precision, backend.name) + f"; auto chose it: {reason}"
        )
    return backend, reason


def check_precision(name: str, precision: str) -> None:
    """Refuse an unknown backend or precision, or a precision that backend `name` cannot
    compute in (bf16 and int8 are OpenVINO's); `auto` is settled when it has chosen."""
    if name not in BACKEND_NAMES:
        raise UserError(f"unknown backend {name!r}; choose from {', '.join(BACKEND_NAMES)}")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision in OPENVINO_PRECISIONS and name not in ("auto", "openvino"):
        raise UserError(_needs_openvino(precision, name))


def _needs_openvino(precision: str, name: str) -> str:
    return f"precision {precision} needs --backend openvino ({name} runs the graphs as exported)"


def _openvino(options: BackendOptions, engine_dir: Path, manifest: Manifest) -> Backend:
    from sd_deploy.runtime.backends.openvino import OpenVinoBackend

    return OpenVinoBackend(
        options.precision,
        threads=options.threads,
        cache=options.graph_cache,
        engine_dir=Path(engine_dir),
        manifest=manifest,
    )


def _select(
    name: str, engine_dir: Path, manifest: Manifest, options: BackendOptions
) -> tuple[Backend, str]:
    threads, graph_cache = options.threads, options.graph_cache
    if name == "openvino":
        return _openvino(options, engine_dir, manifest), "requested --backend openvino"
    if name == "tensorrt":
        from sd_deploy.runtime.backends.tensorrt import TensorRTBackend

        return (
            TensorRTBackend(engine_dir, manifest, cuda_graph=options.cuda_graph),
            "requested --backend tensorrt",
        )
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

        return (
            TensorRTBackend(engine_dir, manifest, cuda_graph=options.cuda_graph),
            f"auto: {trt_reason}",
        )
    has_ort = importlib.util.find_spec("onnxruntime") is not None
    has_openvino = importlib.util.find_spec("openvino") is not None
    cuda = False
    if has_ort:
        from sd_deploy.runtime.backends.onnxruntime import available_providers

        cuda = "CUDAExecutionProvider" in available_providers()
    if not cuda and has_openvino:
        from sd_deploy.runtime.backends.openvino import bf16_hardware

        bf16 = bf16_hardware()
        if (bf16 and options.precision != "fp32") or options.precision == "int8" or not has_ort:
            why = (
                "precision int8 asked for"
                if options.precision == "int8"
                else f"the CPU has {bf16}"
                if bf16
                else "onnxruntime is not installed"
            )
            reason = f"auto: OpenVINO on the CPU because {trt_reason}, {why}"
            return _openvino(options, engine_dir, manifest), reason
    if not has_ort:
        raise UserError(
            f"no usable backend: {trt_reason}, and neither onnxruntime nor openvino is "
            "installed (pip install 'sd-deploy[ort]' or 'sd-deploy[openvino]')"
        )
    from sd_deploy.runtime.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend("auto", threads=threads, graph_cache=graph_cache)
    return backend, f"auto: ONNX Runtime {backend.provider.upper()} because {trt_reason}"


__all__ = [
    "BACKEND_NAMES",
    "PRECISIONS",
    "Backend",
    "ComponentSession",
    "check_precision",
    "select_backend",
    "tensorrt_ready",
]
