"""OpenCLIP text tower <-> transformers' CLIPTextModel (SD 2.x checkpoints use OpenCLIP's).

Both directions live here so that the name tables exist once: `openclip_key` maps our keys
to OpenCLIP's for loading (q/k/v are thirds of one `in_proj`), `openclip_state_dict` writes
OpenCLIP layout, which makes every SD 2.x-style round trip exercise the loading side.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from sd_deploy.models.checkpoints.layout import text_bare
from sd_deploy.models.text_encoder import TextEncoder

_OPENCLIP_LAYER = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}
_OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def openclip_key(bare: str) -> tuple[str, int | None] | None:
    """CLIPTextModel key (bare) -> (OpenCLIP key, third of in_proj or None)."""
    if bare in _OPENCLIP_TOP:
        return _OPENCLIP_TOP[bare], None
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", bare)
    if not m:
        return None
    block, rest = f"transformer.resblocks.{m[1]}.", m[2]
    qkv = re.fullmatch(r"self_attn\.([qkv]_proj)\.(weight|bias)", rest)
    if qkv:
        return f"{block}attn.in_proj_{qkv[2]}", _QKV[qkv[1]]
    for ours, theirs in _OPENCLIP_LAYER.items():
        if rest.startswith(ours):
            return block + theirs + rest[len(ours) :], None
    return None


def openclip_state_dict(text: TextEncoder) -> Iterator[tuple[str, torch.Tensor]]:
    """Our CLIPTextModel in OpenCLIP layout, plus the two tensors SD 2.x never uses.

    OpenCLIP has one resblock more than we run (SD 2.x takes the penultimate layer); it is
    written as zeros, which makes it an exact identity block (pre-norm residual with zero
    output projections), and `text_projection` as the identity. Loading drops both.
    """
    sd = {text_bare(k): v for k, v in text.model.state_dict().items()}
    for bare, value in sd.items():
        if bare in _OPENCLIP_TOP:
            yield _OPENCLIP_TOP[bare], value
    layers = text.config.num_hidden_layers
    for i in range(layers + 1):
        src = f"encoder.layers.{i if i < layers else layers - 1}."
        zero = i == layers
        for kind in ("weight", "bias"):
            qkv = torch.cat([sd[f"{src}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")])
            yield f"transformer.resblocks.{i}.attn.in_proj_{kind}", qkv * 0 if zero else qkv
        for ours, theirs in _OPENCLIP_LAYER.items():
            for kind in ("weight", "bias"):
                value = sd[f"{src}{ours}{kind}"]
                yield (
                    f"transformer.resblocks.{i}.{theirs}{kind}",
                    (torch.zeros_like(value) if zero else value),
                )
    width = text.config.hidden_size
    dtype = sd["final_layer_norm.weight"].dtype
    yield "text_projection", torch.eye(width, dtype=dtype)
