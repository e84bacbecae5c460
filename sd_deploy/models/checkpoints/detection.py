"""Architecture from tensor shapes (single files), and which preset that architecture is.

Channels, levels, blocks, where attention sits, context width, conv vs linear projections,
and text width and depth are read from shapes. Every size is read from the first of several
keys that is present, so that a file missing a key still gets a config and key validation
then names what is missing. Head counts cannot be read from weights: custom models get 8
heads (conv projections, SD 1.x style) or 64 channels per head (linear, SD 2.x style).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from sd_deploy.models.checkpoints.families import canonical_unet, sd2_prediction_from_step
from sd_deploy.models.checkpoints.layout import (
    CLIP_PREFIX,
    OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
)
from sd_deploy.models.presets import PRESETS, ModelConfig
from sd_deploy.models.text_encoder import TextEncoderConfig
from sd_deploy.models.unet import UNetConfig
from sd_deploy.models.vae import VAEConfig


def detect(shapes: dict[str, tuple[int, ...]]) -> Detected:
    """The three configs as far as shapes tell, and whether the text tower is OpenCLIP's."""
    text, openclip = _detect_text(shapes)
    return Detected(_detect_unet(shapes), _detect_vae(shapes), text, openclip)


@dataclass
class Detected:
    """What shapes tell: configs with guessed heads, and the text tower's layout."""

    unet: UNetConfig
    vae: VAEConfig
    text: TextEncoderConfig
    openclip: bool


def _dim(shapes: dict[str, tuple[int, ...]], *options: tuple[str, int]) -> int | None:
    """A size read from the first (key, axis) present: detection survives a missing key."""
    for key, axis in options:
        shape = shapes.get(key)
        if shape is not None and len(shape) > axis:
            return shape[axis]
    return None


def _has_prefix(shapes: dict[str, tuple[int, ...]], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def _resblock_channels(shapes: dict[str, tuple[int, ...]], block: str) -> int | None:
    return _dim(
        shapes,
        *((f"{block}{name}", 0) for name in (
            "in_layers.2.weight", "in_layers.2.bias", "out_layers.3.weight",
            "out_layers.3.bias", "out_layers.0.weight", "emb_layers.1.weight",
        )),
    )  # fmt: skip


def _groups(channels: Iterable[int]) -> int:
    """Group-norm groups: SD's 32 unless some channel count needs fewer (unreadable otherwise)."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c in channels))


def _detect_unet(shapes: dict[str, tuple[int, ...]]) -> UNetConfig:
    p = UNET_PREFIX
    mc = _dim(shapes, (p + "input_blocks.0.0.weight", 0), (p + "input_blocks.0.0.bias", 0))
    if mc is None:
        return UNetConfig()  # key validation will say what is missing
    in_ch = _dim(shapes, (p + "input_blocks.0.0.weight", 1)) or 4
    out_ch = _dim(shapes, (p + "out.2.weight", 0), (p + "out.2.bias", 0)) or 4
    levels: list[list[tuple[int, bool]]] = [[]]
    n = 1
    while _has_prefix(shapes, f"{p}input_blocks.{n}."):
        if _has_prefix(shapes, f"{p}input_blocks.{n}.0.op."):
            levels.append([])
        else:
            width = _resblock_channels(shapes, f"{p}input_blocks.{n}.0.")
            attends = _has_prefix(shapes, f"{p}input_blocks.{n}.1.")
            levels[-1].append((width or 0, attends))
        n += 1
    if not levels[0] or any(len(level) != len(levels[0]) for level in levels):
        return UNetConfig(in_channels=in_ch, out_channels=out_ch, model_channels=mc)
    context_dim, depth, linear = 768, 1, False
    k_keys = sorted(k for k in shapes if re.search(r"\.transformer_blocks\.\d+\.attn2\.to_k\.", k))
    if k_keys:
        context_dim = shapes[k_keys[0]][-1]
        block = k_keys[0].split(".transformer_blocks.")[0]
        depth = _count(shapes, re.escape(block) + r"\.transformer_blocks\.(\d+)\.")
        shape = shapes.get(block + ".proj_in.weight") or shapes.get(block + ".proj_out.weight")
        linear = shape is not None and len(shape) == 2
    channels = [max(ch for ch, _ in level) for level in levels]
    attention = tuple(2**i for i, level in enumerate(levels) if any(a for _, a in level))
    attn_channels = [channels[i] for i in range(len(levels)) if 2**i in attention]
    attn_channels.append(channels[-1])
    if linear and all(ch % 64 == 0 for ch in attn_channels):
        heads = {"num_heads": 8, "num_head_channels": 64}
    elif all(ch % 8 == 0 for ch in attn_channels):
        heads = {"num_heads": 8, "num_head_channels": -1}
    else:
        heads = {"num_heads": 1, "num_head_channels": -1}
    return UNetConfig(
        in_channels=in_ch,
        out_channels=out_ch,
        model_channels=mc,
        channel_mult=tuple(max(ch // mc, 1) for ch in channels),
        num_res_blocks=len(levels[0]),
        attention_resolutions=attention,
        context_dim=context_dim,
        transformer_depth=max(depth, 1),
        use_linear_in_transformer=linear,
        upcast_attention=linear,
        norm_num_groups=_groups([mc, *channels]),
        **heads,
    )


def _detect_vae(shapes: dict[str, tuple[int, ...]]) -> VAEConfig:
    p = VAE_PREFIX
    ch = _dim(shapes, (p + "encoder.conv_in.weight", 0), (p + "encoder.conv_in.bias", 0))
    levels = _count(shapes, re.escape(p) + r"encoder\.down\.(\d+)\.")
    if ch is None or not levels:
        return VAEConfig()
    mult = []
    for i in range(levels):
        block = f"{p}encoder.down.{i}.block.0."
        out = _dim(
            shapes, *((block + k, 0) for k in ("conv1.weight", "conv1.bias", "conv2.weight",
                                               "conv2.bias", "norm2.weight"))
        )  # fmt: skip
        mult.append(max((out or ch) // ch, 1))
    moments = _dim(shapes, (p + "encoder.conv_out.weight", 0), (p + "encoder.conv_out.bias", 0))
    z = _dim(
        shapes, (p + "decoder.conv_in.weight", 1), (p + "post_quant_conv.weight", 0),
        (p + "post_quant_conv.bias", 0),
    ) or (moments // 2 if moments else 4)  # fmt: skip
    embed = _dim(shapes, (p + "quant_conv.weight", 0), (p + "quant_conv.bias", 0))
    return VAEConfig(
        in_channels=_dim(shapes, (p + "encoder.conv_in.weight", 1)) or 3,
        out_channels=_dim(
            shapes, (p + "decoder.conv_out.weight", 0), (p + "decoder.conv_out.bias", 0)
        )
        or 3,
        ch=ch,
        ch_mult=tuple(mult),
        num_res_blocks=_count(shapes, re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\.") or 1,
        z_channels=z,
        embed_dim=embed // 2 if embed else z,
        norm_num_groups=_groups([ch * m for m in mult]),
    )


def _count(shapes: dict[str, tuple[int, ...]], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m[1] for k in shapes if (m := regex.match(k))})


def _detect_text(shapes: dict[str, tuple[int, ...]]) -> tuple[TextEncoderConfig, bool]:
    if _has_prefix(shapes, OPENCLIP_PREFIX):
        p = OPENCLIP_PREFIX
        tok, pos = shapes.get(p + "token_embedding.weight"), shapes.get(p + "positional_embedding")
        fc1 = shapes.get(p + "transformer.resblocks.0.mlp.c_fc.weight")
        blocks = _count(shapes, re.escape(p) + r"transformer\.resblocks\.(\d+)\.")
        if not (tok and pos and fc1 and blocks > 1):
            return PRESETS["sd21"].text_encoder, True
        return (
            TextEncoderConfig(
                vocab_size=tok[0], hidden_size=tok[1], intermediate_size=fc1[0],
                num_hidden_layers=blocks - 1, num_attention_heads=max(tok[1] // 64, 1),
                max_position_embeddings=pos[0], hidden_act="gelu",
            ),
            True,
        )  # fmt: skip
    p = CLIP_PREFIX + ("text_model." if _has_prefix(shapes, CLIP_PREFIX + "text_model.") else "")
    tok = shapes.get(p + "embeddings.token_embedding.weight")
    pos = shapes.get(p + "embeddings.position_embedding.weight")
    fc1 = shapes.get(p + "encoder.layers.0.mlp.fc1.weight")
    layers = _count(shapes, re.escape(p) + r"encoder\.layers\.(\d+)\.")
    if not (tok and pos and fc1 and layers):
        return PRESETS["sd15"].text_encoder, False
    return (
        TextEncoderConfig(
            vocab_size=tok[0], hidden_size=tok[1], intermediate_size=fc1[0],
            num_hidden_layers=layers, num_attention_heads=max(tok[1] // 64, 1),
            max_position_embeddings=pos[0], hidden_act="quick_gelu",
        ),
        False,
    )  # fmt: skip


def matches_preset(d: Detected, p: ModelConfig) -> bool:
    """The detectable parts of the architecture equal the preset's."""
    if (p.text_encoder.hidden_act == "gelu") != d.openclip:
        return False
    unet = canonical_unet(
        d.unet,
        num_heads=p.unet.num_heads,
        num_head_channels=p.unet.num_head_channels,
        upcast_attention=p.unet.upcast_attention,
        norm_num_groups=p.unet.norm_num_groups,
    )
    vae = replace(d.vae, scaling_factor=p.vae.scaling_factor, norm_num_groups=p.vae.norm_num_groups)
    text = replace(
        d.text,
        num_attention_heads=p.text_encoder.num_attention_heads,
        hidden_act=p.text_encoder.hidden_act,
        layer_norm_eps=p.text_encoder.layer_norm_eps,
    )
    return unet == canonical_unet(p.unet) and vae == p.vae and text == p.text_encoder


def choose_preset(
    candidates: list[ModelConfig], prediction: str | None, step: Any, named: str | None
) -> ModelConfig:
    """One of the matching presets: the only one, the one the file names, else by prediction."""
    if len(candidates) == 1:
        chosen = candidates[0]
    elif named in {c.family for c in candidates}:  # the file says which
        chosen = next(c for c in candidates if c.family == named)
    else:  # same shapes, different prediction type: sd21 (768-v) vs sd21-base (512)
        if prediction is None:
            prediction = sd2_prediction_from_step(step)
        chosen = next((c for c in candidates if c.prediction_type == prediction), candidates[0])
    return chosen.with_prediction_type(prediction) if prediction else chosen
