"""sd-run with A1111 habits: emphasis, long prompts, --clip-skip, the PNG's infotext read by
an independent parser (sd-parsers), and --from-png making the same bytes again."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("onnxruntime")

from sd_deploy.cli import export_command, run_command  # noqa: E402

WORDS = ["red", "blue", "green", "circle", "square", "star", "small", "big", "on", "the"]
PROMPT = "a (red:1.3) circle, [blurry], " + " ".join(WORDS[i % 10] for i in range(100))
NEGATIVE = "lowres, (bad anatomy:1.2)"


def invoke(command, args):
    return CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)


def _make(tiny_engine_fp32, out, *extra):
    r = invoke(
        run_command,
        [
            "--engine", tiny_engine_fp32, "--backend", "onnxruntime", "--quiet",
            "--out", out, "--overwrite", *extra,
        ],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def first_png(tiny_engine_fp32, tmp_path_factory):
    out = tmp_path_factory.mktemp("png") / "first.png"
    _make(
        tiny_engine_fp32, out, "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
        "--steps", 3, "--seed", 42, "--clip-skip", 2, "--guidance", 5.5,
    )  # fmt: skip
    return out


def test_png_infotext_read_by_sd_parsers(first_png):
    sd_parsers = pytest.importorskip("sd_parsers", reason="sd-parsers (dev extra) not installed")
    info = sd_parsers.ParserManager().parse(first_png)
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    assert info.full_prompt == PROMPT
    assert info.full_negative_prompt == NEGATIVE
    (sampler,) = info.samplers
    assert sampler.name == "DPM++ 2M Karras"
    assert sampler.parameters["steps"] == "3"
    assert sampler.parameters["cfg_scale"] == "5.5"
    assert sampler.parameters["seed"] == "42"
    assert info.metadata["Size"] == "64x64"
    assert info.metadata["Clip skip"] == "2"


def test_from_png_makes_the_same_bytes(tiny_engine_fp32, first_png, tmp_path):
    again = tmp_path / "again.png"
    _make(tiny_engine_fp32, again, "--from-png", first_png)
    assert again.read_bytes() == first_png.read_bytes()


def test_from_png_flags_override(tiny_engine_fp32, first_png, tmp_path):
    other = tmp_path / "other.png"
    _make(tiny_engine_fp32, other, "--from-png", first_png, "--seed", 43)
    text = Image.open(other).info["parameters"]
    assert "Seed: 43" in text and "Clip skip: 2" in text and text.startswith(PROMPT)
    assert other.read_bytes() != first_png.read_bytes()


def test_from_png_of_another_model_warns(tiny_engine_fp32, tmp_path):
    from PIL import PngImagePlugin

    source = tmp_path / "a1111.png"
    info = PngImagePlugin.PngInfo()
    info.add_text(
        "parameters",
        "a blue star\nNegative prompt: ugly\nSteps: 2, Sampler: DPM++ 2M, Schedule type: Karras, "
        "CFG scale: 7, Seed: 9, Size: 64x64, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
        "Denoising strength: 0.5, Version: v1.10.1",
    )
    Image.new("RGB", (8, 8)).save(source, pnginfo=info)
    r = _make(tiny_engine_fp32, tmp_path / "out.png", "--from-png", source)
    assert "v1-5-pruned-emaonly [6ce0161689]" in r.output
    assert "without --init-image this is txt2img" in r.output
    text = Image.open(tmp_path / "out.png").info["parameters"]
    assert text.startswith("a blue star\nNegative prompt: ugly\nSteps: 2, Sampler: DPM++ 2M Karras")


def test_prompt_or_from_png_is_required(tiny_engine_fp32, tmp_path):
    r = invoke(run_command, ["--engine", tiny_engine_fp32, "--out", tmp_path])
    assert r.exit_code == 1 and "--prompt is required (or --from-png IMAGE)" in r.output
    r = invoke(
        run_command,
        ["--engine", tiny_engine_fp32, "--from-png", tmp_path / "none.png", "--out", tmp_path],
    )
    assert r.exit_code == 1 and "does not exist" in r.output


def test_export_context_length_flag_is_checked(tmp_path):
    r = invoke(
        export_command,
        ["--model", "tiny", "--random-weights", "--context-length", "77:100:154",
         "--out", tmp_path / "e"],
    )  # fmt: skip
    assert r.exit_code == 1 and "not a multiple of 77" in r.output
