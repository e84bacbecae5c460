"""The commands users type: happy paths and one-line errors with exit status 1."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from sd_deploy import cli
from sd_deploy.cli import export_command, run_command


def invoke(command, args):
    return CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, fragment):
    assert result.exit_code == 1, result.output
    # Progress notes ("loading ...") may come first; the error is one line, and the last.
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:], result.stderr
    assert "Traceback" not in result.output
    assert fragment in errors[0], errors[0]


def test_export_then_run_writes_pngs_with_parameters(tmp_path):
    out = tmp_path / "engines"
    r = invoke(
        export_command,
        [
            "--model",
            "tiny",
            "--random-weights",
            "--out",
            out,
            "--component",
            "text_encoder",
            "--component",
            "unet",
            "--component",
            "vae_decoder",
            "--height",
            "64",
            "--width",
            "64:64:96",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "unet" in r.stdout and "rel L2" in r.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["components"]) == ["text_encoder", "unet", "vae_decoder"]
    assert manifest["components"]["unet"]["shape_ranges"]["width"] == [64, 64, 96]

    pngs = tmp_path / "pngs"
    args = [
        "--engine",
        out,
        "--prompt",
        "a red circle",
        "--negative-prompt",
        "blurry",
        "--steps",
        "3",
        "--seed",
        "5",
        "--batch",
        "2",
        "--out",
        pngs,
        "--sampler",
        "euler_a",
        "--quiet",
    ]
    r = invoke(run_command, args)
    assert r.exit_code == 0, r.output
    files = sorted(pngs.glob("*.png"))
    assert [f.name for f in files] == ["00001-5.png", "00002-6.png"]
    text = Image.open(files[1]).text["parameters"]
    # A1111's display name of the sampler (sd_deploy.runtime.infotext)
    assert text.startswith("a red circle\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a")
    assert "Seed: 6, Size: 64x64" in text
    # A second run never overwrites earlier images.
    assert invoke(run_command, args).exit_code == 0
    assert len(list(pngs.glob("*.png"))) == 4


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--steps", "0"], "steps must be an integer >= 1"),
        (["--guidance", "-2"], "guidance must be a finite number >= 0"),
        (["--width", "8"], "width 8 is outside the 32..128 the engine dir"),
        (["--sampler", "nope"], "unknown sampler 'nope'; choose one of: ddim, plms"),
        (["--width", "65"], "width 65 is not a multiple of 8"),
        (["--height", "1024"], "height 1024 is outside"),
        (["--init-image", "missing.png"], "init image missing.png does not exist"),
        (["--init-image", "{tmp}/bad.png"], "is not a readable image"),
        (["--init-image", "{tmp}/ok.png", "--strength", "0"], "strength must be in (0, 1]"),
        (["--backend", "magic"], "unknown backend 'magic'"),
        (["--threads", "0"], "threads must be >= 1, got 0"),
    ],
)
def test_run_errors(args, fragment, tmp_path, tiny_engine_fp32):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = invoke(
        run_command,
        ["--engine", tiny_engine_fp32, "--prompt", "x", "--out", tmp_path / "o", "--quiet", *args],
    )
    one_line_error(r, fragment)
    assert not list((tmp_path / "o").glob("*.png"))


def test_run_engine_dir_and_output_errors(tmp_path, tiny_engine_fp32):
    r = invoke(run_command, ["--engine", tmp_path / "nope", "--prompt", "x", "--out", tmp_path])
    one_line_error(r, "does not exist (create one with sd-export)")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = invoke(run_command, ["--engine", tiny_engine_fp32, "--prompt", "x", "--out", blocker / "o"])
    one_line_error(r, "is not writable")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--model", "{tmp}/missing.safetensors"], "does not exist"),
        (["--model", "tiny"], "a preset name needs --random-weights"),
        (["--model", "tiny", "--random-weights", "--component", "vae"], "unknown component 'vae'"),
        (["--model", "tiny", "--random-weights", "--height", "100"], "not a multiple of 8"),
        (["--model", "tiny", "--random-weights", "--width", "128:64:32"], "inverted"),
        (["--model", "nosuch", "--random-weights"], "unknown model preset 'nosuch'"),
    ],
)
def test_export_errors(args, fragment, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = invoke(export_command, [*args, "--out", tmp_path / "e"])
    one_line_error(r, fragment)
    assert not (tmp_path / "e").exists()


def test_run_warns_in_one_line_about_a_truncated_prompt(tmp_path, tiny_engine_fp32):
    # 240 tokens: 4 chunks of 75, past the 3 (231-token context) the tiny UNet takes
    prompt = " ".join(["red circle"] * 120)
    r = invoke(
        run_command,
        ["--engine", tiny_engine_fp32, "--prompt", prompt, "--steps", "1", "--out", tmp_path],
    )
    assert r.exit_code == 0, r.output
    warning_lines = [line for line in r.stderr.splitlines() if "tokens" in line]
    assert len(warning_lines) == 1, r.stderr
    assert warning_lines[0].startswith("warning: prompt 0 (")
    assert "needs 4 chunks of 75 tokens" in warning_lines[0]
    assert "at most 3 (231 tokens)" in warning_lines[0]
    assert "UserWarning" not in r.stderr


@pytest.mark.parametrize(
    ("command", "first_line"),
    [
        ("export_command", "Export a Stable Diffusion model"),
        ("build_command", "Build FP16 TensorRT engines"),
        ("quantize_command", "Write int8-weight OpenVINO graphs"),
        ("run_command", "Generate images from an engine dir"),
        ("bench_command", "Parity and latency"),
        ("triton_group", "Serve engine dirs with NVIDIA Triton"),
        ("triton.triton_export_command", "Write a Triton model repository"),
        ("triton.triton_serve_command", "Run tritonserver on the repository"),
    ],
)
def test_every_command_describes_itself(command, first_line):
    module, _, name = command.rpartition(".")
    r = CliRunner().invoke(getattr(getattr(cli, module) if module else cli, name), ["--help"])
    assert r.exit_code == 0
    description = r.output.split("\n\n")[1].strip()
    assert description.startswith(first_line), description


def run_args(engine, out, *extra):
    return ["--engine", engine, "--prompt", "a red circle", "--steps", "1", "--out", out, *extra]


def test_negative_seed_means_random_and_is_written_down(tmp_path, tiny_engine_fp32):
    r = invoke(run_command, run_args(tiny_engine_fp32, tmp_path, "--seed", "-5", "--quiet"))
    assert r.exit_code == 0, r.output
    (png,) = tmp_path.glob("*.png")
    seed = int(png.stem.split("-", 1)[1])
    assert seed >= 0
    assert f"Seed: {seed}," in Image.open(png).text["parameters"]


def test_out_ending_in_png_writes_that_file(tmp_path, tiny_engine_fp32):
    target = tmp_path / "cat.png"
    r = invoke(run_command, run_args(tiny_engine_fp32, target, "--seed", "1", "--quiet"))
    assert r.exit_code == 0, r.output
    assert target.is_file() and Image.open(target).size == (64, 64)
    again = invoke(run_command, run_args(tiny_engine_fp32, target, "--seed", "2", "--quiet"))
    one_line_error(again, "cat.png exists (pass --overwrite to replace it)")
    assert "Seed: 1," in Image.open(target).text["parameters"]  # nothing lost
    r = invoke(run_command, run_args(tiny_engine_fp32, target, "--seed", "2", "--overwrite"))
    assert r.exit_code == 0, r.output
    assert "Seed: 2," in Image.open(target).text["parameters"]


def test_out_png_with_a_batch_numbers_the_files(tmp_path, tiny_engine_fp32):
    target = tmp_path / "sub" / "cat.png"
    args = run_args(tiny_engine_fp32, target, "--seed", "4", "--batch", "2", "--quiet")
    r = invoke(run_command, args)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in target.parent.iterdir()) == ["cat-0.png", "cat-1.png"]
    assert "Seed: 5," in Image.open(target.parent / "cat-1.png").text["parameters"]
