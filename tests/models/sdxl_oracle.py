"""diffusers' SDXL modules holding our sgm-layout weights, made by diffusers' own single-file
conversion (test-only: the oracle of tests/models/test_sdxl_oracle.py and of the pipeline
parity test).

Our modules' tensors go out under sgm single-file names (`ldm_state_dict`), then through
`create_unet_diffusers_config_from_ldm` / `convert_ldm_unet_checkpoint`,
`create_vae_diffusers_config_from_ldm` / `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint` and `convert_open_clip_checkpoint` into
`UNet2DConditionModel`, `AutoencoderKL`, `CLIPTextModel` and `CLIPTextModelWithProjection`,
each loaded strictly.

One adjustment: diffusers' config code recognises SDXL's "text_time" conditioning only at
the real context widths (2048, or 1280 for the refiner); for tiny-xl's 96-wide context the
same config keys are set by hand. The weights still go through diffusers' converter.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from sd_deploy.models import LoadedModels
from sd_deploy.models.checkpoints import ldm_state_dict
from sd_deploy.models.checkpoints.sdxl import SDXL_CLIP_PREFIX, SDXL_OPENCLIP_PREFIX


def sgm_original_config(models: LoadedModels) -> dict[str, Any]:
    """The parts of sd_xl_base.yaml diffusers' config converters read."""
    u, v = models.config.unet, models.config.vae
    unet_params = {
        "adm_in_channels": u.adm_in_channels,
        "num_classes": "sequential",
        "in_channels": u.in_channels,
        "out_channels": u.out_channels,
        "model_channels": u.model_channels,
        "attention_resolutions": list(u.attention_resolutions),
        "num_res_blocks": u.num_res_blocks,
        "channel_mult": list(u.channel_mult),
        "num_head_channels": u.num_head_channels,
        "use_linear_in_transformer": u.use_linear_in_transformer,
        "transformer_depth": list(u.transformer_depth),
        "context_dim": u.context_dim,
    }
    ddconfig = {
        "in_channels": v.in_channels,
        "out_ch": v.out_channels,
        "ch": v.ch,
        "ch_mult": list(v.ch_mult),
        "num_res_blocks": v.num_res_blocks,
        "z_channels": v.z_channels,
    }
    return {
        "model": {
            "params": {
                "scale_factor": v.scaling_factor,
                "network_config": {"params": unet_params},
                "first_stage_config": {"params": {"embed_dim": v.embed_dim, "ddconfig": ddconfig}},
            }
        }
    }


def diffusers_sdxl_modules(models: LoadedModels) -> dict[str, Any]:
    """unet, vae, text_encoder, text_encoder_2 as diffusers / transformers modules."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    checkpoint = ldm_state_dict(models)
    original = sgm_original_config(models)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet_config = create_unet_diffusers_config_from_ldm(original, checkpoint)
        vae_config = create_vae_diffusers_config_from_ldm(
            original, checkpoint, scaling_factor=models.config.vae.scaling_factor
        )
    if unet_config.get("addition_embed_type") != "text_time":  # tiny-xl's narrow context
        unet_config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            class_embed_type=None,
            projection_class_embeddings_input_dim=models.config.unet.adm_in_channels,
        )
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)

    text = CLIPTextModel(models.text_encoder.model.config)
    clip = convert_ldm_clip_checkpoint(checkpoint, remove_prefix=SDXL_CLIP_PREFIX)
    wanted = set(text.state_dict())
    clip = {
        (k if k in wanted else k.removeprefix("text_model.")): v
        for k, v in clip.items()
        if k.startswith("text_model.")
    }
    text.load_state_dict(clip, strict=False)
    missing = wanted - set(clip) - {k for k in wanted if k.endswith("position_ids")}
    assert not missing, sorted(missing)[:3]

    text_2 = CLIPTextModelWithProjection(models.text_encoder_2.model.config)
    openclip = convert_open_clip_checkpoint(text_2, checkpoint, prefix=SDXL_OPENCLIP_PREFIX)
    text_2.load_state_dict(openclip, strict=False)
    wanted_2 = set(text_2.state_dict())
    missing_2 = wanted_2 - set(openclip) - {k for k in wanted_2 if k.endswith("position_ids")}
    assert not missing_2, sorted(missing_2)[:3]
    unexpected_2 = set(openclip) - wanted_2
    assert not unexpected_2, sorted(unexpected_2)[:3]
    modules = {"unet": unet, "vae": vae, "text_encoder": text, "text_encoder_2": text_2}
    return {k: m.eval().requires_grad_(False) for k, m in modules.items()}


def reference_text(theirs: dict[str, Any], ids: torch.Tensor, ids_2: torch.Tensor):
    """diffusers' SDXL prompt encoding (encode_prompt): both penultimate hidden states
    concatenated, and the second tower's text_embeds."""
    with torch.no_grad():
        h1 = theirs["text_encoder"](ids, output_hidden_states=True).hidden_states[-2]
        out = theirs["text_encoder_2"](ids_2, output_hidden_states=True)
    return torch.cat([h1, out.hidden_states[-2]], dim=-1), out.text_embeds
