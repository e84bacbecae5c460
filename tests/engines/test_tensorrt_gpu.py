"""Real TensorRT on a real GPU: build the tiny preset's FP16 plans, run them, and check
them against ONNX Runtime on the same FP16 graphs (relative L2 <= 1e-2 per output).

Skipped, with the reason, wherever tensorrt, cuda-python or a GPU is missing.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

from sd_deploy.engine_dir.manifest import read_manifest
from sd_deploy.errors import BuildError, RequestError
from sd_deploy.metrics import relative_l2

pytestmark = pytest.mark.tensorrt

TOLERANCE = 1e-2


def _unavailable() -> str:
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed"
    if importlib.util.find_spec("polygraphy") is None:
        return "polygraphy is not installed"
    from sd_deploy.runtime.backends.tensorrt_cuda import current_environment

    try:
        current_environment()
    except BuildError as exc:
        return str(exc)
    return ""


REASON = _unavailable()
if REASON:
    pytest.skip(f"needs TensorRT and an NVIDIA GPU: {REASON}", allow_module_level=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_engine_fp16):
    """A writable copy of the tiny fp16 engine dir with all four plans built."""
    from sd_deploy.engines import build_engines

    root = tmp_path_factory.mktemp("trt") / "tiny-fp16"
    shutil.copytree(tiny_engine_fp16, root)
    results = build_engines(root, progress=False)
    assert [r.status for r in results] == ["built"] * 4
    return root


def feeds_for(spec, scale: int, batch: int, size: int, guided: bool, seed: int):
    from sd_deploy.engine_dir import shapes

    values = shapes.symbol_values(batch, size, size, scale, guided)
    rng = np.random.default_rng(seed)
    feeds = {}
    for tensor in spec.inputs:
        shape = shapes.resolve(tensor.shape, values)
        if tensor.name == "input_ids":
            feeds[tensor.name] = rng.integers(0, 49408, size=shape).astype(np.int32)
        elif tensor.name == "timestep":
            feeds[tensor.name] = np.full(shape, 501.0, np.float32)
        elif tensor.name == "images":
            feeds[tensor.name] = rng.uniform(0, 1, size=shape).astype(tensor.dtype)
        else:
            feeds[tensor.name] = rng.standard_normal(shape).astype(tensor.dtype)
    return feeds


def test_rebuild_is_skipped(built):
    from sd_deploy.engines import build_engines

    results = build_engines(built, progress=False)
    assert [r.status for r in results] == ["skipped"] * 4


def test_readiness(built):
    from sd_deploy.runtime.backends import tensorrt_ready

    ok, reason = tensorrt_ready(built, read_manifest(built))
    assert ok, reason
    assert reason.startswith("TensorRT plans are up to date on ")


@pytest.mark.parametrize(
    ("component", "batch", "size", "guided"),
    [
        ("text_encoder", 1, 64, True),
        ("unet", 1, 64, True),
        ("unet", 1, 32, False),
        ("unet", 4, 128, True),
        ("vae_decoder", 1, 64, False),
        ("vae_encoder", 2, 96, False),
    ],
)
def test_fp16_parity_with_onnxruntime(built, component, batch, size, guided):
    from sd_deploy.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from sd_deploy.runtime.backends.tensorrt import TensorRTBackend

    manifest = read_manifest(built)
    spec = manifest.components[component]
    feeds = feeds_for(spec, manifest.model.vae_scale_factor, batch, size, guided, seed=7)
    trt_session = TensorRTBackend(built, manifest).open(built, spec)
    ort_session = OnnxRuntimeBackend("cpu").open(built, spec)
    try:
        got = trt_session.run(feeds)
        want = ort_session.run(feeds)
    finally:
        trt_session.close()
    for output in spec.outputs:
        assert got[output.name].dtype == np.dtype(output.dtype)
        assert got[output.name].shape == want[output.name].shape
        assert np.isfinite(got[output.name]).all()
        error = relative_l2(got[output.name], want[output.name])
        assert error <= TOLERANCE, f"{component} {output.name}: relative L2 {error:.2e}"


def test_unet_steps_reuse_buffers_and_replay_a_cuda_graph(built):
    from sd_deploy.runtime.backends.tensorrt import TensorRTBackend

    manifest = read_manifest(built)
    spec = manifest.components["unet"]
    plain = TensorRTBackend(built, manifest).open(built, spec)
    graphed = TensorRTBackend(built, manifest, cuda_graph=True).open(built, spec)
    try:
        for step in range(3):
            feeds = feeds_for(spec, 8, 2, 64, True, seed=step)
            want = plain.run(feeds)["model_output"]
            got = graphed.run(feeds)["model_output"]
            assert relative_l2(got, want) <= 1e-3, f"step {step}"
        assert getattr(graphed, "graph_ready", False), getattr(graphed, "graph_error", "")
        allocated = graphed.buffers.total_bytes
        graphed.run(feeds_for(spec, 8, 2, 64, True, seed=9))
        assert graphed.buffers.total_bytes == allocated
    finally:
        plain.close()
        graphed.close()


def test_out_of_profile_request_is_refused(built):
    from sd_deploy.runtime.backends.tensorrt import TensorRTBackend

    manifest = read_manifest(built)
    spec = manifest.components["unet"]
    session = TensorRTBackend(built, manifest).open(built, spec)
    try:
        with pytest.raises(RequestError, match="outside the TensorRT plan's profile"):
            session.run(feeds_for(spec, 8, 8, 64, True, seed=0))  # 16 rows > max 8
    finally:
        session.close()


def test_plan_from_another_tensorrt_is_refused(built, tmp_path):
    from sd_deploy.runtime.backends.tensorrt import TensorRTBackend

    root = tmp_path / "copy"
    shutil.copytree(built, root)
    meta_file = root / "unet" / "model.plan.json"
    data = json.loads(meta_file.read_text())
    data["tensorrt_version"] = "1.0.0"
    meta_file.write_text(json.dumps(data))
    manifest = read_manifest(root)
    with pytest.raises(BuildError, match="built with TensorRT 1.0.0 .* --component unet"):
        TensorRTBackend(root, manifest).open(root, manifest.components["unet"])
