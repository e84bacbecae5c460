"""The ONNX Runtime backend's session settings and lifetime."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest

from sd_deploy.engine_dir.manifest import read_manifest
from sd_deploy.errors import UserError
from sd_deploy.runtime import BackendOptions
from sd_deploy.runtime.backends import select_backend
from sd_deploy.runtime.backends.onnxruntime import ARENA_SHRINKAGE, OnnxRuntimeBackend


@pytest.fixture(scope="module")
def manifest(tiny_engine_fp32):
    return read_manifest(tiny_engine_fp32)


def test_sessions_use_the_threads_asked_for_and_the_cpu_arena(tiny_engine_fp32, manifest):
    backend, reason = select_backend(
        "onnxruntime-cpu", tiny_engine_fp32, manifest, BackendOptions(threads=1)
    )
    assert reason == "requested --backend onnxruntime-cpu"
    session = backend.open(tiny_engine_fp32, manifest.components["text_encoder"])
    options = session.session.get_session_options()
    assert options.intra_op_num_threads == 1
    # Without the arena every large activation is a fresh mmap and page faults each call.
    assert options.enable_cpu_mem_arena is True
    session.close()
    assert session.session is None  # the InferenceSession, and its weights, are released


def test_bad_thread_count_is_refused(tiny_engine_fp32, manifest):
    with pytest.raises(UserError, match="threads must be >= 1, got 0"):
        select_backend("auto", tiny_engine_fp32, manifest, BackendOptions(threads=0))


def test_release_scratch_shrinks_the_cpu_arena_after_the_run(tiny_engine_fp32, manifest):
    backend, _ = select_backend("onnxruntime-cpu", tiny_engine_fp32, manifest)
    session = backend.open(tiny_engine_fp32, manifest.components["text_encoder"])
    seen = []
    real_run = session.session.run

    def spy(names, feeds, run_options=None):
        seen.append(run_options)
        return real_run(names, feeds, run_options)

    session.session.run = spy
    feeds = {"input_ids": np.zeros((2, 77), np.int32), "clip_skip": np.array([1], np.int32)}
    kept = session.run(feeds)["text_embeddings"]
    # ONNX Runtime refuses the shrink option outright when there is no CPU arena.
    released = session.run(feeds, release_scratch=True)["text_embeddings"]
    np.testing.assert_array_equal(kept, released)
    assert seen[0] is None
    assert seen[1].get_run_config_entry(ARENA_SHRINKAGE) == "cpu:0"


def test_gpu_providers_shrink_no_cpu_arena(monkeypatch):
    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: gpu)
    assert OnnxRuntimeBackend("cuda").release_options is None
    assert OnnxRuntimeBackend("cpu").release_options is not None
