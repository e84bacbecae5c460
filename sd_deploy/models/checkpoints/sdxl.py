"""SDXL single files (Stability-AI `generative-models`, the `sgm` layout), both directions.

    model.diffusion_model.*                     UNet (ldm names plus label_emb.0.{0,2})
    first_stage_model.*                         VAE (ldm names)
    conditioner.embedders.0.transformer.*       CLIP ViT-L text tower (transformers layout)
    conditioner.embedders.1.model.*             OpenCLIP ViT-bigG text tower (OpenCLIP layout,
                                                all 32 blocks and text_projection)

Which preset a file is: the metadata `save_checkpoint` writes, else the UNet's width and its
vector-conditioning width (`label_emb.0.0.weight`), which tell sdxl and tiny-xl apart; key
validation then names anything missing. The SDXL refiner (bigG tower only, 2560-wide vector
conditioning on aesthetic score) is refused with a message, as are SDXL LoRA files.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

from sd_deploy.errors import CheckpointError
from sd_deploy.models.checkpoints.assembly import (
    Component,
    Source,
    plain,
    resolve,
    sliced,
)
from sd_deploy.models.checkpoints.layout import UNET_PREFIX, VAE_PREFIX, text_bare
from sd_deploy.models.checkpoints.openclip import _OPENCLIP_LAYER, _OPENCLIP_TOP, openclip_key
from sd_deploy.models.checkpoints.readers import Reader
from sd_deploy.models.presets import PRESETS, ModelConfig
from sd_deploy.models.text_encoder import ProjectedTextEncoder, TextEncoder

SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
CONDITIONER_PREFIX = "conditioner.embedders."
REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."
XL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
_IGNORED = frozenset(
    {
        SDXL_OPENCLIP_PREFIX + "logit_scale",
        SDXL_OPENCLIP_PREFIX + "attn_mask",
        "denoiser.sigmas",
        "denoiser.log_sigmas",
    }
)
_REFINER_ADM = 2560  # 1280 pooled + 5 * 256 (sizes, crop, aesthetic score)


def is_sdxl_file(keys: dict[str, tuple[int, ...]]) -> bool:
    return any(k.startswith(CONDITIONER_PREFIX) for k in keys)


def xl_presets() -> list[ModelConfig]:
    return [p for p in PRESETS.values() if p.is_sdxl]


def refuse_refiner(reader: Reader) -> None:
    """The refiner conditions on an aesthetic score through the bigG tower alone: not a base."""
    keys = reader.shapes
    adm = keys.get(UNET_PREFIX + "label_emb.0.0.weight")
    if any(k.startswith(REFINER_OPENCLIP_PREFIX) for k in keys) or (
        adm is not None and len(adm) == 2 and adm[1] == _REFINER_ADM
    ):
        raise CheckpointError(
            f"{reader.path} is an SDXL refiner (one OpenCLIP bigG tower, aesthetic-score "
            "conditioning): only SDXL base models are supported; pass the base checkpoint"
        )


def sdxl_preset(reader: Reader) -> tuple[ModelConfig, str]:
    """The SDXL preset whose UNet width and vector width the file has."""
    refuse_refiner(reader)
    keys = reader.shapes
    conv_in = keys.get(UNET_PREFIX + "input_blocks.0.0.weight")
    adm = keys.get(UNET_PREFIX + "label_emb.0.0.weight")
    width = conv_in[0] if conv_in else None
    vector = adm[1] if adm and len(adm) == 2 else None
    for preset in xl_presets():
        if width == preset.unet.model_channels and vector == preset.unet.adm_in_channels:
            return preset, f"detected as {preset.family} from the tensor shapes"
    known = ", ".join(
        f"{p.family} ({p.unet.model_channels}/{p.unet.adm_in_channels})" for p in xl_presets()
    )
    raise CheckpointError(
        f"{reader.path} is an SDXL-layout checkpoint whose UNet width / vector width "
        f"({width}/{vector}, from input_blocks.0.0 and label_emb.0.0) is no known SDXL "
        f"architecture: {known}"
    )


def sdxl_components(reader: Reader, modules: dict[str, nn.Module]) -> list[Component]:
    """Plan the four SDXL modules (from `meta_modules(config)`) from one file's keys."""
    shapes = reader.shapes
    consumed: set[str] = set()
    unet, vae, text, text_2 = (Component(n, modules[n]) for n in XL_COMPONENTS)

    def take(name: str) -> Source | str:
        if name not in shapes:
            return name
        consumed.add(name)
        return plain(reader, name)

    nested = any(k.startswith(SDXL_CLIP_PREFIX + "text_model.") for k in shapes)

    def text_lookup(key: str, shape: tuple[int, ...]) -> Source | str:
        return take(SDXL_CLIP_PREFIX + ("text_model." if nested else "") + text_bare(key))

    def text_2_lookup(key: str, shape: tuple[int, ...]) -> Source | str:
        bare = text_bare(key)
        if bare == "text_projection.weight":  # OpenCLIP multiplies x @ P; Linear holds P.T
            found = take(SDXL_OPENCLIP_PREFIX + "text_projection")
            if isinstance(found, str):
                return found
            load = found.load
            return Source(found.key, tuple(reversed(found.shape)), lambda: load().T)
        mapped = openclip_key(bare)
        if mapped is None:
            return f"{SDXL_OPENCLIP_PREFIX}? (for {bare})"
        name, third = SDXL_OPENCLIP_PREFIX + mapped[0], mapped[1]
        found = take(name)
        if isinstance(found, str) or third is None:
            return found
        return sliced(reader, name, third, 3) or found

    resolve(unet, lambda key, shape: take(UNET_PREFIX + key))
    resolve(vae, lambda key, shape: take(VAE_PREFIX + key))
    resolve(text, text_lookup)
    resolve(text_2, text_2_lookup)
    for key in shapes:
        if key in consumed or key in _IGNORED or key.startswith("first_stage_model.loss."):
            continue
        if key.endswith("embeddings.position_ids"):
            continue
        owner = (
            unet
            if key.startswith(UNET_PREFIX)
            else vae
            if key.startswith(VAE_PREFIX)
            else text_2
            if key.startswith(SDXL_OPENCLIP_PREFIX)
            else text
        )
        owner.unexpected.append(key)
    return [unet, vae, text, text_2]


def sdxl_state_dict(
    text: TextEncoder, text_2: ProjectedTextEncoder
) -> Iterator[tuple[str, torch.Tensor]]:
    """Both text towers under sgm single-file names (the UNet and VAE keep ldm's)."""
    for key, value in text.model.state_dict().items():
        yield SDXL_CLIP_PREFIX + "text_model." + text_bare(key), value
    sd = {text_bare(k): v for k, v in text_2.model.state_dict().items()}
    for bare, value in sd.items():
        if bare in _OPENCLIP_TOP:
            yield SDXL_OPENCLIP_PREFIX + _OPENCLIP_TOP[bare], value
    layers = {int(m[1]) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    for i in sorted(layers):
        src, dst = f"encoder.layers.{i}.", f"{SDXL_OPENCLIP_PREFIX}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = torch.cat([sd[f"{src}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")])
            yield f"{dst}attn.in_proj_{kind}", qkv
        for ours, theirs in _OPENCLIP_LAYER.items():
            for kind in ("weight", "bias"):
                yield f"{dst}{theirs}{kind}", sd[f"{src}{ours}{kind}"]
    yield SDXL_OPENCLIP_PREFIX + "text_projection", sd["text_projection.weight"].T
    yield SDXL_OPENCLIP_PREFIX + "logit_scale", torch.tensor(4.6052, dtype=torch.float32)
