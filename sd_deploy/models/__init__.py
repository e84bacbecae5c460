"""PyTorch reference modules (ldm key layout), presets, and `load_models`.

`load_models` is the one entry point: it turns a checkpoint file, a diffusers folder,
the built-in default model, or (explicitly) a preset with seeded random weights into
the three modules plus the `ModelConfig` that says how to sample them.
"""

from __future__ import annotations

from sd_deploy.models.loading import DEFAULT_MODEL, LoadedModels, build_random, load_models
from sd_deploy.models.presets import PRESETS, ModelConfig, get_preset

__all__ = [
    "DEFAULT_MODEL",
    "PRESETS",
    "LoadedModels",
    "ModelConfig",
    "build_random",
    "get_preset",
    "load_models",
]
