"""ldm key -> diffusers key, for the UNet and the VAE (the text encoder needs no renaming).

Our modules use ldm's tree, so loading a diffusers folder asks, for each of our keys, which
diffusers key holds it. Written as rules over levels and blocks rather than a fixed table, so
that any UNet/VAE depth converts, not only SD's.
"""

from __future__ import annotations

import re

_UNET_TOP = {
    "time_embed.0.": "time_embedding.linear_1.",
    "time_embed.2.": "time_embedding.linear_2.",
    "input_blocks.0.0.": "conv_in.",
    "out.0.": "conv_norm_out.",
    "out.2.": "conv_out.",
    "label_emb.0.0.": "add_embedding.linear_1.",  # SDXL's vector conditioning
    "label_emb.0.2.": "add_embedding.linear_2.",
}
_UNET_RESNET = (
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("emb_layers.1.", "time_emb_proj."),
    ("skip_connection.", "conv_shortcut."),
)


def _unet_resnet(rest: str) -> str:
    for ours, theirs in _UNET_RESNET:
        if rest.startswith(ours):
            return theirs + rest[len(ours) :]
    return rest


def unet_key_to_diffusers(key: str, layers_per_block: int) -> str | None:
    """ldm UNet key -> diffusers UNet2DConditionModel key (the generalised unet_conversion_map)."""
    for ours, theirs in _UNET_TOP.items():
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    per_level = layers_per_block + 1
    if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", key):
        level, j = divmod(int(m[1]) - 1, per_level)
        if j == layers_per_block:
            return f"down_blocks.{level}.downsamplers.0.conv." + m[3].removeprefix("op.")
        if m[2] == "0":
            return f"down_blocks.{level}.resnets.{j}." + _unet_resnet(m[3])
        return f"down_blocks.{level}.attentions.{j}." + m[3]
    if m := re.fullmatch(r"middle_block\.(\d)\.(.+)", key):
        if m[1] == "1":
            return "mid_block.attentions.0." + m[2]
        return f"mid_block.resnets.{int(m[1]) // 2}." + _unet_resnet(m[2])
    if m := re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", key):
        level, j = divmod(int(m[1]), per_level)
        if m[2] == "0":
            return f"up_blocks.{level}.resnets.{j}." + _unet_resnet(m[3])
        if m[3].startswith("conv."):
            return f"up_blocks.{level}.upsamplers.0." + m[3]
        return f"up_blocks.{level}.attentions.{j}." + m[3]
    return None


# Current diffusers names first, then the pre-0.14 ones (query/key/value/proj_attn).
_VAE_ATTN = {
    "norm.": ("group_norm.",),
    "q.": ("to_q.", "query."),
    "k.": ("to_k.", "key."),
    "v.": ("to_v.", "value."),
    "proj_out.": ("to_out.0.", "proj_attn."),
}


def vae_keys_to_diffusers(key: str, levels: int) -> tuple[str, ...]:
    """ldm VAE key -> candidate diffusers AutoencoderKL keys."""
    if m := re.fullmatch(
        r"(encoder|decoder)\.(down|up)\.(\d+)\.(block|downsample|upsample)\.(.+)", key
    ):
        part, direction, index, kind, rest = m.groups()
        level = int(index) if direction == "down" else levels - 1 - int(index)
        block = f"{part}.{direction}_blocks.{level}."
        if kind == "block":
            rest = rest.replace("nin_shortcut.", "conv_shortcut.")
            return (block + "resnets." + rest,)
        return (block + f"{kind}rs.0." + rest,)
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.block_(\d)\.(.+)", key):
        rest = m[3].replace("nin_shortcut.", "conv_shortcut.")
        return (f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{rest}",)
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(.+)", key):
        for ours, theirs in _VAE_ATTN.items():
            if m[2].startswith(ours):
                tail = m[2][len(ours) :]
                return tuple(f"{m[1]}.mid_block.attentions.0.{t}{tail}" for t in theirs)
    if m := re.fullmatch(r"(encoder|decoder)\.norm_out\.(.+)", key):
        return (f"{m[1]}.conv_norm_out.{m[2]}",)
    return (key,)
