"""Which preset a model is, or which family a custom one is named after.

Shared by single files (architecture from shapes) and diffusers folders (from config.json):
UNet configs are compared as architectures (head counts however written, attention levels
in any order), prediction type names are normalised, and SD 2.x 768-v vs 512-base, which
have the same shapes, are told apart by the training step like diffusers does.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sd_deploy.models.presets import PRESETS, ModelConfig, get_preset
from sd_deploy.models.unet import UNetConfig

_SD2_BASE_GLOBAL_STEP = 875000  # global_step of the released SD 2.0/2.1 512-base checkpoints


def named_preset(family: str, prediction: str | None) -> tuple[ModelConfig, str]:
    """`--family` skips recognition: that preset, with the wanted prediction type if any."""
    config = get_preset(family)
    how = f"as --family {family} says"
    return (config.with_prediction_type(prediction) if prediction else config), how


def sd2_prediction_from_step(step: Any) -> str:
    """SD 2.x 768-v and 512-base share every shape: 875000 steps is the 512-base release."""
    return "epsilon" if step == _SD2_BASE_GLOBAL_STEP else "v_prediction"


def _unet_heads(c: UNetConfig, channels: int) -> tuple[int, int]:
    """(heads, channels per head) at a width: the two ways of writing heads, made one."""
    if c.num_head_channels == -1:
        return c.num_heads, channels // c.num_heads
    return channels // c.num_head_channels, c.num_head_channels


def _attention_channels(c: UNetConfig) -> set[int]:
    """The widths at which the UNet attends: where head counts must agree."""
    levels = [c.model_channels * m for m in c.channel_mult]
    found = {ch for i, ch in enumerate(levels) if 2**i in c.attention_resolutions}
    return found | {levels[-1]}  # the middle block always attends


def canonical_unet(c: UNetConfig, **changes: Any) -> UNetConfig:
    """attention_resolutions is a set in all but type: (4, 2, 1) and (1, 2, 4) are one model."""
    return replace(c, attention_resolutions=tuple(sorted(set(c.attention_resolutions))), **changes)


def same_unet(a: UNetConfig, b: UNetConfig) -> bool:
    """Equal architectures, however the head count is written (num_heads or head channels)."""
    neutral = {"num_heads": 8, "num_head_channels": -1}
    return canonical_unet(a, **neutral) == canonical_unet(b, **neutral) and all(
        _unet_heads(a, ch) == _unet_heads(b, ch) for ch in _attention_channels(a)
    )


def normalize_prediction(value: str | None) -> str | None:
    """Prediction type as presets spell it ("v" and "eps" are common in metadata)."""
    if value is None:
        return None
    if not isinstance(value, str):  # a config file's list or number: refused by the caller
        return repr(value)
    value = value.strip().lower()
    return {"v": "v_prediction", "v-prediction": "v_prediction", "eps": "epsilon"}.get(value, value)


def custom_base(openclip_like: bool, context_dim: int, prediction: str | None) -> ModelConfig:
    """Sampling defaults for a model that is no preset: named after the closest family."""
    if context_dim == 768 and not openclip_like:
        return PRESETS["sd15"]
    if context_dim == 1024 and openclip_like:
        return PRESETS["sd21-base" if prediction == "epsilon" else "sd21"]
    base = PRESETS["sd21-base" if openclip_like else "sd15"]
    return replace(base, family="custom")
