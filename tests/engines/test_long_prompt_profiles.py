"""Long prompts through the TensorRT profile code, without TensorRT: the exported UNet's
profile covers a 77..231-token context, a session over fake engines runs a 154-token one,
and requests past the profile (or on a static plan) are refused before any GPU work."""

from __future__ import annotations

import numpy as np
import pytest
from test_tensorrt_backend import FAKE_TRT, FakeCuda, FakeEngine, expected

from sd_deploy.engine_dir.manifest import read_manifest
from sd_deploy.engine_dir.shapes import (
    max_context_chunks,
    request_outside_profiles,
    wanted_profile,
)
from sd_deploy.errors import RequestError
from sd_deploy.runtime.backends.tensorrt_session import TensorRTSession


@pytest.fixture(scope="module")
def exported(tiny_engine_fp16):
    manifest = read_manifest(tiny_engine_fp16)
    return tiny_engine_fp16, manifest, manifest.components["unet"]


def _feeds(context: int, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(context)
    return {
        "sample": rng.standard_normal((batch, 4, 8, 8)).astype(np.float16),
        "timestep": np.full((batch,), 5.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, context, 64)).astype(np.float16),
    }


def test_exported_profile_covers_long_prompts(exported):
    _, _, unet = exported
    profile = wanted_profile(unet, 8)
    ehs = profile["encoder_hidden_states"]
    assert (ehs["min"], ehs["opt"], ehs["max"]) == ([1, 77, 64], [2, 77, 64], [8, 231, 64])
    assert max_context_chunks(unet.shape_ranges) == 3
    static = wanted_profile(unet, 8, static=True)["encoder_hidden_states"]
    assert static["min"] == static["max"] == [2, 77, 64]


def test_session_runs_a_154_token_context(exported):
    engine_dir, _, unet = exported
    cuda = FakeCuda()
    engine = FakeEngine(cuda, wanted_profile(unet, 8))
    session = TensorRTSession(unet, engine, FAKE_TRT, cuda, engine_dir)
    for context in (77, 154, 231):
        feeds = _feeds(context)
        np.testing.assert_array_equal(session.run(feeds)["model_output"], expected(feeds))
    assert engine.contexts[0].shapes["encoder_hidden_states"] == (2, 231, 64)
    with pytest.raises(RequestError, match=r"encoder_hidden_states shape \[2, 308, 64\]"):
        session.run(_feeds(308))


def test_requests_outside_the_plan_profile(exported):
    engine_dir, manifest, unet = exported
    dynamic = {"unet": wanted_profile(unet, 8)}
    fits = request_outside_profiles(
        manifest, dynamic, 1, 64, 64, True, str(engine_dir), context_length=154
    )
    assert fits == ""
    static = {"unet": wanted_profile(unet, 8, static=True)}
    problem = request_outside_profiles(
        manifest, static, 1, 64, 64, True, str(engine_dir), context_length=154
    )
    assert "a 154-token prompt context" in problem and "[2, 154, 64]" in problem


def test_old_engine_dirs_have_one_chunk(engine_dir):
    """The synthetic engine dir is shaped like one exported before long prompts."""
    manifest = read_manifest(engine_dir)
    unet = manifest.components["unet"]
    assert unet.shape_ranges.context_length.as_list() == [77, 77, 77]
    assert max_context_chunks(unet.shape_ranges) == 1
    assert manifest.model.clip_skip_max == 1 and manifest.model.fixed_text_layer is False
