"""The CUDA side of the TensorRT backend: cuda-python's runtime calls, device buffers,
and what this machine is (TensorRT version, GPU name, compute capability).

cuda-python is imported lazily (`import_cudart`): `cuda.bindings.runtime` (cuda-python
>= 12.6, the only name in 13.x), else the old `cuda.cudart`. Checked against the real
cuda-bindings 13.5 without a GPU (tests/engines/test_tensorrt_api.py): every call and
enum below exists with these argument counts; `cudaStreamNonBlocking` is a module-level
int; `cuda.bindings.utils.get_cuda_native_handle(stream)` gives the stream's address
(and refuses a plain int); with no driver every call returns
`cudaErrorInsufficientDriver` instead of raising.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from sd_deploy.engine_dir.libraries import import_optional
from sd_deploy.errors import BuildError

__all__ = ["CudaRuntime", "DeviceBuffers", "current_environment", "import_cudart"]


def import_tensorrt() -> Any:
    """The tensorrt module, or a one-line BuildError saying why it cannot be used."""
    return import_optional("tensorrt", "the tensorrt library")


def import_cudart() -> Any:
    """cuda-python's CUDA runtime module under either of its names."""
    try:
        return import_optional("cuda.bindings.runtime", "cuda-python")
    except BuildError as exc:
        if "not installed" not in str(exc):
            raise
        try:
            from cuda import cudart  # cuda-python < 12.6 (removed in 13)
        except ImportError:
            raise exc from None
        return cudart


def _native_handle_function() -> Callable[[Any], int] | None:
    try:
        from cuda.bindings.utils import get_cuda_native_handle  # cuda-python >= 12.8
    except ImportError:
        return None
    return get_cuda_native_handle


class CudaRuntime:
    """The handful of CUDA runtime calls the backend makes, via cuda-python.

    Every cuda-python call returns (error, *results); a failure becomes a BuildError
    naming the call and the CUDA error.
    """

    def __init__(self, cudart: Any) -> None:
        self.cudart = cudart
        self.device_error = ""  # why the last device_count() found none, if it failed
        self._native_handle = _native_handle_function()

    def _check(self, call: str, result: Any) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.cudart.cudaError_t.cudaSuccess:
            raise BuildError(f"CUDA {call} failed: {getattr(err, 'name', err)}")
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)

    def device_count(self) -> int:
        """Visible GPUs; 0 (and `device_error` set) when CUDA cannot count them."""
        err, count = self.cudart.cudaGetDeviceCount()
        if err != self.cudart.cudaError_t.cudaSuccess:
            self.device_error = str(getattr(err, "name", err))
            return 0
        self.device_error = ""
        return int(count)

    def device_properties(self) -> tuple[str, str]:
        """Name and compute capability ("major.minor") of the current device."""
        device = self._check("cudaGetDevice", self.cudart.cudaGetDevice())
        props = self._check("cudaGetDeviceProperties", self.cudart.cudaGetDeviceProperties(device))
        name = props.name
        if isinstance(name, bytes | bytearray):
            name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
        return str(name).strip(), f"{props.major}.{props.minor}"

    def malloc(self, nbytes: int) -> int:
        return int(self._check("cudaMalloc", self.cudart.cudaMalloc(max(int(nbytes), 1))))

    def free(self, ptr: int) -> None:
        self._check("cudaFree", self.cudart.cudaFree(ptr))

    def stream_create(self) -> Any:
        # Non-blocking: no implicit sync with the legacy default stream, which also keeps
        # CUDA graph capture on this stream legal.
        flags = self.cudart.cudaStreamNonBlocking
        return self._check(
            "cudaStreamCreateWithFlags", self.cudart.cudaStreamCreateWithFlags(flags)
        )

    def stream_destroy(self, stream: Any) -> None:
        self._check("cudaStreamDestroy", self.cudart.cudaStreamDestroy(stream))

    def handle(self, obj: Any) -> int:
        """The raw address of a stream, as TensorRT's execute_async_v3 takes it."""
        if self._native_handle is not None:
            return int(self._native_handle(obj))
        return int(obj)  # cuda-python without cuda.bindings.utils: int() of the handle

    def copy_to_device(self, ptr: int, array: np.ndarray, stream: Any) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(
            "cudaMemcpyAsync",
            self.cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, stream),
        )

    def copy_to_host(self, array: np.ndarray, ptr: int, stream: Any) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(
            "cudaMemcpyAsync",
            self.cudart.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, stream),
        )

    def synchronize(self, stream: Any) -> None:
        self._check("cudaStreamSynchronize", self.cudart.cudaStreamSynchronize(stream))

    def begin_capture(self, stream: Any) -> None:
        mode = self.cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._check("cudaStreamBeginCapture", self.cudart.cudaStreamBeginCapture(stream, mode))

    def end_capture(self, stream: Any) -> Any:
        return self._check("cudaStreamEndCapture", self.cudart.cudaStreamEndCapture(stream))

    def instantiate(self, graph: Any) -> Any:
        return self._check("cudaGraphInstantiate", self.cudart.cudaGraphInstantiate(graph, 0))

    def graph_destroy(self, graph: Any) -> None:
        self._check("cudaGraphDestroy", self.cudart.cudaGraphDestroy(graph))

    def launch(self, graph_exec: Any, stream: Any) -> None:
        self._check("cudaGraphLaunch", self.cudart.cudaGraphLaunch(graph_exec, stream))

    def graph_exec_destroy(self, graph_exec: Any) -> None:
        self._check("cudaGraphExecDestroy", self.cudart.cudaGraphExecDestroy(graph_exec))


def current_environment(cuda: CudaRuntime | None = None) -> dict[str, str]:
    """TensorRT version, GPU name and compute capability here.

    Raises BuildError when tensorrt or cuda-python is missing or no GPU is visible. The
    builder records the same three values in each plan's metadata, and the runtime
    compares them before loading a plan.
    """
    trt = import_tensorrt()
    cuda = cuda or CudaRuntime(import_cudart())
    if cuda.device_count() < 1:
        why = f"cudaGetDeviceCount: {cuda.device_error}; " if cuda.device_error else ""
        raise BuildError(
            f"no CUDA GPU is visible ({why}check the NVIDIA driver and CUDA_VISIBLE_DEVICES)"
        )
    name, capability = cuda.device_properties()
    return {"trt_version": str(trt.__version__), "gpu_name": name, "compute_capability": capability}


class DeviceBuffers:
    """Device memory per tensor name, reused while it is big enough, grown when not.

    A sampling loop runs the same shapes every step, so after the first step no
    allocation happens at all; a larger request frees and reallocates only the
    tensors that outgrew their buffer.
    """

    def __init__(self, malloc: Callable[[int], int], free: Callable[[int], None]) -> None:
        self._malloc = malloc
        self._free = free
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (pointer, capacity in bytes)

    def ensure(self, name: str, nbytes: int) -> tuple[int, bool]:
        """Pointer with room for `nbytes`, and whether it was (re)allocated just now."""
        current = self._buffers.get(name)
        if current is not None and current[1] >= nbytes:
            return current[0], False
        if current is not None:
            self._free(current[0])
            del self._buffers[name]
        ptr = self._malloc(nbytes)
        self._buffers[name] = (ptr, nbytes)
        return ptr, True

    def pointer(self, name: str) -> int:
        return self._buffers[name][0]

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self._buffers.values())

    def release(self) -> None:
        buffers, self._buffers = self._buffers, {}
        for ptr, _ in buffers.values():
            self._free(ptr)
