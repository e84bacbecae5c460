"""The project's TensorRT code against what NVIDIA ships, not against our own fakes.

With the `trt-api` extra (real TensorRT 11 bindings, the real lean runtime, real
cuda-bindings and Polygraphy) and a C compiler, the real `tensorrt` module is
imported in child processes over three stand-in C libraries (see trt_api.py), and:

- every TensorRT, Polygraphy and cuda-python attribute, method and enum member the
  project's TensorRT code uses (found by reading that code, trt_conformance.py)
  must exist in the real library, and every call must fit a real signature;
- the test fakes may not offer what the real module lacks;
- sd-build and the backends run against the real modules up to their first real
  library call and stop with the project's own one-line errors;
- the lean runtime's plan loading refuses bad plans without crashing.

Each test skips with the reason where the wheels or the compiler are missing.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import trt_api
import trt_conformance as tc
from trt_api import STAND_INS, missing_wheels, run_python

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def trt_stand_ins(tmp_path_factory) -> Path:
    """The compiled stand-in libraries (skips without a C compiler or the trt-api wheels)."""
    return trt_api.stand_ins_or_skip(tmp_path_factory)


@pytest.fixture(scope="session")
def real_trt_api(trt_stand_ins) -> dict:
    """The real tensorrt module's API as JSON (read in a child process)."""
    return trt_api.describe_real_tensorrt(trt_stand_ins)


@pytest.fixture(scope="session")
def lean_trt_api() -> dict:
    """The real lean runtime's API as JSON (skips without tensorrt-lean-cu13-*)."""
    return trt_api.describe_lean_runtime_or_skip()


def _analysis(api_json, paths=None) -> list[tc.Use]:
    return tc.Analysis(tc.Api(api_json), paths or tc.tensorrt_sources()).run()


def _report(uses: list[tc.Use], library: str) -> str:
    return "\n".join(f"  {u.where}: {u.what}" for u in uses if u.library == library)


# ---- every API use exists and every call fits ---------------------------------------------


def test_every_tensorrt_use_is_in_the_real_module(real_trt_api):
    uses = _analysis(real_trt_api)
    trt_uses = [u for u in uses if u.library == "tensorrt"]
    bad = list(tc.problems(trt_uses))
    assert not bad, "\n".join(bad)
    # The analysis must see the code it checks: the backend's engine and context calls,
    # the runtime, the logger and the builder's memory pool at least.
    seen = {u.what.split("(")[0] for u in trt_uses}
    for expected in (
        "Runtime.deserialize_cuda_engine",
        "ICudaEngine.get_tensor_profile_shape",
        "IExecutionContext.execute_async_v3",
        "tensorrt.MemoryPoolType",
        "tensorrt.__version__",
    ):
        assert expected in seen, (
            f"{expected} not found by the analysis:\n{_report(uses, 'tensorrt')}"
        )
    print(f"{len(trt_uses)} TensorRT API uses checked:\n{_report(uses, 'tensorrt')}")


def test_every_polygraphy_and_cuda_use_is_in_the_real_library(real_trt_api):
    why = missing_wheels("polygraphy", "cuda.bindings")
    if why:
        pytest.skip(why)
    uses = _analysis(real_trt_api)
    for library, least in (("polygraphy", 10), ("cuda", 20)):
        found = [u for u in uses if u.library == library]
        assert len(found) >= least, f"only {len(found)} {library} uses:\n{_report(uses, library)}"
    bad = [p for p in tc.problems(uses)]
    assert not bad, "\n".join(bad)


def test_runtime_backend_uses_exist_in_the_lean_runtime(lean_trt_api, real_trt_api):
    """The runtime side only deserializes and runs: the lean runtime must offer it all."""
    paths = [p for p in tc.tensorrt_sources() if "runtime" in p.parts]
    uses = [u for u in _analysis(lean_trt_api, paths) if u.library == "tensorrt"]
    assert any("execute_async_v3" in u.what for u in uses), _report(uses, "tensorrt")
    bad = [p for p in tc.problems(uses)]
    assert not bad, "\n".join(bad)


BROKEN = """
import tensorrt as trt

def run(data):
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(data)   # fine: -> ICudaEngine
    flag = trt.BuilderFlag.FP16                      # removed in TensorRT 11
    context = engine.create_execution_context()
    context.execute_async_v2([], 0)                  # removed: v3 only
    context.execute_async_v3()                       # stream_handle missing
    context.set_input_shape("x", (1,), strict=True)  # no such keyword
    engine.get_tensor_profile_shape("x", 0)          # fine
    return trt.Refitter(engine)                      # logger missing
"""


def test_the_analysis_finds_misuse(real_trt_api, tmp_path):
    """The checker itself can fail: a file with known mistakes gives exactly those."""
    path = tmp_path / "sd_deploy" / "engines" / "broken.py"
    path.parent.mkdir(parents=True)
    path.write_text(BROKEN)
    uses = tc.Analysis(tc.Api(real_trt_api), [path], root=tmp_path).run()
    found = sorted(u.problem.split(" fits ")[0].split(" has no ")[-1] for u in uses if u.problem)
    assert found == [
        "BuilderFlag.FP16",
        "IExecutionContext.execute_async_v2",
        "IExecutionContext.execute_async_v3(0 positional)",
        "IExecutionContext.set_input_shape(2 positional, strict=)",
        "Refitter(1 positional)",
    ], [u.problem for u in uses if u.problem]
    assert sum(not u.problem for u in uses) >= 6


# ---- the fakes ---------------------------------------------------------------------------

# What each fake class of the TensorRT tests stands in for: a class of the real tensorrt
# module ("trt:Name") or a Python object ("py:module:attr"). Classes that fake another
# library (cuda-python's runtime, not inspectable as a class) are listed with None.
FAKE_CLASSES = {
    ("test_tensorrt_backend.py", "FakeContext"): "trt:IExecutionContext",
    ("test_tensorrt_backend.py", "FakeEngine"): "trt:ICudaEngine",
    ("test_tensorrt_backend.py", "FakeRuntime"): "trt:Runtime",
    ("test_tensorrt_backend.py", "FakeILogger"): "trt:ILogger",
    ("test_tensorrt_backend.py", "FakeCuda"): None,  # sd_deploy's own CudaRuntime wrapper
    ("test_tensorrt_backend.py", "FakeCudaError"): "py:cuda.bindings.runtime:cudaError_t",
    ("test_build_engines.py", "FakeProfile"): "py:polygraphy.backend.trt:Profile",
    ("test_build_engines.py", "FakeLogger"): "py:polygraphy.logger:G_LOGGER",
    ("test_build_engines.py", "FakePolygraphyError"): None,  # an exception class
    ("test_build_engines.py", "FakeLibraries"): None,  # holds the fake modules below
    ("test_lora_refit.py", "FakeWeights"): "trt:Weights",
    ("test_lora_refit.py", "FakeEngine"): "trt:ICudaEngine",
    ("test_lora_refit.py", "FakeRefitter"): "trt:Refitter",
}

TESTS = HERE.parent


def fake_files() -> list[Path]:
    """Test files that fake TensorRT or Polygraphy (found by what they mention)."""
    mention = re.compile(r"tensorrt|FAKE_TRT|Refitter|polygraphy")
    fake = re.compile(r"^class Fake|SimpleNamespace|ModuleType", re.M)
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        if path.name in ("test_tensorrt_api.py", "trt_api.py", "trt_conformance.py"):
            continue
        text = path.read_text()
        if mention.search(text) and fake.search(text):
            found.append(path)
    return found


class Real:
    """Attribute lookups on the real tensorrt description or a real Python object."""

    def __init__(self, api: tc.Api) -> None:
        self.api = api

    def has(self, root: str, path: list[str]) -> str:
        """'' when root.path exists in the real library, else what is missing."""
        if root == "tensorrt":
            owner: str | None = None
            for i, name in enumerate(path):
                entry = self.api.member(owner, name)
                if entry is None:
                    return ".".join(["tensorrt", *path[: i + 1]])
                if entry["kind"] == "class":
                    owner = entry["qualname"]
                elif entry["kind"] == "value" and entry["type"] in self.api.classes:
                    owner = entry["type"]
                elif i < len(path) - 1:
                    return ""  # a value or function: nothing below it to check
            return ""
        module, _, attr = root.partition(":")
        obj = importlib.import_module(module)
        for i, name in enumerate(([attr] if attr else []) + path):
            if not hasattr(obj, name):
                return ".".join([module, *([attr] if attr else []), *path][: i + 2])
            obj = getattr(obj, name)
        return ""


def _fake_offers(cls: ast.ClassDef) -> list[str]:
    """Public methods and class attributes a fake class defines (its own body only)."""
    names = []
    for item in cls.body:
        if isinstance(item, ast.FunctionDef) and not item.name.startswith("_"):
            names.append(item.name)
        elif isinstance(item, ast.Assign):
            names += [t.id for t in item.targets if isinstance(t, ast.Name)]
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            names.append(item.target.id)
    return [n for n in names if not n.startswith("_")]


def _namespace_fakes(tree: ast.Module) -> list[tuple[str, list[str], int]]:
    """(real root, attribute path, line) for what SimpleNamespace / ModuleType fakes offer.

    `types.ModuleType("x.y")` fakes module x.y; a SimpleNamespace bound to a name with
    "trt" in it fakes tensorrt; nested namespaces and later attribute assignments add
    to the path."""
    roots: dict[str, str] = {}  # ast.unparse(target) -> real root
    offers: list[tuple[str, list[str], int]] = []

    def namespace(call: ast.expr, root: str, prefix: list[str]) -> None:
        if not (isinstance(call, ast.Call) and ast.unparse(call.func).endswith("SimpleNamespace")):
            return
        for keyword in call.keywords:
            if keyword.arg is None or keyword.arg.startswith("__") and keyword.arg != "__version__":
                continue
            offers.append((root, [*prefix, keyword.arg], call.lineno))
            namespace(keyword.value, root, [*prefix, keyword.arg])

    for node in ast.walk(tree):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            name = ast.unparse(target)
            value = node.value
            if isinstance(value, ast.Call) and ast.unparse(value.func).endswith("ModuleType"):
                module = value.args[0].value if value.args else ""
                roots[name] = module
            elif isinstance(target, ast.Attribute) and ast.unparse(target.value) in roots:
                root = roots[ast.unparse(target.value)]
                if target.attr.startswith("__") and target.attr != "__version__":
                    continue
                offers.append((root, [target.attr], node.lineno))
                namespace(value, root, [target.attr])
            elif isinstance(value, ast.Call) and ast.unparse(value.func).endswith(
                "SimpleNamespace"
            ):
                if "trt" in name.lower():
                    namespace(value, "tensorrt", [])
    return offers


def test_fakes_offer_nothing_the_real_module_lacks(real_trt_api):
    why = missing_wheels("polygraphy", "cuda.bindings")
    if why:
        pytest.skip(why)
    real = Real(tc.Api(real_trt_api))
    wrong, checked = [], 0
    files = fake_files()
    assert {"test_tensorrt_backend.py", "test_build_engines.py"} <= {f.name for f in files}
    for path in files:
        file = path.name
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name.startswith("Fake"):
                assert (file, node.name) in FAKE_CLASSES, (
                    f"{file}: {node.name} is a new fake: say in FAKE_CLASSES what it fakes"
                )
                target = FAKE_CLASSES[(file, node.name)]
                if target is None:
                    continue
                kind, _, rest = target.partition(":")
                for name in _fake_offers(node):
                    checked += 1
                    if kind == "trt":
                        missing = real.has("tensorrt", [rest, name])
                    else:
                        module, _, attr = rest.partition(":")
                        missing = real.has(f"{module}:{attr}", [name])
                    if missing:
                        wrong.append(f"{file}:{node.lineno} {node.name}.{name}: no {missing}")
        for root, path, line in _namespace_fakes(tree):
            if root.split(".")[0] not in ("tensorrt", "polygraphy"):
                continue
            checked += 1
            missing = real.has(root, path)
            if missing:
                wrong.append(f"{file}:{line} fake {root}.{'.'.join(path)}: no {missing}")
    assert checked >= 20, checked
    assert not wrong, "\n".join(wrong)


# ---- Refitter names for refittable plans (sd-build --refittable, LoRA switching) ------------

REFIT_REFERENCE = '''
import tensorrt as trt

def refit(plan, onnx_path, weights):
    """The calls a LoRA switch makes on a plan built with BuilderFlag.REFIT."""
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    flags = (trt.BuilderFlag.REFIT, trt.BuilderFlag.REFIT_IDENTICAL, trt.BuilderFlag.STRIP_PLAN)
    assert engine.refittable
    refitter = trt.Refitter(engine, logger)
    names = refitter.get_all_weights()
    parser = trt.OnnxParserRefitter(refitter, logger)
    parser.refit_from_file(onnx_path)
    for name, array in weights.items():
        prototype = refitter.get_weights_prototype(name)
        refitter.set_named_weights(name, trt.Weights(array))
    missing = refitter.get_missing_weights()
    refitter.weights_validation = True
    return refitter.refit_cuda_engine(), refitter.refit_cuda_engine_async(0), flags, names
'''


def test_refit_api_names_are_real(real_trt_api, tmp_path):
    """The Refitter API a refittable plan is switched with (see docs/tensorrt.md)."""
    path = tmp_path / "sd_deploy" / "engines" / "refit_reference.py"
    path.parent.mkdir(parents=True)
    path.write_text(REFIT_REFERENCE)
    uses = tc.Analysis(tc.Api(real_trt_api), [path], root=tmp_path).run()
    assert len(uses) >= 15, [u.what for u in uses]
    bad = [p for p in tc.problems(uses)]
    assert not bad, "\n".join(bad)


# ---- the code runs against the real modules up to the first real library call ------------

NO_TRACEBACK = ("Traceback", "AttributeError", "TypeError")


def _one_line_error(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    assert not any(word in output for word in NO_TRACEBACK), output
    return lines[0]


def test_sd_build_with_real_bindings_and_no_gpu(trt_stand_ins, tiny_engine_fp16, tmp_path):
    root = tmp_path / "tiny"
    shutil.copytree(tiny_engine_fp16, root)
    code = f"""
from click.testing import CliRunner
from sd_deploy.cli import build_command
result = CliRunner().invoke(build_command, ["--engine", {str(root)!r}])
print(result.output)
print("exit", result.exit_code, repr(result.exception))
"""
    done = run_python(code, trt_stand_ins)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exit 1 SystemExit(1)" in done.stdout, done.stdout + done.stderr[-2000:]
    line = _one_line_error(done.stdout.split("exit 1")[0])
    assert any(
        reason in line for reason in ("no CUDA GPU is visible", "cuda-python is not installed")
    ), line


BUILD_TO_FIRST_CALL = """
import json
import polygraphy.backend.trt as pbt
from polygraphy.backend.trt import config as pconfig
from sd_deploy.runtime.backends import tensorrt_cuda

seen = {"profile": [], "config": [], "network": []}
real_add, real_config, real_network = pbt.Profile.add, pbt.CreateConfig.__init__, None

def add(self, name, min, opt, max):
    seen["profile"].append([name, list(min), list(opt), list(max)])
    return real_add(self, name, min=min, opt=opt, max=max)

def config_init(self, *args, **kwargs):
    seen["config"].append(sorted(kwargs))
    return real_config(self, *args, **kwargs)

pbt.Profile.add = add
pbt.CreateConfig.__init__ = config_init
real_network = pbt.NetworkFromOnnxPath.__init__
def network_init(self, path, **kwargs):
    seen["network"].append([path, kwargs])
    return real_network(self, path, **kwargs)
pbt.NetworkFromOnnxPath.__init__ = network_init

gpu = {"trt_version": trt.__version__, "gpu_name": "NVIDIA H200", "compute_capability": "9.0"}
tensorrt_cuda.current_environment = lambda cuda=None: dict(gpu)

from click.testing import CliRunner
from sd_deploy.cli import build_command
result = CliRunner().invoke(
    build_command, ["--engine", ROOT, "--component", "unet", "--workspace", "1G"]
)
print(result.output)
print("SEEN", json.dumps(seen))
print("exit", result.exit_code, repr(result.exception))
"""


def test_sd_build_runs_to_the_first_real_library_call(trt_stand_ins, tiny_engine_fp16, tmp_path):
    """With a GPU pretended, real Polygraphy builds the profile and config over the real
    bindings; the first real library call (the Builder) fails, as one line."""
    root = tmp_path / "tiny"
    shutil.copytree(tiny_engine_fp16, root)
    done = run_python(BUILD_TO_FIRST_CALL.replace("ROOT", repr(str(root))), trt_stand_ins)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "exit 1 SystemExit(1)" in out, out + done.stderr[-3000:]
    seen = json.loads(out.split("SEEN ", 1)[1].splitlines()[0])
    inputs = {tensor["name"] for tensor in _manifest(root)["components"]["unet"]["inputs"]}
    assert {p[0] for p in seen["profile"]} == inputs
    assert seen["config"] == [
        ["builder_optimization_level", "load_timing_cache", "memory_pool_limits", "profiles"]
    ]
    assert seen["network"] == [[str(root / "unet" / "model.onnx"), {"strongly_typed": True}]]
    line = _one_line_error(out.split("SEEN ")[0])
    assert "building unet" in line and "TensorRT" in line, line


BUILD_OVER_API_DOUBLES = """
import json
from pathlib import Path
import trt_conformance as tc
from sd_deploy.engine_dir.manifest import read_manifest
from sd_deploy.runtime.backends import tensorrt_cuda

api = tc.Api(trt_api.describe_api(trt))
doubles = trt_api.ApiDoubles(api)
for name in ("Builder", "OnnxParser", "Runtime"):
    setattr(trt, name, doubles.constructor(name))
root = Path(ROOT)
manifest = read_manifest(root)
parsing = {}

def parse_from_file(parser, path):
    parsing["spec"] = manifest.components[Path(path).parent.name]
    return True

def tensor(t):
    d = trt_api.Double(doubles, "ITensor")
    shape = [-1 if isinstance(x, str) else x for x in t.shape]
    d._values.update(name=t.name, shape=trt.Dims(shape), is_shape_tensor=False)
    return d

doubles.script.update({
    "OnnxParser.parse_from_file": parse_from_file,
    "INetworkDefinition.num_inputs": lambda net: len(parsing["spec"].inputs),
    "INetworkDefinition.num_outputs": lambda net: len(parsing["spec"].outputs),
    "INetworkDefinition.get_input": lambda net, i: tensor(parsing["spec"].inputs[i]),
    "INetworkDefinition.get_output": lambda net, i: tensor(parsing["spec"].outputs[i]),
})
gpu = {"trt_version": trt.__version__, "gpu_name": "NVIDIA H200", "compute_capability": "9.0"}
tensorrt_cuda.current_environment = lambda cuda=None: dict(gpu)

from sd_deploy.engines import build_engines
results = build_engines(root, workspace="1G", optimization_level=3, progress=False)
print("RESULT", json.dumps({
    "status": [r.status for r in results],
    "calls": sorted(set(doubles.calls)),
    "missing": sorted(set(doubles.missing)),
    "misfits": doubles.misfits,
}))
"""

# Read by Polygraphy 0.53.6 only under hasattr / try-except AttributeError: TensorRT 11
# removed INT8 calibration, and Polygraphy copes.
TOLERATED_MISSING = {"IBuilderConfig.int8_calibrator"}


def test_sd_build_runs_to_the_end_over_doubles_of_the_real_api(
    trt_stand_ins, tiny_engine_fp16, tmp_path
):
    """A whole sd-build of the tiny preset through real Polygraphy, with TensorRT's
    Builder, OnnxParser and Runtime replaced by doubles that offer exactly the real
    attributes and check every call against the real signatures: every call Polygraphy
    makes for us on TensorRT 11 exists and fits."""
    root = tmp_path / "tiny"
    shutil.copytree(tiny_engine_fp16, root)
    done = run_python(BUILD_OVER_API_DOUBLES.replace("ROOT", repr(str(root))), trt_stand_ins)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result["misfits"] == []
    assert set(result["missing"]) <= TOLERATED_MISSING, result["missing"]
    assert result["status"] == ["built"] * len(_manifest(root)["components"])
    for call in (
        "Builder.create_network(0 positional, flags)",
        "IOptimizationProfile.set_shape(4 positional)",
        "IBuilderConfig.set_memory_pool_limit(2 positional)",
        "IBuilderConfig.builder_optimization_level =",
        "Builder.build_serialized_network(2 positional)",
        "Runtime.deserialize_cuda_engine(1 positional)",
    ):
        assert call in result["calls"], result["calls"]
    assert all((root / c / "model.plan").is_file() for c in _manifest(root)["components"])


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


BACKENDS_NO_GPU = """
import json
from pathlib import Path
from sd_deploy.engine_dir.manifest import read_manifest
from sd_deploy.errors import UserError
from sd_deploy.runtime.backends import select_backend, tensorrt_ready

root = Path(ROOT)
manifest = read_manifest(root)
out = {"ready": list(tensorrt_ready(root, manifest))}
try:
    select_backend("tensorrt", root, manifest)
    out["tensorrt"] = "no error"
except UserError as exc:
    out["tensorrt"] = [type(exc).__name__, str(exc)]
backend, reason = select_backend("auto", root, manifest)
out["auto"] = [backend.name, reason]
print("RESULT", json.dumps(out))
"""


def test_tensorrt_and_auto_backends_with_the_real_module_and_no_gpu(
    trt_stand_ins, tiny_engine_fp16
):
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed")
    done = run_python(BACKENDS_NO_GPU.replace("ROOT", repr(str(tiny_engine_fp16))), trt_stand_ins)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    ok, reason = result["ready"]
    assert not ok
    assert reason.startswith(("no CUDA GPU is visible", "cuda-python is not installed")), reason
    kind, message = result["tensorrt"]  # --backend tensorrt: the same reason, as an error
    assert kind == "BuildError" and message == reason
    name, why = result["auto"]
    # With openvino installed on a CPU with bf16 instructions, auto picks OpenVINO.
    assert name in ("onnxruntime", "openvino")
    cpu = ("auto: ONNX Runtime CPU because ", "auto: OpenVINO on the CPU because ")
    assert why.startswith(cpu) and reason in why, why


SESSION_OVER_API_DOUBLES = """
import json
from pathlib import Path
import numpy as np
import trt_conformance as tc
from test_tensorrt_backend import FakeCuda, unet_feeds
from sd_deploy.engine_dir.manifest import read_manifest
from sd_deploy.runtime.backends.tensorrt_session import TensorRTSession

api = tc.Api(trt_api.describe_api(trt))
doubles = trt_api.ApiDoubles(api)
spec = read_manifest(Path(ROOT)).components["unet"]
io = [(t.name, True, t.dtype) for t in spec.inputs]
io += [(t.name, False, t.dtype) for t in spec.outputs]
types = {"float16": trt.DataType.HALF, "float32": trt.DataType.FLOAT, "int32": trt.DataType.INT32}
shapes = {}

def set_input_shape(context, name, shape):
    shapes[name] = list(shape)
    return True

doubles.script.update({
    "ICudaEngine.num_io_tensors": lambda e: len(io),
    "ICudaEngine.get_tensor_name": lambda e, i: io[i][0],
    "ICudaEngine.get_tensor_mode": lambda e, n: (
        trt.TensorIOMode.INPUT if dict((a, b) for a, b, _ in io)[n] else trt.TensorIOMode.OUTPUT
    ),
    "ICudaEngine.get_tensor_dtype": lambda e, n: types[{a: c for a, _, c in io}[n]],
    "ICudaEngine.get_tensor_profile_shape": lambda e, n, i: [
        trt.Dims(spec.profile_shapes[n][k]) for k in ("min", "opt", "max")
    ],
    "IExecutionContext.set_input_shape": set_input_shape,
    "IExecutionContext.get_tensor_shape": lambda c, n: trt.Dims(shapes["sample"]),
})
engine = trt_api.Double(doubles, "ICudaEngine")
session = TensorRTSession(spec, engine, trt, FakeCuda(), ROOT)
feeds = unet_feeds()
first = session.run(feeds)
second = session.run(feeds)  # same shapes: no rebinding
print("RESULT", json.dumps({
    "inputs": [
        [t.name, str(t.dtype), list(t.min_shape), list(t.max_shape)] for t in session.inputs
    ],
    "output": [list(first["model_output"].shape), str(first["model_output"].dtype)],
    "calls": doubles.calls, "missing": doubles.missing, "misfits": doubles.misfits,
}))
"""


def test_session_runs_over_doubles_of_the_real_api(trt_stand_ins, engine_dir):
    """Our session against an engine and context that offer exactly the real attributes,
    returning real TensorRT values: real `Dims` from get_tensor_profile_shape and
    get_tensor_shape, real `DataType`s through the real `trt.nptype`, real `TensorIOMode`."""
    done = run_python(
        SESSION_OVER_API_DOUBLES.replace("ROOT", repr(str(engine_dir))), trt_stand_ins
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result["misfits"] == [] and result["missing"] == []
    spec = _manifest(engine_dir)["components"]["unet"]
    assert result["inputs"] == [
        [
            t["name"],
            t["dtype"],
            spec["profile_shapes"][t["name"]]["min"],
            spec["profile_shapes"][t["name"]]["max"],
        ]
        for t in spec["inputs"]
    ]
    assert result["output"] == [[2, 4, 8, 8], "float16"]
    calls = result["calls"]
    assert calls.count("IExecutionContext.execute_async_v3(1 positional)") == 2
    assert calls.count("IExecutionContext.set_input_shape(2 positional)") == 3  # bound once


# ---- the real lean runtime: plan loading ------------------------------------------------------

LEAN_LOADING = """
import json, sys
from pathlib import Path
import tensorrt_lean_bindings as lean
from sd_deploy.engine_dir.manifest import read_manifest
from sd_deploy.errors import UserError
from sd_deploy.runtime.backends import tensorrt as trt_backend
from sd_deploy.runtime.backends import tensorrt_cuda

root = Path(ROOT)
manifest = read_manifest(root)
result = {"version": lean.__version__}


class OneGpu:
    # CUDA as a machine with one GPU would answer (cuda-python is real, the GPU is not).
    device_error = ""

    def device_count(self):
        return 1

    def device_properties(self):
        return "NVIDIA H200", "9.0"


tensorrt_cuda.import_tensorrt = lambda: lean
tensorrt_cuda.import_cudart = lambda: None
tensorrt_cuda.CudaRuntime = lambda cudart=None: OneGpu()

env = tensorrt_cuda.current_environment(OneGpu())
result["environment"] = env
try:
    backend = trt_backend.TensorRTBackend(root, manifest)
    result["backend"] = "created"
except UserError as exc:
    backend = None
    result["backend"] = [type(exc).__name__, str(exc)]
if backend is not None:
    try:
        backend.open(root, manifest.components["unet"])
        result["open"] = "opened"
    except UserError as exc:
        result["open"] = [type(exc).__name__, str(exc)]
print("RESULT", json.dumps(result))
"""


def _write_plan(root: Path, component: str, data: bytes, version: str, plan_bytes: int) -> None:
    from sd_deploy.engine_dir.manifest import read_manifest
    from sd_deploy.engine_dir.plans import (
        PlanMetadata,
        plan_metadata_path,
        plan_path,
        write_metadata,
    )
    from sd_deploy.engine_dir.shapes import wanted_profile

    spec = read_manifest(root).components[component]
    plan = plan_path(root, component)
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_bytes(data)
    write_metadata(
        plan_metadata_path(plan),
        PlanMetadata(
            component=component,
            tensorrt_version=version,
            gpu_name="NVIDIA H200",
            compute_capability="9.0",
            onnx_sha256=spec.onnx_sha256,
            precision=spec.precision,
            profile=wanted_profile(spec, 8),
            shape_ranges=spec.shape_ranges.to_json()
            if hasattr(spec.shape_ranges, "to_json")
            else spec.shape_ranges,
            plan_bytes=plan_bytes,
            build_flags={},
            build_seconds=1.0,
            built_at="2026-12-01T00:00:00+00:00",
            sd_deploy_version="0.1.0",
        ),
    )


def _lean(root: Path) -> dict:
    done = run_python(LEAN_LOADING.replace("ROOT", repr(str(root))), None)
    assert done.returncode == 0, f"crashed ({done.returncode}):\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.split("RESULT ", 1)[1])


@pytest.fixture
def lean_engine_dir(lean_trt_api, engine_dir):
    return engine_dir


def test_lean_runtime_version_check_reads_the_real_version(lean_engine_dir, lean_trt_api):
    version = lean_trt_api["version"]
    _write_plan(lean_engine_dir, "unet", b"x" * 64, "10.13.0.35", 64)
    result = _lean(lean_engine_dir)
    assert result["environment"]["trt_version"] == version == result["version"]
    assert result["backend"] == "created", result
    kind, message = result["open"]
    assert message.startswith(
        f"cannot use the unet TensorRT plan: built with TensorRT 10.13.0.35 but this is "
        f"TensorRT {version}"
    ), message


def test_lean_runtime_refuses_a_truncated_plan(lean_engine_dir, lean_trt_api):
    version = lean_trt_api["version"]
    _write_plan(lean_engine_dir, "unet", b"x" * 10, version, 4096)  # metadata: 4096 bytes
    result = _lean(lean_engine_dir)
    assert result["backend"] == "created", result
    kind, message = result["open"]
    assert kind == "BuildError" and "\n" not in message
    assert "unet/model.plan" in message and (
        f"sd-build --engine {lean_engine_dir} --component unet" in message
    ), message


def test_lean_runtime_refuses_a_corrupt_plan_without_crashing(lean_engine_dir, lean_trt_api):
    """Measured: a lean Runtime whose CUDA initialization failed crashes (SIGSEGV) in
    deserialize_cuda_engine and when it is destroyed. The backend must notice the failure
    and refuse in one line naming the plan; on a GPU machine TensorRT itself refuses the
    corrupt plan, and the line says how to rebuild it."""
    version = lean_trt_api["version"]
    _write_plan(lean_engine_dir, "unet", b"\0corrupt plan\0" * 8, version, 8 * 14)
    result = _lean(lean_engine_dir)
    assert result["backend"] == "created", result  # the runtime is made when a plan loads
    kind, message = result["open"]
    assert kind == "BuildError" and "\n" not in message and "unet/model.plan" in message
    if "CUDA" not in message:  # a GPU: TensorRT read the plan and refused it
        assert "TensorRT could not load unet/model.plan" in message, message
        assert f"sd-build --engine {lean_engine_dir} --component unet" in message


def test_stand_ins_define_every_entry_point_the_bindings_import(trt_stand_ins):
    """The bindings' undefined C symbols (nm) are all defined by the stand-ins."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm (binutils) to list the bindings' symbols")
    spec = importlib.util.find_spec("tensorrt_bindings")
    library = Path(spec.submodule_search_locations[0]) / "tensorrt.so"
    listed = subprocess.run(
        [nm, "-D", "--undefined-only", str(library)], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    wanted = {
        line.split()[-1]
        for line in listed
        if line.split()[0] == "U"  # strong references only ('w' weak ones may stay unbound)
        and "@" not in line
        and not line.split()[-1].startswith(("Py", "_Py", "dl"))
    }
    defined = subprocess.run(
        [nm, "-D", "--defined-only", *[str(trt_stand_ins / n) for n in STAND_INS]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    missing = sorted(s for s in wanted if f" T {s}" not in defined)
    assert len(wanted) >= 9 and not missing, missing
