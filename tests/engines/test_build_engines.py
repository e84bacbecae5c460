"""build_engines without TensorRT: flags, errors, skipping, and the Polygraphy call sequence.

The library boundary is replaced by fake `tensorrt` and `polygraphy` modules in
sys.modules that record their calls and write a fake plan, so everything but the
real engine build is exercised here.
"""

from __future__ import annotations

import contextlib
import json
import sys
import types
from pathlib import Path

import pytest

from sd_deploy.engine_dir.manifest import read_manifest
from sd_deploy.engine_dir.plans import plan_metadata_path, plan_path, read_metadata
from sd_deploy.engines import BuildResult, build_engines, parse_workspace
from sd_deploy.engines.build import resolve_components
from sd_deploy.errors import BuildError, EngineDirError
from sd_deploy.runtime.backends import tensorrt_cuda as trt_cuda


class FakePolygraphyError(Exception):
    pass


class FakeProfile(dict):
    def add(self, name, min, opt, max):  # noqa: A002 - Polygraphy's parameter names
        self[name] = {"min": list(min), "opt": list(opt), "max": list(max)}
        return self


class FakeLogger:
    WARNING = 30

    def __init__(self) -> None:
        self.levels: list[int] = []

    @contextlib.contextmanager
    def verbosity(self, severity):
        self.levels.append(severity)
        yield


class FakeLibraries:
    """Fake tensorrt + polygraphy modules that record every call."""

    def __init__(self, version: str = "10.13.0.35") -> None:
        self.calls: list[tuple] = []
        self.fail: Exception | None = None
        self.plan_bytes = b"fake serialized engine"
        self.logger = FakeLogger()
        self.trt = types.ModuleType("tensorrt")
        self.trt.__version__ = version
        self.trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        backend = types.ModuleType("polygraphy.backend.trt")
        backend.Profile = FakeProfile
        backend.NetworkFromOnnxPath = self.network_from_onnx_path
        backend.CreateConfig = self.create_config
        backend.engine_from_network = self.engine_from_network
        backend.save_engine = self.save_engine
        exception = types.ModuleType("polygraphy.exception")
        exception.PolygraphyException = FakePolygraphyError
        logger = types.ModuleType("polygraphy.logger")
        logger.G_LOGGER = self.logger
        self.modules = {
            "tensorrt": self.trt,
            "polygraphy": types.ModuleType("polygraphy"),
            "polygraphy.backend": types.ModuleType("polygraphy.backend"),
            "polygraphy.backend.trt": backend,
            "polygraphy.exception": exception,
            "polygraphy.logger": logger,
        }

    def network_from_onnx_path(self, path, **kwargs):
        self.calls.append(("NetworkFromOnnxPath", path, kwargs))
        return ("network", path)

    def create_config(self, **kwargs):
        self.calls.append(("CreateConfig", kwargs))
        return ("config", kwargs)

    def engine_from_network(self, network, config=None, save_timing_cache=None):
        self.calls.append(("engine_from_network", network, config, save_timing_cache))
        if self.fail is not None:
            raise self.fail
        if save_timing_cache:
            Path(save_timing_cache).write_bytes(b"timing cache")
        return ("engine", network[1])

    def save_engine(self, engine, path):
        self.calls.append(("save_engine", engine, path))
        Path(path).write_bytes(self.plan_bytes + engine[1].encode())
        return engine

    def named(self, name):
        return [c for c in self.calls if c[0] == name]


@pytest.fixture
def fakes(monkeypatch, env):
    libs = FakeLibraries()
    for name, module in libs.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(trt_cuda, "current_environment", lambda cuda=None: dict(env))
    return libs


def build(engine_dir, **kwargs):
    kwargs.setdefault("progress", False)
    return build_engines(engine_dir, **kwargs)


# ---- pure helpers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4G", 4 << 30),
        ("512M", 512 << 20),
        ("512m", 512 << 20),
        ("64K", 64 << 10),
        ("1.5G", 3 << 29),
        ("2GiB", 2 << 30),
        ("8GB", 8 << 30),
        ("1073741824", 1 << 30),
        (1 << 20, 1 << 20),
        (None, None),
    ],
)
def test_parse_workspace(text, size):
    assert parse_workspace(text) == size


@pytest.mark.parametrize("text", ["", "4X", "G", "-1G", "0", "four gigs", "4 G B"])
def test_parse_workspace_errors(text):
    with pytest.raises(BuildError) as info:
        parse_workspace(text)
    assert "--workspace" in str(info.value) and "\n" not in str(info.value)


def test_resolve_components(make_engine, tmp_path):
    root = make_engine(tmp_path / "e", components=("text_encoder", "unet", "vae_decoder"))
    manifest = read_manifest(root)
    assert resolve_components(["all"], manifest, root) == ["text_encoder", "unet", "vae_decoder"]
    assert resolve_components(["unet", "all", "unet"], manifest, root)[0] == "unet"
    with pytest.raises(BuildError, match="has no vae_encoder graph .*sd-export --component"):
        resolve_components(["vae_encoder"], manifest, root)
    with pytest.raises(BuildError, match="unknown component 'vae'"):
        resolve_components(["vae"], manifest, root)


# ---- user errors come before any library import -----------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"components": ["vae"]}, BuildError, "unknown component"),
        ({"batch": "1:1:16"}, BuildError, "outside the exported range"),
        ({"height": "33"}, BuildError, "not a multiple of 8"),
        ({"workspace": "lots"}, BuildError, "--workspace"),
        ({"optimization_level": -1}, BuildError, "--optimization-level"),
    ],
)
def test_flag_errors_are_one_line(engine_dir, kwargs, error, words, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(error) as info:
        build(engine_dir, **kwargs)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_engine_dir_problems(tmp_path):
    with pytest.raises(EngineDirError, match="does not exist"):
        build(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineDirError, match="no manifest.json"):
        build(tmp_path / "empty")


def test_tensorrt_missing_says_how_to_install(engine_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(BuildError) as info:
        build(engine_dir)
    message = str(info.value)
    assert "tensorrt library is not installed" in message
    assert "pip install 'sd-deploy[trt]' on a machine with an NVIDIA GPU" in message
    assert not plan_path(engine_dir, "unet").exists()


def test_polygraphy_missing(engine_dir, fakes, monkeypatch):
    monkeypatch.setitem(sys.modules, "polygraphy.backend.trt", None)
    with pytest.raises(BuildError, match="polygraphy is not installed .*sd-deploy\\[trt\\]"):
        build(engine_dir)


def test_no_gpu(engine_dir, fakes, monkeypatch):
    def no_gpu(cuda=None):
        raise BuildError(
            "no CUDA GPU is visible (check the NVIDIA driver and CUDA_VISIBLE_DEVICES)"
        )

    monkeypatch.setattr(trt_cuda, "current_environment", no_gpu)
    with pytest.raises(BuildError, match="no CUDA GPU"):
        build(engine_dir)
    assert fakes.calls == []


# ---- the build itself, through the fakes ------------------------------------------------


def test_builds_every_component_strongly_typed(engine_dir, fakes, env):
    results = build(engine_dir, optimization_level=3, workspace="4G")
    assert [r.component for r in results] == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    assert all(isinstance(r, BuildResult) and r.status == "built" for r in results)
    assert results[1].reason == "no plan at unet/model.plan"
    assert results[1].plan == plan_path(engine_dir, "unet")

    networks = fakes.named("NetworkFromOnnxPath")
    assert [c[1] for c in networks] == [
        str(engine_dir / f"{c}/model.onnx")
        for c in ("text_encoder", "unet", "vae_decoder", "vae_encoder")
    ]
    assert all(c[2] == {"strongly_typed": True} for c in networks)

    configs = [c[1] for c in fakes.named("CreateConfig")]
    for kwargs in configs:
        assert not any("fp16" in key or "tf32" in key for key in kwargs)
        assert kwargs["builder_optimization_level"] == 3
        assert kwargs["memory_pool_limits"] == {"WORKSPACE": 4 << 30}
    unet_profile = configs[1]["profiles"][0]
    assert unet_profile == read_manifest(engine_dir).components["unet"].profile_shapes

    cache = engine_dir / "tensorrt_timing.cache"
    assert configs[0]["load_timing_cache"] is None  # no cache file before the first build
    assert configs[1]["load_timing_cache"] == str(cache)  # the first build saved it
    assert all(c[3] == str(cache) for c in fakes.named("engine_from_network"))
    assert fakes.logger.levels == [30] * 4  # Polygraphy's INFO chatter muted

    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        plan = plan_path(engine_dir, name)
        assert (
            plan.read_bytes() == fakes.plan_bytes + str(engine_dir / name / "model.onnx").encode()
        )
        meta = read_metadata(plan_metadata_path(plan))
        assert meta.component == name
        assert meta.tensorrt_version == env["trt_version"]
        assert meta.gpu_name == env["gpu_name"] and meta.compute_capability == "9.0"
        assert meta.plan_bytes == plan.stat().st_size
        assert meta.onnx_sha256 == read_manifest(engine_dir).components[name].onnx_sha256
        assert meta.build_flags["strongly_typed"] is True
        assert meta.build_flags["workspace_bytes"] == 4 << 30
        assert meta.build_flags["optimization_level"] == 3
        assert meta.sd_deploy_version and meta.built_at
        assert not [p for p in plan.parent.iterdir() if ".tmp-" in p.name]


def test_defaults_leave_trt_defaults(engine_dir, fakes):
    build(engine_dir, components=["unet"])
    kwargs = fakes.named("CreateConfig")[0][1]
    assert kwargs["builder_optimization_level"] is None
    assert kwargs["memory_pool_limits"] is None


def test_up_to_date_plans_are_skipped(engine_dir, fakes):
    build(engine_dir)
    fakes.calls.clear()
    results = build(engine_dir)
    assert [r.status for r in results] == ["skipped"] * 4
    assert results[0].reason == "up to date on NVIDIA H100 80GB HBM3"
    assert fakes.calls == []


def test_skip_plan_written_by_hand(engine_dir, fakes, env):
    # A plan + metadata written the way sd-build writes them is up to date.
    from sd_deploy.engine_dir.plans import PlanMetadata, write_metadata

    spec = read_manifest(engine_dir).components["vae_decoder"]
    plan = plan_path(engine_dir, "vae_decoder")
    plan.write_bytes(b"0123456789")
    write_metadata(
        plan_metadata_path(plan),
        PlanMetadata(
            component="vae_decoder",
            tensorrt_version=env["trt_version"],
            gpu_name=env["gpu_name"],
            compute_capability=env["compute_capability"],
            onnx_sha256=spec.onnx_sha256,
            precision="fp16",
            profile=spec.profile_shapes,
            shape_ranges=spec.shape_ranges.to_json(),
            plan_bytes=10,
        ),
    )
    [result] = build(engine_dir, components=["vae_decoder"])
    assert result.status == "skipped"
    assert fakes.calls == []


def test_force_rebuilds(engine_dir, fakes):
    build(engine_dir, components=["unet"])
    [result] = build(engine_dir, components=["unet"], force=True)
    assert (result.status, result.reason) == ("built", "forced (--force)")


def test_changed_onnx_rebuilds(engine_dir, fakes):
    build(engine_dir, components=["unet"])
    manifest_file = engine_dir / "manifest.json"
    data = json.loads(manifest_file.read_text())
    (engine_dir / "unet/model.onnx").write_bytes(b"re-exported graph")
    data["components"]["unet"]["onnx_sha256"] = "f" * 64
    manifest_file.write_text(json.dumps(data))
    [result] = build(engine_dir, components=["unet"])
    assert result.status == "built"
    assert "ONNX graph unet/model.onnx changed" in result.reason
    assert read_metadata(plan_metadata_path(plan_path(engine_dir, "unet"))).onnx_sha256 == "f" * 64


def test_other_tensorrt_or_gpu_rebuilds(engine_dir, fakes, env, monkeypatch):
    build(engine_dir, components=["unet"])
    monkeypatch.setattr(
        trt_cuda, "current_environment", lambda cuda=None: {**env, "trt_version": "11.0.0"}
    )
    [result] = build(engine_dir, components=["unet"])
    assert "TensorRT 10.13.0.35 but this is TensorRT 11.0.0" in result.reason
    monkeypatch.setattr(
        trt_cuda,
        "current_environment",
        lambda cuda=None: {**env, "trt_version": "11.0.0", "gpu_name": "NVIDIA L4"},
    )
    [result] = build(engine_dir, components=["unet"])
    assert "this GPU is NVIDIA L4" in result.reason


def test_new_flags_rebuild_with_their_profile(engine_dir, fakes):
    build(engine_dir, components=["unet"])
    [result] = build(engine_dir, components=["unet"], batch="1:1:2", height="64", width="64")
    assert result.status == "built" and result.reason.startswith("profile differs")
    profile = fakes.named("CreateConfig")[-1][1]["profiles"][0]
    assert profile["sample"] == {"min": [1, 4, 8, 8], "opt": [2, 4, 8, 8], "max": [4, 4, 8, 8]}
    meta = read_metadata(plan_metadata_path(plan_path(engine_dir, "unet")))
    assert meta.shape_ranges == {
        "batch": [1, 1, 2],
        "height": [64, 64, 64],
        "width": [64, 64, 64],
        "context_length": [77, 77, 77],
    }
    assert meta.build_flags["batch"] == "1:1:2"
    # The same flags again: up to date.
    [again] = build(engine_dir, components=["unet"], batch="1:1:2", height="64", width="64")
    assert again.status == "skipped"


def test_static_build(engine_dir, fakes):
    [result] = build(engine_dir, components=["unet"], static=True)
    profile = fakes.named("CreateConfig")[-1][1]["profiles"][0]
    assert profile["sample"] == {"min": [2, 4, 8, 8], "opt": [2, 4, 8, 8], "max": [2, 4, 8, 8]}
    meta = read_metadata(plan_metadata_path(result.plan))
    assert meta.build_flags["static"] is True


def test_fp32_graph_warns(make_engine, tmp_path, fakes, capsys):
    root = make_engine(tmp_path / "fp32", precision="fp32")
    results = build(root, components=["unet"], progress=True)
    [warning] = results[0].warnings
    assert "unet graph is fp32" in warning and "sd-export --fp16" in warning
    assert "\n" not in warning
    assert "sd-export --fp16" in capsys.readouterr().err
    assert read_metadata(plan_metadata_path(results[0].plan)).precision == "fp32"
    assert not build(root, components=["unet"])[0].warnings  # skipped: nothing built


def test_build_failure_is_one_line_and_keeps_the_old_plan(engine_dir, fakes):
    build(engine_dir, components=["unet"])
    plan = plan_path(engine_dir, "unet")
    old_plan, old_meta = plan.read_bytes(), plan_metadata_path(plan).read_text()
    fakes.fail = FakePolygraphyError("Failed to parse ONNX model\nIn node 12 (Conv): bad")
    with pytest.raises(BuildError) as info:
        build(engine_dir, components=["unet"], force=True)
    assert str(info.value) == (
        "building unet from unet/model.onnx failed: Failed to parse ONNX model"
    )
    assert plan.read_bytes() == old_plan and plan_metadata_path(plan).read_text() == old_meta
    assert not [p for p in plan.parent.iterdir() if ".tmp-" in p.name]


def test_tensorrt_runtime_error_is_a_build_error(engine_dir, fakes):
    fakes.fail = RuntimeError("out of memory")
    with pytest.raises(BuildError, match="building text_encoder .* failed: out of memory"):
        build(engine_dir)
    assert not plan_path(engine_dir, "text_encoder").exists()


def test_custom_timing_cache(engine_dir, fakes, tmp_path):
    cache = tmp_path / "caches" / "h100.cache"
    build(engine_dir, components=["unet", "vae_decoder"], timing_cache=cache)
    assert cache.read_bytes() == b"timing cache"
    loads = [c[1]["load_timing_cache"] for c in fakes.named("CreateConfig")]
    assert loads == [None, str(cache)]
    assert not (engine_dir / "tensorrt_timing.cache").exists()


def test_progress_bar_goes_to_stderr(engine_dir, fakes, capsys):
    build(engine_dir, components=["unet"], progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "unet" in captured.err


def test_result_lines(engine_dir, fakes):
    [built] = build(engine_dir, components=["unet"])
    line = str(built)
    assert line.startswith("unet          built in ") and "(no plan at unet/model.plan)" in line
    assert line.endswith(f"-> {engine_dir / 'unet' / 'model.plan'}")
    [skipped] = build(engine_dir, components=["unet"])
    assert str(skipped).startswith("unet          skipped (up to date on NVIDIA H100")


def test_refittable_builds_refittable_plans(engine_dir, fakes):
    """sd-build --refittable (run-time LoRAs): CreateConfig(refittable=True), recorded in the
    plan's metadata; a fresh plan built without it is rebuilt, one built with it is kept."""
    from sd_deploy.engine_dir.plans import read_metadata

    build(engine_dir, components=["unet"])
    assert "refittable" not in fakes.named("CreateConfig")[-1][1]
    [result] = build(engine_dir, components=["unet"], refittable=True)
    assert (result.status, result.reason) == ("built", "the plan is not refittable (--refittable)")
    assert fakes.named("CreateConfig")[-1][1]["refittable"] is True
    metadata = read_metadata(plan_metadata_path(plan_path(engine_dir, "unet")))
    assert metadata.build_flags["refittable"] is True
    [again] = build(engine_dir, components=["unet"], refittable=True)
    assert again.status == "skipped"
