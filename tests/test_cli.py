"""The commands users type: happy paths and one-line errors with exit status 1."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from PIL import Image

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
    assert text.startswith("a red circle\nNegative prompt: blurry\nSteps: 3, Sampler: euler_a")
    assert "Seed: 6, Size: 64x64" in text
    # A second run never overwrites earlier images.
    assert invoke(run_command, args).exit_code == 0
    assert len(list(pngs.glob("*.png"))) == 4


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--steps", "0"], "steps must be an integer >= 1"),
        (["--guidance", "-2"], "guidance must be >= 0"),
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
    prompt = " ".join(["red circle"] * 60)  # 120 words: far past 77 tokens
    r = invoke(
        run_command,
        ["--engine", tiny_engine_fp32, "--prompt", prompt, "--steps", "1", "--out", tmp_path],
    )
    assert r.exit_code == 0, r.output
    warning_lines = [line for line in r.stderr.splitlines() if "tokens" in line]
    assert len(warning_lines) == 1, r.stderr
    assert warning_lines[0].startswith("warning: prompt 0 (")
    assert "dropped the last 45" in warning_lines[0]
    assert "UserWarning" not in r.stderr
