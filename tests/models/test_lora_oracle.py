"""Our LoRA merge against diffusers' `load_lora_weights` + `fuse_lora` on the same files.

The diffusers side is a `StableDiffusionPipeline` built from configs (no hub): the UNet
converted from our ldm weights by diffusers' own single-file converter (as in
test_oracle_diffusers.py), our CLIPTextModel, and a tokenizer from the packaged BPE.
Seeded LoRA files in kohya and diffusers/PEFT formats (linear and LoCon conv layers, with
and without alpha, UNet and text encoder) go into both; the merged UNet and text encoder
must compute the same outputs (fp32 relative L2 <= 1e-4), and the LoRA must change them
by far more than that.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft")

from lora_files import write_lora  # noqa: E402

from sd_deploy.models import build_random, get_preset  # noqa: E402
from sd_deploy.models.lora import LoraSpec, merge_loras  # noqa: E402

TOLERANCE = 1e-4


def rel_l2(ours: torch.Tensor, reference: torch.Tensor) -> float:
    ours, reference = ours.double(), reference.double()
    return ((ours - reference).norm() / reference.norm()).item()


def diffusers_pipeline(models, tmp_path: Path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from sd_deploy.benchmarks.diffusers_backend import convert_to_diffusers
    from sd_deploy.runtime.tokenizer import write_clip_tokenizer_files

    unet, vae = convert_to_diffusers(models)
    write_clip_tokenizer_files(tmp_path / "tokenizer")
    tokenizer = CLIPTokenizer(
        str(tmp_path / "tokenizer" / "vocab.json"), str(tmp_path / "tokenizer" / "merges.txt")
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=models.text_encoder.model, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip


def outputs(unet, text, config) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    sample = torch.randn(2, config.unet.in_channels, 16, 16, generator=g)
    timestep = torch.tensor([981.0, 17.5])
    context = torch.randn(2, 77, config.unet.context_dim, generator=g)
    ids = torch.randint(0, config.text_encoder.vocab_size, (2, 77), generator=g)
    with torch.no_grad():
        u = unet(sample, timestep, context)
        t = text(ids)
    return {"unet": getattr(u, "sample", u), "text": getattr(t, "last_hidden_state", t)}


CASES = [
    # (format, alpha, rank, user scale, preset)
    ("kohya", 2.0, 4, 1.0, "tiny"),
    ("kohya", None, 4, 0.7, "tiny"),
    ("peft", 8.0, 4, 1.0, "tiny"),
    ("peft", None, 2, 0.5, "tiny-v"),
    ("lora_down_up", None, 4, 1.0, "tiny"),
    ("kohya", 1.0, 3, 1.3, "tiny-v"),
]


@pytest.mark.parametrize(("fmt", "alpha", "rank", "scale", "preset"), CASES)
def test_merge_matches_diffusers_fuse_lora(
    tmp_path: Path, fmt: str, alpha: float | None, rank: int, scale: float, preset: str
) -> None:
    config = get_preset(preset)
    ours = build_random(config, seed=5)
    theirs = build_random(config, seed=5)
    path = write_lora(tmp_path / f"{fmt}.safetensors", ours, fmt, rank=rank, alpha=alpha, seed=3)
    base = outputs(ours.unet, ours.text_encoder, config)

    applied = merge_loras(ours, [LoraSpec(path, scale)])
    assert applied[0].format == ("kohya" if fmt == "kohya" else "diffusers")
    merged = outputs(ours.unet, ours.text_encoder, config)

    pipe = diffusers_pipeline(theirs, tmp_path)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=scale)
    reference = outputs(pipe.unet, pipe.text_encoder, config)

    for name in ("unet", "text"):
        error = rel_l2(merged[name], reference[name])
        effect = rel_l2(base[name], reference[name])
        print(f"{fmt} alpha={alpha} {name}: rel L2 {error:.2e}, LoRA effect {effect:.2e}")
        assert error <= TOLERANCE, (name, error)
        assert effect > 100 * TOLERANCE, (name, effect)  # the LoRA really changed the outputs


def test_two_loras_add_up(tmp_path: Path) -> None:
    """Two LoRAs at once: their deltas add (diffusers: two adapters, both fused)."""
    config = get_preset("tiny")
    ours = build_random(config, seed=5)
    theirs = build_random(config, seed=5)
    a = write_lora(tmp_path / "a.safetensors", ours, "kohya", alpha=2.0, seed=1)
    b = write_lora(tmp_path / "b.safetensors", ours, "peft", seed=2, components=("unet",))
    merge_loras(ours, [LoraSpec(a, 0.8), LoraSpec(b, 0.6)])
    merged = outputs(ours.unet, ours.text_encoder, config)

    pipe = diffusers_pipeline(theirs, tmp_path)
    pipe.load_lora_weights(str(a), adapter_name="a")
    pipe.load_lora_weights(str(b), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.8, 0.6])
    pipe.fuse_lora(adapter_names=["a", "b"])
    reference = outputs(pipe.unet, pipe.text_encoder, config)
    for name in ("unet", "text"):
        assert rel_l2(merged[name], reference[name]) <= TOLERANCE, name
