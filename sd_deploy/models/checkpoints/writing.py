"""Writing: our modules out as an ldm-layout single file that loads here and in ldm tools."""

from __future__ import annotations

from pathlib import Path

import torch

from sd_deploy.engine_dir.atomic import replacing
from sd_deploy.errors import CheckpointError
from sd_deploy.models.checkpoints.layout import (
    CLIP_PREFIX,
    OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    text_bare,
)
from sd_deploy.models.checkpoints.metadata import config_metadata
from sd_deploy.models.checkpoints.openclip import openclip_state_dict
from sd_deploy.models.checkpoints.sdxl import sdxl_state_dict
from sd_deploy.models.loaded import LoadedModels


def ldm_state_dict(
    models: LoadedModels, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The three modules' tensors under ldm single-file names (what `save_checkpoint` writes).

    SD 2.x-style text towers (gelu activation) come out in OpenCLIP layout
    (`cond_stage_model.model.*`), SD 1.x-style ones as `cond_stage_model.transformer.*`.
    dtype: cast floating-point tensors (e.g. torch.float16).
    """
    tensors: dict[str, torch.Tensor] = {}

    def put(name: str, value: torch.Tensor) -> None:
        value = value.detach()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[name] = value.contiguous()

    for key, value in models.unet.state_dict().items():
        put(UNET_PREFIX + key, value)
    for key, value in models.vae.state_dict().items():
        put(VAE_PREFIX + key, value)
    text = models.text_encoder
    if models.text_encoder_2 is not None:  # SDXL: sgm's conditioner.embedders.{0,1}
        for key, value in sdxl_state_dict(text, models.text_encoder_2):
            put(key, value)
    elif text.config.hidden_act == "gelu":
        for key, value in openclip_state_dict(text):
            put(OPENCLIP_PREFIX + key, value)
    else:
        for key, value in text.model.state_dict().items():
            put(CLIP_PREFIX + "text_model." + text_bare(key), value)
    return tensors


def save_checkpoint(
    models: LoadedModels, path: str | Path, dtype: torch.dtype | None = None
) -> Path:
    """Write an ldm-layout single-file `.safetensors` (atomically), with the config as metadata.

    Layout as `ldm_state_dict` (OpenCLIP text layout for SD 2.x-style towers), so the files
    also load in other ldm-based tools. Metadata: family, prediction_type and the whole
    `ModelConfig` as JSON (`sd_deploy.config`), which makes loading exact even for
    architectures that shapes alone cannot pin down (head counts). dtype: cast floats.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: save_checkpoint writes .safetensors files only")
    tensors = ldm_state_dict(models, dtype)
    metadata = config_metadata(models.config)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors creates the file 0600; `replacing` gives it the umask's mode, as any file.
    with replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path
