"""PyTorch reference modules (ldm key layout), presets, and `load_models`.

`load_models` is the one entry point: it turns a checkpoint file, a diffusers folder,
the built-in default model, or (explicitly) a preset with seeded random weights into
the three modules plus the `ModelConfig` that says how to sample them.

The names below are imported on first use (PEP 562), so that the numpy-only modules of
this package (`shapes_data`, `shapes_check`: the default model's ground truth) import
without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sd_deploy.models.loaded import LoadedModels
    from sd_deploy.models.loading import DEFAULT_MODEL, build_random, load_models
    from sd_deploy.models.presets import PRESETS, ModelConfig, get_preset

_HOMES = {
    "DEFAULT_MODEL": "sd_deploy.models.loading",
    "build_random": "sd_deploy.models.loading",
    "load_models": "sd_deploy.models.loading",
    "LoadedModels": "sd_deploy.models.loaded",
    "PRESETS": "sd_deploy.models.presets",
    "ModelConfig": "sd_deploy.models.presets",
    "get_preset": "sd_deploy.models.presets",
}

__all__ = [
    "DEFAULT_MODEL",
    "PRESETS",
    "LoadedModels",
    "ModelConfig",
    "build_random",
    "get_preset",
    "load_models",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'sd_deploy.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
