"""One TensorRT plan at run time: an execution context, a CUDA stream, device buffers
reused across sampling steps, and optional CUDA graph replay.

The TensorRT calls here (`ICudaEngine.num_io_tensors`, `get_tensor_name`,
`get_tensor_mode`, `get_tensor_dtype`, `get_tensor_profile_shape`,
`create_execution_context`; `IExecutionContext.set_input_shape`, `get_tensor_shape`,
`set_tensor_address`, `execute_async_v3`; `TensorIOMode.INPUT`, `nptype`) are checked
against the real TensorRT 11 bindings and the lean runtime by
tests/engines/test_tensorrt_api.py.

Thread safety: a session owns one execution context, one stream and its buffers;
use it from one thread at a time (one pipeline per thread).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sd_deploy.engine_dir.manifest import ComponentSpec
from sd_deploy.errors import BuildError
from sd_deploy.runtime.backends.base import ComponentSession
from sd_deploy.runtime.backends.tensorrt_checks import TensorInfo, check_feeds, check_io
from sd_deploy.runtime.backends.tensorrt_cuda import CudaRuntime, DeviceBuffers

__all__ = ["TensorRTSession", "engine_tensors"]

log = logging.getLogger("sd_deploy")


def engine_tensors(engine: Any, trt: Any) -> dict[str, TensorInfo]:
    """Names, directions, dtypes and profile-0 bounds of an engine's I/O tensors."""
    result: dict[str, TensorInfo] = {}
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
        if is_input:
            low, _, high = engine.get_tensor_profile_shape(name, 0)
            result[name] = TensorInfo(name, True, dtype, tuple(low), tuple(high))
        else:
            result[name] = TensorInfo(name, False, dtype)
    return result


class TensorRTSession(ComponentSession):
    """One plan: an execution context, a stream, and device buffers reused across steps.

    With `cuda_graph`, the first run at a new set of shapes runs normally and then
    records the enqueue into a CUDA graph; later runs at the same shapes replay it.
    Buffers stay put while shapes repeat, which is what makes the replay valid.
    """

    def __init__(
        self,
        spec: ComponentSpec,
        engine: Any,
        trt: Any,
        cuda: CudaRuntime,
        engine_dir: str | Path,
        cuda_graph: bool = False,
        runtime: Any = None,
    ) -> None:
        super().__init__(spec)
        self._runtime = runtime  # TensorRT wants the runtime to outlive its engines
        self.engine_dir = Path(engine_dir)
        self.cuda = cuda
        self.engine = engine
        tensors = engine_tensors(engine, trt)
        check_io(spec, tensors, engine_dir)
        self.inputs = [tensors[t.name] for t in spec.inputs]
        self.outputs = [tensors[t.name] for t in spec.outputs]
        self.context = engine.create_execution_context()
        if not self.context:
            raise BuildError(
                f"TensorRT could not create a {spec.name} execution context (GPU memory?)"
            )
        self.stream = cuda.stream_create()
        self.buffers = DeviceBuffers(cuda.malloc, cuda.free)
        self.cuda_graph = cuda_graph
        self.graph_error = ""  # why capture was given up, if it was
        self._graph_exec: Any = None
        self._shape_key: tuple[tuple[int, ...], ...] | None = None
        self._output_shapes: dict[str, tuple[int, ...]] = {}
        self._closed = False

    def run(
        self, feeds: Mapping[str, np.ndarray], release_scratch: bool = False
    ) -> dict[str, np.ndarray]:
        """`release_scratch` is ignored: the device buffers are sized once per shape."""
        if self._closed:
            raise RuntimeError(f"the {self.spec.name} session is closed")
        arrays = check_feeds(self.spec.name, feeds, self.inputs, self.engine_dir)
        key = tuple(arrays[t.name].shape for t in self.inputs)
        if key != self._shape_key:
            self._bind(arrays, key)
        for info in self.inputs:
            self.cuda.copy_to_device(
                self.buffers.pointer(info.name), arrays[info.name], self.stream
            )
        self._enqueue()
        results = {
            info.name: np.empty(self._output_shapes[info.name], dtype=info.dtype)
            for info in self.outputs
        }
        for name, array in results.items():
            self.cuda.copy_to_host(array, self.buffers.pointer(name), self.stream)
        self.cuda.synchronize(self.stream)
        if self.cuda_graph and self._graph_exec is None and not self.graph_error:
            self._capture()
        return results

    def _bind(self, arrays: Mapping[str, np.ndarray], key: tuple[tuple[int, ...], ...]) -> None:
        """New shapes: tell the context, size the buffers, point the context at them."""
        self._drop_graph()
        for info in self.inputs:
            shape = arrays[info.name].shape
            if not self.context.set_input_shape(info.name, shape):
                raise RuntimeError(f"TensorRT refused {self.spec.name} {info.name} shape {shape}")
        for info in self.outputs:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(info.name))
            if any(d < 0 for d in shape):
                raise RuntimeError(
                    f"{self.spec.name} output {info.name} has no static shape {shape}"
                )
            self._output_shapes[info.name] = shape
        for info in self.inputs:
            self._point(info.name, arrays[info.name].nbytes)
        for info in self.outputs:
            nbytes = (
                int(np.prod(self._output_shapes[info.name], dtype=np.int64)) * info.dtype.itemsize
            )
            self._point(info.name, nbytes)
        self._shape_key = key

    def _point(self, name: str, nbytes: int) -> None:
        ptr, _ = self.buffers.ensure(name, nbytes)
        if not self.context.set_tensor_address(name, ptr):
            raise RuntimeError(f"TensorRT refused the address of {self.spec.name} {name}")

    def _enqueue(self) -> None:
        if self._graph_exec is not None:
            self.cuda.launch(self._graph_exec, self.stream)
            return
        if not self.context.execute_async_v3(self.cuda.handle(self.stream)):
            raise BuildError(
                f"TensorRT failed to run the {self.spec.name} plan (see the TensorRT log above)"
            )

    def _capture(self) -> None:
        """Record one enqueue at the current shapes and addresses into a CUDA graph."""
        graph = None
        try:
            self.cuda.begin_capture(self.stream)
            try:
                ok = self.context.execute_async_v3(self.cuda.handle(self.stream))
            finally:
                graph = self.cuda.end_capture(self.stream)
            if not ok:
                raise BuildError("execute_async_v3 failed while capturing")
            self._graph_exec = self.cuda.instantiate(graph)
        except BuildError as exc:
            self.graph_error = str(exc)
            log.warning(
                "CUDA graph capture of %s failed, running without it: %s", self.spec.name, exc
            )
        finally:
            if graph is not None:
                self.cuda.graph_destroy(graph)

    def _drop_graph(self) -> None:
        if self._graph_exec is not None:
            self.cuda.graph_exec_destroy(self._graph_exec)
            self._graph_exec = None

    @property
    def graph_ready(self) -> bool:
        """Whether the next run at the current shapes replays a CUDA graph."""
        return self._graph_exec is not None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._drop_graph()
        self.buffers.release()
        self.cuda.stream_destroy(self.stream)
        self.context = None  # context before engine before runtime
        self.engine = None
        self._runtime = None
