"""The TensorRT runtime backend without TensorRT: plan checks, readiness, profile bounds,
buffer reuse and CUDA graph replay, against fake engines and a fake CUDA runtime.

(Kept beside the engine tests because it shares their synthetic engine dir fixture;
it covers sd_deploy/runtime/backends/tensorrt.py.)
"""

from __future__ import annotations

import enum
import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from sd_deploy.engine_dir.layout import build_command
from sd_deploy.engine_dir.manifest import read_manifest
from sd_deploy.engine_dir.plans import (
    PlanMetadata,
    plan_metadata_path,
    plan_path,
    write_metadata,
)
from sd_deploy.engine_dir.shapes import request_outside_profiles, wanted_profile
from sd_deploy.errors import BuildError, RequestError
from sd_deploy.runtime.backends import tensorrt_checks, tensorrt_ready
from sd_deploy.runtime.backends import tensorrt_cuda as trt_cuda
from sd_deploy.runtime.backends.tensorrt import TensorRTBackend
from sd_deploy.runtime.backends.tensorrt_checks import TensorInfo, check_feeds
from sd_deploy.runtime.backends.tensorrt_cuda import CudaRuntime, DeviceBuffers
from sd_deploy.runtime.backends.tensorrt_session import TensorRTSession

# ---- fakes for the library boundary -----------------------------------------------------

FAKE_TRT = types.SimpleNamespace(
    __version__="10.13.0.35",
    TensorIOMode=types.SimpleNamespace(INPUT="input", OUTPUT="output"),
    nptype=lambda dtype: dtype,  # the fake engine reports numpy dtypes directly
)


class FakeCuda:
    """Device memory as bytearrays; a stream that runs work at once, or records it."""

    def __init__(self) -> None:
        self.memory: dict[int, bytearray] = {}
        self.calls: list[str] = []
        self.capturing = False
        self.captured = None
        self.fail_capture = False
        self._next = 0x1000

    def malloc(self, nbytes):
        self.calls.append("malloc")
        ptr, self._next = self._next, self._next + nbytes + 256
        self.memory[ptr] = bytearray(nbytes)
        return ptr

    def free(self, ptr):
        self.calls.append("free")
        del self.memory[ptr]

    def stream_create(self):
        self.calls.append("stream_create")
        return "stream"

    def stream_destroy(self, stream):
        self.calls.append("stream_destroy")

    def handle(self, stream):
        return 7

    def copy_to_device(self, ptr, array, stream):
        self.calls.append("h2d")
        self.memory[ptr][: array.nbytes] = array.tobytes()

    def copy_to_host(self, array, ptr, stream):
        self.calls.append("d2h")
        data = np.frombuffer(bytes(self.memory[ptr][: array.nbytes]), dtype=array.dtype)
        array[...] = data.reshape(array.shape)

    def synchronize(self, stream):
        self.calls.append("sync")

    def begin_capture(self, stream):
        self.calls.append("begin_capture")
        if self.fail_capture:
            raise BuildError(
                "CUDA cudaStreamBeginCapture failed: cudaErrorStreamCaptureUnsupported"
            )
        self.capturing = True

    def end_capture(self, stream):
        self.calls.append("end_capture")
        self.capturing = False
        return ("graph", self.captured)

    def instantiate(self, graph):
        self.calls.append("instantiate")
        return ("exec", graph[1])

    def graph_destroy(self, graph):
        self.calls.append("graph_destroy")

    def launch(self, graph_exec, stream):
        self.calls.append("launch")
        graph_exec[1]()

    def graph_exec_destroy(self, graph_exec):
        self.calls.append("graph_exec_destroy")


UNET_IO = [
    ("sample", True, np.dtype(np.float16)),
    ("timestep", True, np.dtype(np.float32)),
    ("encoder_hidden_states", True, np.dtype(np.float16)),
    ("model_output", False, np.dtype(np.float16)),
]


class FakeContext:
    """model_output = 2 * sample + timestep, read from and written to fake device memory."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.calls: list[str] = []

    def set_input_shape(self, name, shape):
        self.calls.append(f"set_input_shape {name}")
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return self.shapes["sample"]

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_handle):
        assert stream_handle == 7
        self.calls.append("execute")
        cuda, shapes, addresses = self.engine.cuda, dict(self.shapes), dict(self.addresses)

        def work():
            def read(name, dtype):
                count = int(np.prod(shapes[name]))
                raw = bytes(cuda.memory[addresses[name]][: count * dtype.itemsize])
                return np.frombuffer(raw, dtype=dtype).reshape(shapes[name])

            sample = read("sample", np.dtype(np.float16)).astype(np.float32)
            timestep = read("timestep", np.dtype(np.float32))
            out = (2 * sample + timestep[:, None, None, None]).astype(np.float16)
            cuda.memory[addresses["model_output"]][: out.nbytes] = out.tobytes()

        if cuda.capturing:
            cuda.captured = work
        else:
            work()
        return True


class FakeEngine:
    def __init__(self, cuda: FakeCuda, profile, io=UNET_IO) -> None:
        self.cuda = cuda
        self.profile = profile
        self.io = io
        self.num_io_tensors = len(io)
        self.contexts: list[FakeContext] = []

    def get_tensor_name(self, index):
        return self.io[index][0]

    def _find(self, name):
        return next(t for t in self.io if t[0] == name)

    def get_tensor_mode(self, name):
        return "input" if self._find(name)[1] else "output"

    def get_tensor_dtype(self, name):
        return self._find(name)[2]

    def get_tensor_profile_shape(self, name, index):
        assert index == 0
        dims = self.profile[name]
        return [tuple(dims["min"]), tuple(dims["opt"]), tuple(dims["max"])]

    def create_execution_context(self):
        context = FakeContext(self)
        self.contexts.append(context)
        return context


def unet_feeds(batch=2, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "sample": rng.standard_normal((batch, 4, size, size)).astype(np.float16),
        "timestep": np.full((batch,), 3.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 77, 64)).astype(np.float16),
    }


def expected(feeds):
    sample = feeds["sample"].astype(np.float32)
    return (2 * sample + feeds["timestep"][:, None, None, None]).astype(np.float16)


@pytest.fixture
def unet_spec(engine_dir):
    return read_manifest(engine_dir).components["unet"]


def make_session(engine_dir, spec, cuda_graph=False, profile=None):
    cuda = FakeCuda()
    engine = FakeEngine(cuda, profile or spec.profile_shapes)
    session = TensorRTSession(spec, engine, FAKE_TRT, cuda, engine_dir, cuda_graph=cuda_graph)
    return session, cuda, engine.contexts[0]


def write_plan(engine_dir, name, env, **changes):
    spec = read_manifest(engine_dir).components[name]
    plan = plan_path(engine_dir, name)
    plan.write_bytes(b"plan")
    metadata = PlanMetadata(
        component=name,
        tensorrt_version=env["trt_version"],
        gpu_name=env["gpu_name"],
        compute_capability=env["compute_capability"],
        onnx_sha256=spec.onnx_sha256,
        precision=spec.precision,
        profile=wanted_profile(spec, 8),
        shape_ranges=spec.shape_ranges.to_json(),
        plan_bytes=4,
    )
    for key, value in changes.items():
        setattr(metadata, key, value)
    write_metadata(plan_metadata_path(plan), metadata)


# ---- sessions ---------------------------------------------------------------------------


def test_runs_and_reuses_buffers_while_shapes_repeat(engine_dir, unet_spec):
    session, cuda, context = make_session(engine_dir, unet_spec)
    first = unet_feeds(seed=1)
    out = session.run(first)
    np.testing.assert_array_equal(out["model_output"], expected(first))
    assert cuda.calls.count("malloc") == 4
    assert len([c for c in context.calls if c.startswith("set_input_shape")]) == 3
    cuda.calls.clear()
    context.calls.clear()
    for seed in (2, 3):
        feeds = unet_feeds(seed=seed)
        np.testing.assert_array_equal(session.run(feeds)["model_output"], expected(feeds))
    assert "malloc" not in cuda.calls and "free" not in cuda.calls
    assert context.calls == ["execute", "execute"]  # no shape calls: same shapes


def test_new_shapes_rebind_and_grow_only_what_must(engine_dir, unet_spec):
    session, cuda, _ = make_session(engine_dir, unet_spec)
    session.run(unet_feeds(batch=2, size=8))
    cuda.calls.clear()
    bigger = unet_feeds(batch=2, size=16)
    np.testing.assert_array_equal(session.run(bigger)["model_output"], expected(bigger))
    assert cuda.calls.count("malloc") == 2  # sample and model_output grew; the rest fit
    cuda.calls.clear()
    smaller = unet_feeds(batch=1, size=8)
    np.testing.assert_array_equal(session.run(smaller)["model_output"], expected(smaller))
    assert "malloc" not in cuda.calls


def test_request_outside_profile_fails_before_gpu_work(engine_dir, unet_spec):
    session, cuda, context = make_session(engine_dir, unet_spec)
    before = list(cuda.calls)
    with pytest.raises(RequestError) as info:
        session.run(unet_feeds(batch=9))
    message = str(info.value)
    assert "unet input sample shape [9, 4, 8, 8] is outside the TensorRT plan's profile" in message
    assert f"sd-build --engine {engine_dir} --component unet" in message
    assert "\n" not in message
    assert cuda.calls == before and context.calls == []


def test_feeds_are_cast_to_the_engine_dtypes(engine_dir, unet_spec):
    session, _, _ = make_session(engine_dir, unet_spec)
    feeds = unet_feeds()
    feeds["sample"] = feeds["sample"].astype(np.float32)
    out = session.run(feeds)["model_output"]
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, expected(unet_feeds()))


def test_check_feeds_bug_cases():
    info = TensorInfo("x", True, np.dtype(np.float32), (1, 2), (4, 2))
    with pytest.raises(ValueError, match="needs input 'x'"):
        check_feeds("c", {}, [info], "DIR")
    with pytest.raises(ValueError, match="rank 1"):
        check_feeds("c", {"x": np.zeros(2)}, [info], "DIR")
    arrays = check_feeds("c", {"x": np.zeros((3, 2), np.float64)}, [info], "DIR")
    assert arrays["x"].dtype == np.float32 and arrays["x"].flags.c_contiguous


def test_cuda_graph_capture_and_replay(engine_dir, unet_spec):
    session, cuda, context = make_session(engine_dir, unet_spec, cuda_graph=True)
    first = unet_feeds(seed=1)
    np.testing.assert_array_equal(session.run(first)["model_output"], expected(first))
    assert context.calls.count("execute") == 2  # the run itself, then the capture
    assert session.graph_ready
    assert cuda.calls[-4:] == ["begin_capture", "end_capture", "instantiate", "graph_destroy"]
    context.calls.clear()
    cuda.calls.clear()
    for seed in (2, 3):
        feeds = unet_feeds(seed=seed)
        np.testing.assert_array_equal(session.run(feeds)["model_output"], expected(feeds))
    assert context.calls == []  # replayed, not enqueued
    assert cuda.calls.count("launch") == 2
    # New shapes: the graph is dropped, the step runs normally and is captured again.
    cuda.calls.clear()
    other = unet_feeds(batch=1, seed=4)
    np.testing.assert_array_equal(session.run(other)["model_output"], expected(other))
    assert cuda.calls[0] == "graph_exec_destroy"
    assert "launch" not in cuda.calls and session.graph_ready


def test_cuda_graph_failure_falls_back(engine_dir, unet_spec, caplog):
    session, cuda, context = make_session(engine_dir, unet_spec, cuda_graph=True)
    cuda.fail_capture = True
    with caplog.at_level(logging.WARNING, logger="sd_deploy"):
        session.run(unet_feeds())
    assert "CUDA graph capture of unet failed" in caplog.records[-1].getMessage()
    assert not session.graph_ready and "cudaStreamBeginCapture" in session.graph_error
    feeds = unet_feeds(seed=5)
    np.testing.assert_array_equal(session.run(feeds)["model_output"], expected(feeds))
    assert context.calls.count("execute") == 2 and "launch" not in cuda.calls


def test_close_frees_everything(engine_dir, unet_spec):
    session, cuda, _ = make_session(engine_dir, unet_spec, cuda_graph=True)
    session.run(unet_feeds())
    session.close()
    session.close()
    assert cuda.memory == {}
    assert cuda.calls.count("stream_destroy") == 1
    assert "graph_exec_destroy" in cuda.calls
    with pytest.raises(RuntimeError, match="closed"):
        session.run(unet_feeds())


def test_plan_io_must_match_the_manifest(engine_dir, unet_spec):
    cuda = FakeCuda()
    fp32_io = [(n, i, np.dtype(np.float32) if d == np.float16 else d) for n, i, d in UNET_IO]
    engine = FakeEngine(cuda, unet_spec.profile_shapes, io=fp32_io)
    with pytest.raises(BuildError, match="plan's sample is float32 but the manifest says float16"):
        TensorRTSession(unet_spec, engine, FAKE_TRT, cuda, engine_dir)
    engine = FakeEngine(cuda, unet_spec.profile_shapes, io=UNET_IO[1:])
    with pytest.raises(BuildError, match="plan's inputs .* are not the manifest's"):
        TensorRTSession(unet_spec, engine, FAKE_TRT, cuda, engine_dir)


def test_device_buffers():
    allocated, freed = [], []

    def malloc(n):
        allocated.append(n)
        return 1000 + len(allocated)

    buffers = DeviceBuffers(malloc, freed.append)
    assert buffers.ensure("a", 100) == (1001, True)
    assert buffers.ensure("a", 50) == (1001, False)
    assert buffers.ensure("a", 200) == (1002, True)
    assert freed == [1001]
    buffers.ensure("b", 10)
    assert buffers.total_bytes == 210 and buffers.pointer("b") == 1003
    buffers.release()
    assert sorted(freed) == [1001, 1002, 1003] and buffers.total_bytes == 0


# ---- image-level request checks -----------------------------------------------------------


def test_request_outside_profiles(engine_dir):
    manifest = read_manifest(engine_dir)
    unet = manifest.components["unet"]
    profiles = {"unet": wanted_profile(unet, 8)}
    assert request_outside_profiles(manifest, profiles, 4, 128, 128, True, engine_dir) == ""
    static = {"unet": wanted_profile(unet, 8, static=True)}
    assert request_outside_profiles(manifest, static, 1, 64, 64, True, engine_dir) == ""
    problem = request_outside_profiles(manifest, static, 1, 64, 64, False, engine_dir)
    assert "batch 1 at 64x64 (unguided) needs unet sample [1, 4, 8, 8]" in problem
    assert "without --static" in problem
    assert "96x64" in request_outside_profiles(manifest, static, 1, 64, 96, True, engine_dir)


# ---- readiness ----------------------------------------------------------------------------


def test_readiness_reasons(engine_dir, env):
    manifest = read_manifest(engine_dir)
    ok, reason = tensorrt_ready(engine_dir, manifest, env)
    assert not ok
    assert reason == f"no TensorRT plans in {engine_dir} (run sd-build --engine {engine_dir})"
    for name in ("text_encoder", "unet"):
        write_plan(engine_dir, name, env)
    ok, reason = tensorrt_ready(engine_dir, manifest, env)
    assert not ok and "vae_decoder TensorRT plan is not usable: no plan at" in reason
    write_plan(engine_dir, "vae_decoder", env, tensorrt_version="10.8.0")
    ok, reason = tensorrt_ready(engine_dir, manifest, env)
    assert "built with TensorRT 10.8.0 but this is TensorRT 10.13.0.35" in reason
    write_plan(engine_dir, "vae_decoder", env)
    assert tensorrt_ready(engine_dir, manifest, env) == (
        True,
        "TensorRT plans are up to date on NVIDIA H100 80GB HBM3",
    )


def test_readiness_needs_the_required_graphs(make_engine, tmp_path, env):
    root = make_engine(tmp_path / "e", components=("text_encoder", "unet"))
    ok, reason = tensorrt_ready(root, read_manifest(root, require=()), env)
    assert not ok and "has no vae_decoder graph" in reason


def test_tensorrt_missing(engine_dir, monkeypatch):
    manifest = read_manifest(engine_dir)
    monkeypatch.setattr(tensorrt_checks, "installed", lambda name: False)
    assert tensorrt_ready(engine_dir, manifest) == (False, "the tensorrt library is not installed")


def test_readiness_without_gpu_and_never_raising(engine_dir, monkeypatch):
    manifest = read_manifest(engine_dir)
    monkeypatch.setattr(tensorrt_checks, "installed", lambda name: True)

    def no_gpu(cuda=None):
        raise BuildError(
            "no CUDA GPU is visible (check the NVIDIA driver and CUDA_VISIBLE_DEVICES)"
        )

    monkeypatch.setattr(trt_cuda, "current_environment", no_gpu)
    assert tensorrt_ready(engine_dir, manifest) == (
        False,
        str(
            BuildError("no CUDA GPU is visible (check the NVIDIA driver and CUDA_VISIBLE_DEVICES)")
        ),
    )

    def broken(cuda=None):
        raise OSError("libcudart.so.12: cannot open shared object file\nmore")

    monkeypatch.setattr(trt_cuda, "current_environment", broken)
    ok, reason = tensorrt_ready(engine_dir, manifest)
    assert not ok and reason == (
        "TensorRT could not be checked (libcudart.so.12: cannot open shared object file)"
    )


# ---- the backend, with its library calls faked --------------------------------------------


class FakeILogger:
    """Base of the backend's TensorRT log (a trt.ILogger subclass)."""

    Severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

    def __init__(self) -> None:
        pass


class FakeRuntime:
    def __init__(self, engine) -> None:
        self.engine = engine
        self.loaded: list[bytes] = []

    def deserialize_cuda_engine(self, data):
        self.loaded.append(data)
        return self.engine


@pytest.fixture
def backend(engine_dir, env, monkeypatch):
    cuda = FakeCuda()
    spec = read_manifest(engine_dir).components["unet"]
    runtime = FakeRuntime(FakeEngine(cuda, spec.profile_shapes))
    trt = types.SimpleNamespace(
        **vars(FAKE_TRT),
        ILogger=FakeILogger,
        Runtime=lambda logger: runtime,
    )
    monkeypatch.setattr(trt_cuda, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_cuda, "import_cudart", lambda: object())
    monkeypatch.setattr(trt_cuda, "CudaRuntime", lambda cudart: cuda)
    monkeypatch.setattr(trt_cuda, "current_environment", lambda cuda=None: dict(env))
    result = TensorRTBackend(engine_dir, read_manifest(engine_dir), cuda_graph=True)
    result.fake_runtime = runtime
    return result


def test_backend_refuses_a_plan_from_elsewhere(backend, engine_dir, env):
    spec = backend.manifest.components["unet"]
    with pytest.raises(BuildError) as info:
        backend.open(engine_dir, spec)
    assert str(info.value) == (
        "cannot use the unet TensorRT plan: no plan at unet/model.plan; rebuild it with "
        f"sd-build --engine {engine_dir} --component unet"
    )
    write_plan(engine_dir, "unet", env, tensorrt_version="10.8.0")
    with pytest.raises(BuildError, match="built with TensorRT 10.8.0 but this is TensorRT 10.13"):
        backend.open(engine_dir, spec)
    write_plan(engine_dir, "unet", env, gpu_name="NVIDIA A10G", compute_capability="8.6")
    with pytest.raises(
        BuildError, match="built on NVIDIA A10G .*sd-build --engine .* --component unet"
    ):
        backend.open(engine_dir, spec)
    assert backend.fake_runtime.loaded == []  # refused before TensorRT saw the plan


def test_backend_opens_and_runs(backend, engine_dir, env):
    write_plan(engine_dir, "unet", env)
    spec = backend.manifest.components["unet"]
    session = backend.open(engine_dir, spec)
    assert backend.fake_runtime.loaded == [b"plan"]
    assert isinstance(session, TensorRTSession) and session.cuda_graph
    feeds = unet_feeds()
    np.testing.assert_array_equal(session.run(feeds)["model_output"], expected(feeds))
    assert backend.describe() == (
        "tensorrt 10.13.0.35 on NVIDIA H100 80GB HBM3 (compute capability 9.0), "
        "CUDA graphs for the UNet"
    )
    backend.check_request(1, 64, 64)
    with pytest.raises(RequestError, match="batch 5 is outside the 1..4"):
        backend.check_request(5, 64, 64)
    session.close()


def test_backend_unloadable_plan(backend, engine_dir, env):
    write_plan(engine_dir, "unet", env)
    backend.fake_runtime.engine = None
    with pytest.raises(BuildError, match="TensorRT could not load unet/model.plan"):
        backend.open(engine_dir, backend.manifest.components["unet"])


# ---- the CUDA runtime wrapper and imports ---------------------------------------------------


class FakeCudaError(enum.Enum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2
    cudaErrorNoDevice = 100


def fake_cudart(devices=1):
    ok = FakeCudaError.cudaSuccess
    return types.SimpleNamespace(
        cudaError_t=FakeCudaError,
        cudaGetDeviceCount=lambda: (
            (ok, devices) if devices else (FakeCudaError.cudaErrorNoDevice, 0)
        ),
        cudaGetDevice=lambda: (ok, 0),
        cudaGetDeviceProperties=lambda device: (
            ok,
            types.SimpleNamespace(name=b"NVIDIA H100 80GB HBM3\0\0\0", major=9, minor=0),
        ),
        cudaMalloc=lambda n: (FakeCudaError.cudaErrorMemoryAllocation, 0),
        cudaFree=lambda ptr: (ok,),
    )


def test_cuda_runtime_wrapper(monkeypatch):
    cuda = CudaRuntime(fake_cudart())
    assert cuda.device_count() == 1
    assert cuda.device_properties() == ("NVIDIA H100 80GB HBM3", "9.0")
    with pytest.raises(BuildError, match="^CUDA cudaMalloc failed: cudaErrorMemoryAllocation$"):
        cuda.malloc(1 << 40)
    assert cuda.free(5) is None
    monkeypatch.setattr(trt_cuda, "import_tensorrt", lambda: FAKE_TRT)
    assert trt_cuda.current_environment(cuda) == {
        "trt_version": "10.13.0.35",
        "gpu_name": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0",
    }
    with pytest.raises(BuildError, match="no CUDA GPU is visible"):
        trt_cuda.current_environment(CudaRuntime(fake_cudart(devices=0)))


def test_imports_say_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BuildError, match=r"tensorrt library is not installed \(pip install"):
        trt_cuda.import_tensorrt()
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)
    with pytest.raises(BuildError, match="cuda-python is not installed"):
        trt_cuda.import_cudart()


def test_import_cudart_falls_back_to_the_old_name(monkeypatch):
    old = types.ModuleType("cuda")
    old.cudart = "old cudart module"
    monkeypatch.setitem(sys.modules, "cuda", old)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)
    assert trt_cuda.import_cudart() == "old cudart module"


def test_module_imports_without_tensorrt():
    # The backend module and the engines package load without tensorrt/polygraphy/cuda.
    import subprocess

    code = (
        "import sys; import sd_deploy.runtime.backends.tensorrt, sd_deploy.engines.build; "
        "heavy = ('tensorrt', 'polygraphy', 'cuda', 'torch', 'onnx'); "
        "bad = [m for m in heavy if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_path_helpers(engine_dir):
    assert build_command(engine_dir) == f"sd-build --engine {engine_dir}"
    assert build_command(Path("e"), "unet") == "sd-build --engine e --component unet"


def test_check_request_reads_unopened_plans(backend, engine_dir, env):
    spec = backend.manifest.components["unet"]
    write_plan(engine_dir, "unet", env, profile=wanted_profile(spec, 8, static=True))
    backend.check_request(1, 64, 64, guided=True)  # nothing opened yet: metadata is read
    with pytest.raises(RequestError, match=r"\(unguided\) needs unet sample \[1, 4, 8, 8\]"):
        backend.check_request(1, 64, 64, guided=False)
