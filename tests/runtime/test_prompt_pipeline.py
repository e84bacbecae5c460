"""Prompts end to end on ONNX Runtime: long prompts, emphasis, clip skip, A1111 infotext.

Uses the tiny preset's fp32 export (tests/conftest.py), whose UNet takes a context of
77..231 tokens and whose text encoder has the run-time clip_skip input."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from sd_deploy.errors import RequestError  # noqa: E402
from sd_deploy.runtime import GenerationRequest, Pipeline  # noqa: E402

# Single-token words: 150 of them are 150 tokens, 2 chunks, no comma to break at.
WORDS = ["red", "blue", "green", "circle", "square", "star", "small", "big", "on", "the"]
LONG = " ".join(WORDS[i % len(WORDS)] for i in range(150))
FIRST_CHUNK = " ".join(LONG.split()[:75])


@pytest.fixture(scope="module")
def pipe(tiny_engine_fp32):
    with Pipeline(tiny_engine_fp32, backend="onnxruntime") as p:
        yield p


def _spy_unet_context(pipe, monkeypatch) -> list[tuple[int, ...]]:
    seen: list[tuple[int, ...]] = []
    run = pipe._run

    def spy(name, timings, last, inputs):
        if name == "unet":
            seen.append(tuple(inputs["encoder_hidden_states"].shape))
        return run(name, timings, last, inputs)

    monkeypatch.setattr(pipe, "_run", spy)
    return seen


def test_engine_dir_records_the_context_range(pipe):
    unet = pipe.manifest.components["unet"]
    assert unet.shape_ranges.context_length.as_list() == [77, 77, 231]
    assert unet.inputs[2].shape == ["cfg_batch", "context_length", 64]
    assert unet.profile_shapes["encoder_hidden_states"]["max"] == [8, 231, 64]
    assert pipe.max_prompt_chunks == 3
    assert pipe.tokenizer.count_tokens(LONG) == 150


def test_150_token_prompt_gives_a_154_token_context(pipe, monkeypatch):
    seen = _spy_unet_context(pipe, monkeypatch)
    request = GenerationRequest(prompt=LONG, negative_prompt="blurry", steps=2, seed=3)
    long_image = pipe.generate(request).images
    assert set(seen) == {(2, 154, 64)}  # cfg_batch 2: the short negative padded to 2 chunks
    seen.clear()
    short = pipe.generate(
        GenerationRequest(prompt=FIRST_CHUNK, negative_prompt="blurry", steps=2, seed=3)
    ).images
    assert set(seen) == {(2, 77, 64)}
    assert not np.array_equal(long_image, short)  # the second chunk is read, not dropped


def test_emphasis_changes_the_image_and_no_emphasis_reads_brackets(pipe):
    def image(prompt: str, emphasis: bool = True) -> np.ndarray:
        request = GenerationRequest(prompt=prompt, steps=2, seed=5, emphasis=emphasis)
        return pipe.generate(request).images

    plain = image("a red circle")
    assert not np.array_equal(image("a (red:1.5) circle"), plain)
    assert np.array_equal(image("a (red:1.0) circle"), plain)  # weight 1: the same context
    assert not np.array_equal(image("a (red:1.0) circle", emphasis=False), plain)


def test_clip_skip_through_the_graph_matches_transformers(pipe, tiny_models):
    torch = pytest.importorskip("torch")
    ids = pipe.tokenizer.encode(["a red circle", "a blue square"])
    feeds = {"input_ids": ids, "clip_skip": np.array([2], np.int32)}
    got = pipe.run_component("text_encoder", feeds)["text_embeddings"]
    encoder = tiny_models.text_encoder.eval()
    with torch.no_grad():
        out = encoder.model(input_ids=torch.from_numpy(ids).long(), output_hidden_states=True)
        want = encoder.final_layer_norm(out.hidden_states[-2]).numpy()
        last = out.last_hidden_state.numpy()
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel <= 1e-5
    assert np.linalg.norm(got - last) / np.linalg.norm(last) > 1e-2
    feeds["clip_skip"] = np.array([1], np.int32)
    one = pipe.run_component("text_encoder", feeds)["text_embeddings"]
    assert np.linalg.norm(one - last) / np.linalg.norm(last) <= 1e-5


def test_clip_skip_requests(pipe):
    base = dict(prompt="a red circle", steps=2, seed=1)
    skip2 = pipe.generate(GenerationRequest(**base, clip_skip=2))
    assert skip2.parameters[0].clip_skip == 2
    assert "Clip skip: 2" in skip2.parameters[0].infotext()
    one = pipe.generate(GenerationRequest(**base))
    assert "Clip skip" not in one.parameters[0].infotext()
    assert not np.array_equal(skip2.images, one.images)
    with pytest.raises(RequestError, match="more than the text encoder's 2 layers"):
        pipe.validate(GenerationRequest(**base, clip_skip=3))
    with pytest.raises(RequestError, match="clip_skip must be an integer"):
        pipe.validate(GenerationRequest(**base, clip_skip=0))
    assert pipe.validate(GenerationRequest(**base, clip_skip=2)).batch_key() != (
        pipe.validate(GenerationRequest(**base)).batch_key()
    )


def test_infotext_is_a1111s(pipe):
    result = pipe.generate(
        GenerationRequest(prompt="a (red) circle", negative_prompt="blurry", steps=2, seed=7)
    )
    text = result.parameters[0].infotext()
    guidance = pipe.manifest.scheduler["default_guidance"]
    cfg = str(int(guidance)) if float(guidance).is_integer() else str(guidance)
    sampler = {"dpmpp_2m_karras": "DPM++ 2M Karras"}[result.parameters[0].sampler]
    assert text == (
        f"a (red) circle\nNegative prompt: blurry\nSteps: 2, Sampler: {sampler}, "
        f"CFG scale: {cfg}, Seed: 7, Size: 64x64, Model: tiny"
    )


def _copy_with_manifest(src, dst, edit):
    import json
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("ort_cpu_cache"))
    path = dst / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return dst


def test_old_manifest_without_the_new_fields_still_loads(tiny_engine_fp32, tmp_path, caplog):
    def strip(data):
        for field in ("clip_skip_max", "fixed_text_layer"):
            data["model"].pop(field)
        for spec in data["components"].values():
            spec["shape_ranges"].pop("context_length")

    old = _copy_with_manifest(tiny_engine_fp32, tmp_path / "old", strip)
    with Pipeline(old, backend="onnxruntime") as p:
        assert p.max_prompt_chunks == 1 and p.manifest.model.clip_skip_max == 1
        with caplog.at_level("WARNING", logger="sd_deploy"):
            result = p.generate(GenerationRequest(prompt=LONG, steps=1, seed=0))
        assert "needs 2 chunks" in caplog.text  # cut to the one chunk such a UNet takes
        assert result.images.shape == (1, 64, 64, 3)
        with pytest.raises(RequestError, match="more than the text encoder's 1 layers"):
            p.validate(GenerationRequest(prompt="x", clip_skip=2))


def test_fixed_text_layer_ignores_clip_skip(tiny_engine_fp32, tmp_path, caplog):
    def fixed(data):
        data["model"]["fixed_text_layer"] = True

    sd2_like = _copy_with_manifest(tiny_engine_fp32, tmp_path / "sd2", fixed)
    with Pipeline(sd2_like, backend="onnxruntime") as p:
        with caplog.at_level("WARNING", logger="sd_deploy"):
            resolved = p.validate(GenerationRequest(prompt="x", clip_skip=2))
        assert resolved.clip_skip == 1 and "clip skip 2 ignored" in caplog.text


def test_sd2_graphs_have_no_clip_skip_input():
    pytest.importorskip("torch")
    from sd_deploy.exporter.components import clip_skip_max, component_graphs
    from sd_deploy.models import build_random, get_preset

    models = build_random(get_preset("tiny-v"), seed=0)
    names = [i.name for i in component_graphs(models)["text_encoder"].inputs]
    assert names == ["input_ids"] and clip_skip_max(models) == 1
