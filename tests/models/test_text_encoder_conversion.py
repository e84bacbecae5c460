"""SD 2.x text tower: OpenCLIP layout (`cond_stage_model.model.*`) -> our CLIPTextModel.

Two oracles for the converted weights:
- diffusers' `convert_open_clip_checkpoint` (what `from_single_file` uses), loaded strictly
  into a transformers `CLIPTextModel`: same tensors, same hidden states;
- OpenCLIP's computation written out from the raw OpenCLIP tensors (token + positional
  embedding, pre-norm resblocks with `nn.MultiheadAttention`'s math and a causal mask,
  all but the last block, then ln_final), which is what ldm's FrozenOpenCLIPEmbedder with
  layer="penultimate" computes.
SD 1.x text towers are in transformers' layout already; their round trip is checked too.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sd_deploy.models import build_random, get_preset
from sd_deploy.models.checkpoints import load_checkpoint, save_checkpoint

TOLERANCE = 1e-4
PREFIX = "cond_stage_model.model."


def rel_l2(ours: torch.Tensor, reference: torch.Tensor) -> float:
    ours, reference = ours.double(), reference.double()
    return ((ours - reference).norm() / reference.norm()).item()


def openclip_state_dict(width: int, blocks: int, seed: int, vocab: int = 49408) -> dict:
    """Seeded random OpenCLIP text tower tensors, with the keys ldm checkpoints use."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def norm(prefix: str) -> dict:
        return {
            prefix + "weight": 1.0 + randn(width, scale=0.1),
            prefix + "bias": randn(width, scale=0.1),
        }

    sd = {
        "token_embedding.weight": randn(vocab, width, scale=1.0),
        "positional_embedding": randn(77, width, scale=0.5),
        "text_projection": randn(width, width),
        "logit_scale": torch.tensor(4.6052),
        **norm("ln_final."),
    }
    for i in range(blocks):
        p = f"transformer.resblocks.{i}."
        sd.update(norm(p + "ln_1."))
        sd.update(norm(p + "ln_2."))
        sd[p + "attn.in_proj_weight"] = randn(3 * width, width, scale=width**-0.5)
        sd[p + "attn.in_proj_bias"] = randn(3 * width, scale=0.1)
        sd[p + "attn.out_proj.weight"] = randn(width, width, scale=width**-0.5)
        sd[p + "attn.out_proj.bias"] = randn(width, scale=0.1)
        sd[p + "mlp.c_fc.weight"] = randn(4 * width, width, scale=width**-0.5)
        sd[p + "mlp.c_fc.bias"] = randn(4 * width, scale=0.1)
        sd[p + "mlp.c_proj.weight"] = randn(width, 4 * width, scale=(4 * width) ** -0.5)
        sd[p + "mlp.c_proj.bias"] = randn(width, scale=0.1)
    return {PREFIX + k: v for k, v in sd.items()}


def openclip_penultimate(sd: dict, ids: torch.Tensor, heads: int) -> torch.Tensor:
    """ldm FrozenOpenCLIPEmbedder(layer="penultimate").encode_with_transformer, spelled out."""

    def get(key: str) -> torch.Tensor:
        return sd[PREFIX + key]

    def layer_norm(x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], get(prefix + "weight"), get(prefix + "bias"))

    width = get("ln_final.weight").shape[0]
    blocks = len({k.split(".")[4] for k in sd if k.startswith(PREFIX + "transformer.resblocks.")})
    mask = torch.full((77, 77), float("-inf")).triu_(1)
    x = get("token_embedding.weight")[ids] + get("positional_embedding")
    x = x.permute(1, 0, 2)  # NLD -> LND, as OpenCLIP's transformer takes it
    for i in range(blocks - 1):  # penultimate: the last block is not run
        p = f"transformer.resblocks.{i}."
        h = layer_norm(x, p + "ln_1.")
        attn, _ = F.multi_head_attention_forward(
            h, h, h, width, heads,
            get(p + "attn.in_proj_weight"), get(p + "attn.in_proj_bias"), None, None, False, 0.0,
            get(p + "attn.out_proj.weight"), get(p + "attn.out_proj.bias"),
            training=False, need_weights=False, attn_mask=mask,
        )  # fmt: skip
        x = x + attn
        h = layer_norm(x, p + "ln_2.")
        h = F.linear(h, get(p + "mlp.c_fc.weight"), get(p + "mlp.c_fc.bias"))
        x = x + F.linear(F.gelu(h), get(p + "mlp.c_proj.weight"), get(p + "mlp.c_proj.bias"))
    return layer_norm(x.permute(1, 0, 2), "ln_final.")


def diffusers_text_model(sd: dict, width: int, heads: int, blocks: int):
    """diffusers' own OpenCLIP conversion, loaded strictly into a CLIPTextModel."""
    diffusers_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=blocks - 1,
        num_attention_heads=heads, hidden_act="gelu", max_position_embeddings=77,
    )  # fmt: skip
    with torch.device("meta"):
        model = CLIPTextModel(config)
    converted = diffusers_utils.convert_open_clip_checkpoint(model, sd, prefix=PREFIX)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    model.load_state_dict(converted, strict=True, assign=True)
    model.embeddings.position_ids = torch.arange(77).expand(1, -1)  # non-persistent buffer
    return model.eval(), converted


def check_openclip(tmp_path: Path, width: int, heads: int, seed: int) -> dict[str, float]:
    blocks = 24  # ViT-H/14's text tower depth; diffusers hard-codes dropping resblocks.23
    text_sd = openclip_state_dict(width, blocks, seed)
    # A complete single file: tiny-v's UNet/VAE around the OpenCLIP text tower.
    tiny = build_random(get_preset("tiny-v"), seed=0)
    checkpoint = {"model.diffusion_model." + k: v for k, v in tiny.unet.state_dict().items()}
    checkpoint.update({"first_stage_model." + k: v for k, v in tiny.vae.state_dict().items()})
    checkpoint.update(text_sd)
    path = tmp_path / "openclip.safetensors"
    save_file(checkpoint, path)
    del checkpoint, tiny

    ours = load_checkpoint(path)
    text = ours.text_encoder
    assert text.config.hidden_size == width
    assert text.config.num_hidden_layers == blocks - 1
    assert text.config.num_attention_heads == heads
    assert text.config.hidden_act == "gelu"
    theirs, converted = diffusers_text_model(text_sd, width, heads, blocks)

    ours_sd = {k.removeprefix("model."): v for k, v in text.state_dict().items()}
    ours_sd = {k.removeprefix("text_model."): v for k, v in ours_sd.items()}
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    assert ours_sd.keys() == converted.keys()
    for key, value in converted.items():
        assert torch.equal(ours_sd[key], value), key

    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 49406
    with torch.no_grad():
        hidden = text(ids)
        errors = {
            "vs_diffusers": rel_l2(hidden, theirs(input_ids=ids).last_hidden_state),
            "vs_openclip_math": rel_l2(hidden, openclip_penultimate(text_sd, ids, heads)),
        }
    print(f"OpenCLIP width {width}: " + ", ".join(f"{k}={v:.2e}" for k, v in errors.items()))
    del ours, theirs, text_sd, converted, ours_sd
    gc.collect()
    return errors


def test_openclip_conversion_small_width(tmp_path: Path) -> None:
    errors = check_openclip(tmp_path, width=128, heads=2, seed=11)
    assert max(errors.values()) <= TOLERANCE, errors


@pytest.mark.slow
def test_openclip_conversion_vit_h_size(tmp_path: Path) -> None:
    errors = check_openclip(tmp_path, width=1024, heads=16, seed=12)
    assert max(errors.values()) <= TOLERANCE, errors


@pytest.mark.parametrize("name", ["tiny", "tiny-v"])
def test_text_round_trip(tmp_path: Path, name: str) -> None:
    """tiny: SD 1.x layout; tiny-v: gelu, so written in OpenCLIP layout and converted back."""
    models = build_random(get_preset(name), seed=5)
    path = save_checkpoint(models, tmp_path / "m.safetensors")
    loaded = load_checkpoint(path)
    a, b = models.text_encoder.state_dict(), loaded.text_encoder.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ids = torch.randint(0, 49408, (3, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(models.text_encoder(ids), loaded.text_encoder(ids))


def test_openclip_save_layout_is_a_real_openclip_tower(tmp_path: Path) -> None:
    """The written OpenCLIP tower computes, by OpenCLIP's math, what our encoder computes.

    It has one zero (identity) block more than we run and an identity text_projection.
    """
    from safetensors.torch import load_file

    models = build_random(get_preset("tiny-v"), seed=9)
    path = save_checkpoint(models, tmp_path / "m.safetensors")
    sd = load_file(path)
    layers = models.text_encoder.config.num_hidden_layers
    text_keys = {k for k in sd if k.startswith(PREFIX)}
    assert not any(k.startswith("cond_stage_model.transformer.") for k in sd)
    assert f"{PREFIX}transformer.resblocks.{layers}.attn.in_proj_weight" in text_keys
    assert f"{PREFIX}transformer.resblocks.{layers + 1}.ln_1.weight" not in text_keys
    assert torch.count_nonzero(sd[f"{PREFIX}transformer.resblocks.{layers}.mlp.c_proj.weight"]) == 0
    width = models.text_encoder.config.hidden_size
    assert torch.equal(sd[PREFIX + "text_projection"], torch.eye(width))
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = models.text_encoder(ids)
        reference = openclip_penultimate(sd, ids, models.text_encoder.config.num_attention_heads)
    assert rel_l2(ours, reference) <= TOLERANCE
