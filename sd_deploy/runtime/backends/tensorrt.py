"""TensorRT backend: runs the plans `sd-build` wrote, with numpy in and numpy out.

Library calls are few and kept at the edges:

- `tensorrt`: `Runtime.deserialize_cuda_engine`, the engine's I/O queries
  (`num_io_tensors`, `get_tensor_name`, `get_tensor_mode`, `get_tensor_dtype`,
  `get_tensor_profile_shape`), and the execution context (`set_input_shape`,
  `get_tensor_shape`, `set_tensor_address`, `execute_async_v3`).
- cuda-python's CUDA runtime bindings (`cuda.bindings.runtime`; `cuda.cudart` on
  cuda-python older than 12.6, removed in 13), wrapped by `CudaRuntime`: device
  memory, one stream, copies, and CUDA graph capture/replay.

Everything else -- whether a plan may be used here (`sd_deploy.engine_dir.plans`),
per-input profile bounds, buffer reuse, readiness reasons -- is plain Python and
tested without a GPU. No torch: device memory is raw cudaMalloc'd buffers.

Before any GPU work each plan's metadata is checked against the running TensorRT
version and GPU, and each request against the plan's optimization profile; both
fail as one-line errors that name the mismatch and the `sd-build` command that
fixes it.

Thread safety: a session owns one execution context, one stream and its buffers;
use it from one thread at a time (one pipeline per thread).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sd_deploy.engine_dir import shapes
from sd_deploy.engine_dir.layout import (
    REQUIRED_COMPONENTS,
    build_command,
    plan_metadata_path,
    plan_path,
    relative,
)
from sd_deploy.engine_dir.manifest import ComponentSpec, Manifest
from sd_deploy.engine_dir.plans import Stale, plan_status, read_metadata
from sd_deploy.errors import BuildError, RequestError, first_line
from sd_deploy.runtime.backends.base import Backend, ComponentSession

log = logging.getLogger("sd_deploy")

INSTALL_HINT = "pip install 'sd-deploy[trt]' on a machine with an NVIDIA GPU"


# --------------------------------------------------------------------------------------
# Library boundary: imports and the CUDA runtime calls
# --------------------------------------------------------------------------------------


def import_tensorrt() -> Any:
    """The tensorrt module, or a BuildError saying how to install it."""
    try:
        import tensorrt
    except ImportError:
        raise BuildError(f"the tensorrt library is not installed ({INSTALL_HINT})") from None
    except OSError as exc:  # the wheel is there but libnvinfer / the driver is not
        raise BuildError(f"tensorrt cannot be loaded: {first_line(exc)}") from None
    return tensorrt


def import_cudart() -> Any:
    """cuda-python's CUDA runtime module under either of its names."""
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6 (the only name in 13.x)
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6
        except ImportError:
            raise BuildError(f"cuda-python is not installed ({INSTALL_HINT})") from None
    return runtime


class CudaRuntime:
    """The handful of CUDA runtime calls the backend makes, via cuda-python.

    Every cuda-python call returns (error, *results); a failure becomes a BuildError
    naming the call and the CUDA error.
    """

    def __init__(self, cudart: Any) -> None:
        self.cudart = cudart

    def _check(self, call: str, result: Any) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.cudart.cudaError_t.cudaSuccess:
            raise BuildError(f"CUDA {call} failed: {getattr(err, 'name', err)}")
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)

    def device_count(self) -> int:
        err, count = self.cudart.cudaGetDeviceCount()
        return int(count) if err == self.cudart.cudaError_t.cudaSuccess else 0

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
        flags = getattr(self.cudart, "cudaStreamNonBlocking", 1)
        return self._check(
            "cudaStreamCreateWithFlags", self.cudart.cudaStreamCreateWithFlags(flags)
        )

    def stream_destroy(self, stream: Any) -> None:
        self._check("cudaStreamDestroy", self.cudart.cudaStreamDestroy(stream))

    def handle(self, obj: Any) -> int:
        """The raw address of a stream, as TensorRT's execute_async_v3 takes it."""
        try:
            from cuda.bindings.utils import get_cuda_native_handle
        except ImportError:
            return int(obj)
        try:
            return int(get_cuda_native_handle(obj))
        except (TypeError, ValueError, AttributeError):
            return int(obj)

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
    """TensorRT version, GPU name and compute capability here (an `Environment`).

    Raises BuildError when tensorrt or cuda-python is missing or no GPU is visible.
    """
    trt = import_tensorrt()
    cuda = cuda or CudaRuntime(import_cudart())
    if cuda.device_count() < 1:
        raise BuildError(
            "no CUDA GPU is visible (check the NVIDIA driver and CUDA_VISIBLE_DEVICES)"
        )
    name, capability = cuda.device_properties()
    return {"trt_version": str(trt.__version__), "gpu_name": name, "compute_capability": capability}


# --------------------------------------------------------------------------------------
# Plain-Python logic: plan checks, profile bounds, buffer reuse, readiness
# --------------------------------------------------------------------------------------


def require_fresh_plan(
    engine_dir: str | Path, spec: ComponentSpec, current: Mapping[str, str]
) -> Any:
    """The plan's PlanMetadata when it may run here, else a BuildError naming the fix."""
    status = plan_status(engine_dir, spec, current)
    if isinstance(status, Stale):
        raise BuildError(
            f"cannot use the {spec.name} TensorRT plan: {status.reason}; rebuild it with "
            f"{build_command(engine_dir, spec.name)}"
        )
    return status.metadata


@dataclass(frozen=True)
class TensorInfo:
    """One engine I/O tensor; inputs carry the profile's min and max shapes."""

    name: str
    is_input: bool
    dtype: np.dtype
    min_shape: tuple[int, ...] = ()
    max_shape: tuple[int, ...] = ()


def check_io(
    spec: ComponentSpec, tensors: Mapping[str, TensorInfo], engine_dir: str | Path
) -> None:
    """The plan's I/O names and dtypes must be the manifest's; else the plan is out of date."""
    fix = f"rebuild it with {build_command(engine_dir, spec.name)}"
    for wanted, is_input in ((spec.inputs, True), (spec.outputs, False)):
        have = sorted(t.name for t in tensors.values() if t.is_input == is_input)
        want = sorted(t.name for t in wanted)
        if have != want:
            kind = "inputs" if is_input else "outputs"
            raise BuildError(
                f"the {spec.name} plan's {kind} {have} are not the manifest's {want}; {fix}"
            )
        for t in wanted:
            if tensors[t.name].dtype != np.dtype(t.dtype):
                raise BuildError(
                    f"the {spec.name} plan's {t.name} is {tensors[t.name].dtype} but the manifest "
                    f"says {t.dtype}; {fix}"
                )


def check_feeds(
    component: str,
    feeds: Mapping[str, np.ndarray],
    inputs: Sequence[TensorInfo],
    engine_dir: str | Path,
) -> dict[str, np.ndarray]:
    """Contiguous arrays of the engine's dtypes, refused (RequestError) outside the profile."""
    arrays: dict[str, np.ndarray] = {}
    for info in inputs:
        if info.name not in feeds:
            raise ValueError(f"{component} needs input {info.name!r}; got {sorted(feeds)}")
        array = np.ascontiguousarray(feeds[info.name], dtype=info.dtype)
        shape = tuple(int(d) for d in array.shape)
        if len(shape) != len(info.min_shape):
            raise ValueError(
                f"{component} input {info.name} has rank {len(shape)}, the plan expects "
                f"{len(info.min_shape)}"
            )
        if shapes.shape_outside(shape, info.min_shape, info.max_shape):
            raise RequestError(
                f"{component} input {info.name} shape {list(shape)} is outside the TensorRT plan's "
                f"profile {list(info.min_shape)}..{list(info.max_shape)} (rebuild with "
                f"{build_command(engine_dir, component)} and a wider --batch/--height/--width)"
            )
        arrays[info.name] = array
    return arrays


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


def readiness(
    engine_dir: str | Path, manifest: Manifest, current: Mapping[str, str]
) -> tuple[bool, str]:
    """Whether every component a txt2img run needs has a usable plan here, and why not."""
    missing = [c for c in REQUIRED_COMPONENTS if c not in manifest.components]
    if missing:
        return False, f"{engine_dir} has no {missing[0]} graph to build a TensorRT plan from"
    if not any(plan_path(engine_dir, c).is_file() for c in REQUIRED_COMPONENTS):
        return False, f"no TensorRT plans in {engine_dir} (run {build_command(engine_dir)})"
    for component in REQUIRED_COMPONENTS:
        status = plan_status(engine_dir, manifest.components[component], current)
        if isinstance(status, Stale):
            return False, (
                f"the {component} TensorRT plan is not usable: {status.reason} "
                f"(run {build_command(engine_dir)})"
            )
    return True, f"TensorRT plans are up to date on {current['gpu_name']}"


def tensorrt_readiness(engine_dir: Path, manifest: Manifest) -> tuple[bool, str]:
    """Whether the TensorRT backend can run this engine dir here, and why (never raises)."""
    try:
        if importlib.util.find_spec("tensorrt") is None:
            return False, "the tensorrt library is not installed"
        try:
            current = current_environment()
        except BuildError as exc:
            return False, str(exc)
        return readiness(engine_dir, manifest, current)
    except Exception as exc:  # noqa: BLE001 - readiness is advisory: report, never crash auto
        return False, f"TensorRT could not be checked ({first_line(exc)})"


# --------------------------------------------------------------------------------------
# Sessions and the backend
# --------------------------------------------------------------------------------------


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


class TensorRTBackend(Backend):
    """Runs the TensorRT plans of an engine dir on the current CUDA device.

    Creating it checks that tensorrt, cuda-python and a GPU are present; `open`
    checks each plan's metadata (ONNX hash, TensorRT version, GPU) before loading it.
    `cuda_graph` records and replays the UNet's steps as a CUDA graph while the
    request's shapes stay fixed.
    """

    name = "tensorrt"

    def __init__(self, engine_dir: Path, manifest: Manifest, cuda_graph: bool = False) -> None:
        self._trt = import_tensorrt()
        self.cuda = CudaRuntime(import_cudart())
        self.environment = current_environment(self.cuda)
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.cuda_graph = cuda_graph
        self._logger = self._trt.Logger(self._trt.Logger.WARNING)
        self._runtime = self._trt.Runtime(self._logger)
        self.profiles: dict[str, dict[str, dict[str, list[int]]]] = {}

    def describe(self) -> str:
        env = self.environment
        graphs = ", CUDA graphs for the UNet" if self.cuda_graph else ""
        return (
            f"tensorrt {env['trt_version']} on {env['gpu_name']} "
            f"(compute capability {env['compute_capability']}){graphs}"
        )

    def open(self, engine_dir: Path, spec: ComponentSpec) -> ComponentSession:
        metadata = require_fresh_plan(engine_dir, spec, self.environment)
        plan = plan_path(engine_dir, spec.name)
        try:
            data = plan.read_bytes()
        except OSError as exc:
            raise BuildError(f"cannot read {plan}: {exc.strerror or exc}") from None
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise BuildError(
                f"TensorRT could not load {relative(plan, engine_dir)} (corrupt, or built by "
                f"another TensorRT); rebuild it with {build_command(engine_dir, spec.name)}"
            )
        self.profiles[spec.name] = metadata.profile
        return TensorRTSession(
            spec,
            engine,
            self._trt,
            self.cuda,
            engine_dir,
            cuda_graph=self.cuda_graph and spec.name == "unet",
            runtime=self._runtime,
        )

    def check_request(self, batch: int, height: int, width: int, guided: bool = True) -> None:
        """Refuse a request the plans' profiles cannot run, before any GPU work.

        Uses the profiles of opened plans and, for the others, of their metadata files,
        so a pipeline can call it before loading anything.
        """
        profiles = self.plan_profiles()
        for name in profiles:
            spec = self.manifest.components[name]
            shapes.check_request(spec.shape_ranges, batch, height, width, name)
        problem = shapes.request_outside_profiles(
            self.manifest, profiles, batch, height, width, guided, str(self.engine_dir)
        )
        if problem:
            raise RequestError(problem)

    def plan_profiles(self) -> dict[str, dict[str, dict[str, list[int]]]]:
        """Profile per component: opened plans', else their metadata's where readable."""
        result = dict(self.profiles)
        for name in self.manifest.components:
            if name in result:
                continue
            try:
                result[name] = read_metadata(
                    plan_metadata_path(plan_path(self.engine_dir, name))
                ).profile
            except (OSError, ValueError):
                continue  # no plan yet: open() will say so
        return result
