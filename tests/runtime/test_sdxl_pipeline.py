"""SDXL through the numpy runtime (tiny-xl, fp32 ONNX Runtime) against diffusers'
StableDiffusionXLPipeline on the same weights (diffusers' own single-file conversion,
tests/models/sdxl_oracle.py), tokenizers built from the engine dir's BPE files, the same
initial noise: PSNR >= 40 dB, with an empty negative prompt (zeroed negative conditioning,
diffusers' force_zeros_for_empty_prompt) and with a written one; time_ids from the request."""

from __future__ import annotations

import numpy as np
import pytest

from sd_deploy.errors import RequestError
from sd_deploy.exporter import export_engine_dir
from sd_deploy.metrics import psnr
from sd_deploy.models import load_models
from sd_deploy.runtime import GenerationRequest, Pipeline

diffusers = pytest.importorskip("diffusers")

SIZE, STEPS, GUIDANCE = 128, 6, 5.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    models = load_models("tiny-xl", random_init=True, seed=11)
    out = tmp_path_factory.mktemp("xl") / "engines"
    # txt2img's four graphs; their validation is tests/exporter/test_export_sdxl.py's
    names = ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    export_engine_dir(models, out, components=names, progress=False, validate=False)
    return models, out


def diffusers_pipeline(models, engine_dir, sampler: str, scheduler_config):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from sd_deploy.benchmarks.diffusers_backend import make_diffusers_scheduler
    from tests.models.sdxl_oracle import diffusers_sdxl_modules

    theirs = diffusers_sdxl_modules(models)
    tok = engine_dir / "tokenizer"
    tokenizer = CLIPTokenizer(str(tok / "vocab.json"), str(tok / "merges.txt"), model_max_length=77)
    tok_2 = engine_dir / "tokenizer_2"
    tokenizer_2 = CLIPTokenizer(
        str(tok_2 / "vocab.json"), str(tok_2 / "merges.txt"), pad_token="!", model_max_length=77
    )
    return StableDiffusionXLPipeline(
        vae=theirs["vae"],
        text_encoder=theirs["text_encoder"],
        text_encoder_2=theirs["text_encoder_2"],
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=theirs["unet"],
        scheduler=make_diffusers_scheduler(sampler, scheduler_config),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


@pytest.mark.parametrize(
    ("sampler", "negative", "sizes"),
    [
        ("euler", "", {}),
        ("dpmpp_2m", "blurry, dark", {"original_size": (256, 192), "crop_top_left": (8, 16)}),
    ],
)
def test_sdxl_pipeline_matches_diffusers(setup, sampler, negative, sizes) -> None:
    import torch

    models, engine_dir = setup
    pipe = Pipeline(engine_dir, backend="onnxruntime")
    assert pipe.manifest.model.default_height == SIZE
    request = GenerationRequest(
        prompt="a red circle on a white background", negative_prompt=negative, steps=STEPS,
        guidance=GUIDANCE, sampler=sampler, seed=3, **sizes,
    )  # fmt: skip
    noise = np.random.default_rng(5).standard_normal((1, 4, SIZE // 8, SIZE // 8))
    noise = noise.astype(np.float32)
    ours = pipe.generate_from_noise(request, noise).images[0]

    reference = diffusers_pipeline(models, engine_dir, sampler, pipe.manifest.scheduler)
    with torch.no_grad():
        theirs = reference(
            prompt=request.prompt,
            negative_prompt=negative or None,
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            latents=torch.from_numpy(noise),
            output_type="np",
            original_size=sizes.get("original_size"),
            crops_coords_top_left=sizes.get("crop_top_left", (0, 0)),
        ).images[0]
    value = psnr(ours.astype(np.float64) / 255.0, np.clip(theirs, 0, 1))
    print(f"sdxl pipeline vs diffusers ({sampler}, negative {negative!r}): PSNR {value:.1f} dB")
    assert value >= 40.0


def test_sdxl_time_ids_and_zeroed_negative_reach_the_unet(setup, monkeypatch) -> None:
    _, engine_dir = setup
    pipe = Pipeline(engine_dir, backend="onnxruntime")
    seen = []
    run = pipe._run

    def spy(name, timings, last, inputs):
        if name == "unet":
            seen.append({k: np.array(v) for k, v in inputs.items()})
        return run(name, timings, last, inputs)

    monkeypatch.setattr(pipe, "_run", spy)
    pipe.generate(
        GenerationRequest(prompt="x", steps=1, seed=1, width=96, target_size=(1024, 1024))
    )
    feeds = seen[0]
    assert feeds["time_ids"].tolist() == [[128, 96, 0, 0, 1024, 1024]] * 2
    assert feeds["text_embeds"].shape == (2, 64)
    assert not feeds["text_embeds"][0].any() and feeds["text_embeds"][1].any()
    assert not feeds["encoder_hidden_states"][0].any()
    assert feeds["encoder_hidden_states"].shape == (2, 77, 96)
    with pytest.raises(RequestError, match="original_size"):
        pipe.validate(GenerationRequest(prompt="x", original_size=(1024,)))  # type: ignore[arg-type]


def test_sd_run_takes_the_sdxl_size_flags(setup, tmp_path) -> None:
    from click.testing import CliRunner

    from sd_deploy.cli import run_command

    _, engine_dir = setup
    base = ["--engine", engine_dir, "--prompt", "x", "--steps", "1", "--quiet", "--out", tmp_path]
    args = [*base, "--original-size", "256", "192", "--crop-top-left", "4", "8"]
    result = CliRunner().invoke(run_command, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(list(tmp_path.glob("*.png"))) == 1
    bad = [*base, "--target-size", "-1", "5"]
    result = CliRunner().invoke(run_command, [str(a) for a in bad])
    assert result.exit_code != 0 and "target_size must be two integers" in result.output
