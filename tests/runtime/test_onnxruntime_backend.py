"""The ONNX Runtime backend's session settings and lifetime."""

from __future__ import annotations

import pytest

from sd_deploy.errors import UserError
from sd_deploy.runtime.backends import select_backend
from sd_deploy.runtime.manifest import read_manifest


@pytest.fixture(scope="module")
def manifest(tiny_engine_fp32):
    return read_manifest(tiny_engine_fp32)


def test_sessions_use_the_threads_asked_for_and_no_cpu_arena(tiny_engine_fp32, manifest):
    backend, reason = select_backend("onnxruntime-cpu", tiny_engine_fp32, manifest, threads=1)
    assert reason == "requested --backend onnxruntime-cpu"
    session = backend.open(tiny_engine_fp32, manifest.components["text_encoder"])
    options = session.session.get_session_options()
    assert options.intra_op_num_threads == 1
    # The arena would keep each component's activation peak allocated between calls.
    assert options.enable_cpu_mem_arena is False
    session.close()
    assert session.session is None  # the InferenceSession, and its weights, are released


def test_bad_thread_count_is_refused(tiny_engine_fp32, manifest):
    with pytest.raises(UserError, match="threads must be >= 1, got 0"):
        select_backend("auto", tiny_engine_fp32, manifest, threads=0)
