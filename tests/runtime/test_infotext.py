"""A1111 v1.6.0 infotext: exact text, our reader, and an independent reader (sd-parsers)."""

from __future__ import annotations

import pytest
from PIL import Image, PngImagePlugin

from sd_deploy.errors import RequestError
from sd_deploy.runtime.infotext import (
    SAMPLER_DISPLAY_NAMES,
    format_infotext,
    generation_fields,
    model_display_name,
    parse_infotext,
    sampler_from_display,
)

SD15_SHA256 = "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"


def _sd15_text(**overrides) -> str:
    kw = dict(
        steps=20,
        sampler="dpmpp_2m_karras",
        guidance=7.0,
        seed=1234,
        width=512,
        height=768,
        model_sha256=SD15_SHA256,
        model=model_display_name("/models/v1-5-pruned-emaonly.safetensors"),
        clip_skip=2,
    )
    kw.update(overrides)
    return format_infotext(
        "a (red:1.3) circle, [blurry]", "lowres, bad anatomy", generation_fields(**kw)
    )


def test_exact_a1111_text():
    assert _sd15_text() == (
        "a (red:1.3) circle, [blurry]\n"
        "Negative prompt: lowres, bad anatomy\n"
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2"
    )


def test_img2img_and_defaults():
    text = format_infotext(
        "cat",
        "",
        generation_fields(
            steps=30, sampler="euler_a", guidance=7.5, seed=5, width=64, height=64, strength=0.75
        ),
    )
    assert text == "cat\nSteps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 5, Size: 64x64, " + (
        "Denoising strength: 0.75"
    )


def test_quoting_and_extras():
    fields = generation_fields(
        steps=1,
        sampler="euler",
        guidance=1.0,
        seed=0,
        width=8,
        height=8,
        model="my, model",
        lora_hashes={"detail": "7c6bad76eb54abcdef", "style": "0123456789abcdef"},
        emphasis=False,
    )
    text = format_infotext("p", "", fields)
    assert text.endswith(
        'Model: "my, model", Lora hashes: "detail: 7c6bad76eb54, style: 0123456789ab", '
        "Emphasis: None"
    )
    parsed = parse_infotext(text)
    assert parsed.params["Model"] == "my, model"
    assert parsed.params["Lora hashes"] == "detail: 7c6bad76eb54, style: 0123456789ab"
    assert parsed.emphasis is False


def test_parse_round_trip():
    p = parse_infotext(_sd15_text())
    assert p.prompt == "a (red:1.3) circle, [blurry]"
    assert p.negative_prompt == "lowres, bad anatomy"
    assert (p.steps, p.sampler, p.guidance, p.seed) == (20, "dpmpp_2m_karras", 7.0, 1234)
    assert p.size == (512, 768) and p.clip_skip == 2 and p.strength is None
    assert p.params["Model hash"] == "6ce0161689"
    assert p.emphasis is True


def test_parse_multiline_prompts_and_no_params():
    text = "line one\nline two\nNegative prompt: bad\nworse\nSteps: 4, Sampler: DDIM, Seed: 3"
    p = parse_infotext(text)
    assert (p.prompt, p.negative_prompt, p.sampler) == ("line one\nline two", "bad\nworse", "ddim")
    bare = parse_infotext("just a prompt")
    assert bare.prompt == "just a prompt" and bare.params == {} and bare.steps is None


def test_newer_a1111_schedule_type():
    text = "x\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1"
    assert parse_infotext(text).sampler == "dpmpp_2m_karras"
    text = "x\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1"
    assert parse_infotext(text).sampler == "euler_a"
    assert sampler_from_display("DPM++ 2M", "Exponential") is None
    with pytest.raises(RequestError, match="DPM\\+\\+ SDE Karras"):
        _ = parse_infotext("x\nSteps: 20, Sampler: DPM++ SDE Karras, CFG scale: 7, Seed: 1").sampler


def test_every_sampler_name_round_trips():
    for name, display in SAMPLER_DISPLAY_NAMES.items():
        assert sampler_from_display(display) == name


def test_sd_parsers_reads_our_png(tmp_path):
    sd_parsers = pytest.importorskip("sd_parsers", reason="sd-parsers (dev extra) not installed")
    path = tmp_path / "img.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", _sd15_text())
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)

    prompt_info = sd_parsers.ParserManager().parse(path)
    assert prompt_info is not None
    assert prompt_info.generator.name == "AUTOMATIC1111"
    assert prompt_info.full_prompt == "a (red:1.3) circle, [blurry]"
    assert prompt_info.full_negative_prompt == "lowres, bad anatomy"
    (sampler,) = prompt_info.samplers
    assert sampler.name == "DPM++ 2M Karras"
    assert sampler.parameters["steps"] == "20"
    assert sampler.parameters["cfg_scale"] == "7"
    assert sampler.parameters["seed"] == "1234"
    assert sampler.model.hash == "6ce0161689"
    assert sampler.model.name == "v1-5-pruned-emaonly"
    assert prompt_info.metadata["Size"] == "512x768"
    assert prompt_info.metadata["Clip skip"] == "2"


def test_request_fields():
    p = parse_infotext(_sd15_text())
    fields = p.request_fields()
    assert fields == {
        "prompt": "a (red:1.3) circle, [blurry]",
        "negative_prompt": "lowres, bad anatomy",
        "steps": 20,
        "sampler": "dpmpp_2m_karras",
        "guidance": 7.0,
        "seed": 1234,
        "width": 512,
        "height": 768,
        "clip_skip": 2,
    }
    odd = parse_infotext("x\nSteps: 2, Sampler: Heun, CFG scale: 7, Seed: 1")
    with pytest.raises(RequestError, match="Heun"):
        odd.request_fields()
    assert "sampler" not in odd.request_fields(skip={"sampler"})  # not read when given
