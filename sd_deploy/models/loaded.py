"""`LoadedModels`: the three reference networks and where they came from.

Its own module so that the checkpoint readers (which build one) and `load_models`
(which calls them) do not import each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sd_deploy.models.presets import ModelConfig
from sd_deploy.models.text_encoder import TextEncoder
from sd_deploy.models.unet import UNetModel
from sd_deploy.models.vae import AutoencoderKL


@dataclass
class LoadedModels:
    """The three networks, their config, and where they came from (for the manifest)."""

    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: TextEncoder
    config: ModelConfig
    source: str
    source_sha256: str | None = None
    # A diffusers folder brings its own tokenizer files; otherwise the packaged CLIP BPE.
    tokenizer_dir: Path | None = None

    def to(self, dtype: torch.dtype) -> LoadedModels:
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(dtype)
        return self

    def eval(self) -> LoadedModels:
        for module in (self.unet, self.vae, self.text_encoder):
            module.eval().requires_grad_(False)
        return self
