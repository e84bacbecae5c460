"""`LoadedModels`: the three reference networks and where they came from.

Its own module so that the checkpoint readers (which build one) and `load_models`
(which calls them) do not import each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sd_deploy.models.presets import ModelConfig
from sd_deploy.models.text_encoder import PenultimateTextEncoder, ProjectedTextEncoder, TextEncoder
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
    # SDXL: the OpenCLIP ViT-bigG tower, and a diffusers folder's tokenizer_2/ files.
    text_encoder_2: ProjectedTextEncoder | None = None
    tokenizer_2_dir: Path | None = None

    def modules(self) -> list[nn.Module]:
        found = [self.unet, self.vae, self.text_encoder, self.text_encoder_2]
        return [m for m in found if m is not None]

    def to(self, dtype: torch.dtype) -> LoadedModels:
        for module in self.modules():
            module.to(dtype)
        return self

    def eval(self) -> LoadedModels:
        for module in self.modules():
            module.eval().requires_grad_(False)
        return self


def build_modules(config: ModelConfig, only: str | None = None) -> dict[str, nn.Module]:
    """The family's modules by component name (under the caller's device context: the meta
    device for loading, the CPU with seeded init for random weights); `only`: just that one."""
    makers: dict[str, Callable[[], nn.Module]] = {
        "unet": lambda: UNetModel(config.unet),
        "vae": lambda: AutoencoderKL(config.vae),
    }
    if config.text_encoder_2 is None:
        makers["text_encoder"] = lambda: TextEncoder(config.text_encoder)
    else:
        second = config.text_encoder_2
        makers["text_encoder"] = lambda: PenultimateTextEncoder(config.text_encoder)
        makers["text_encoder_2"] = lambda: ProjectedTextEncoder(second)
    return {name: make() for name, make in makers.items() if only in (None, name)}
