"""Text encoders: the CLIP text towers Stable Diffusion conditions on.

SD 1.x uses OpenAI CLIP ViT-L/14's text tower (transformers `CLIPTextModel`, ldm key
prefix `cond_stage_model.transformer.`). SD 2.x uses OpenCLIP ViT-H/14's tower and
takes the penultimate layer's output through the final layer norm; a
`CLIPTextModel` with the last layer dropped computes exactly that, which is how it is
built here (OpenCLIP weights are converted in `checkpoints/openclip.py`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TextEncoderConfig:
    """The `CLIPTextConfig` fields that differ between SD families."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12  # layers actually run (SD 2.x: 23 of OpenCLIP's 24)
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # OpenAI CLIP; OpenCLIP ViT-H uses "gelu"
    layer_norm_eps: float = 1e-5

    def to_transformers(self, **extra):  # -> transformers.CLIPTextConfig
        from transformers import CLIPTextConfig

        return CLIPTextConfig(
            **asdict(self), bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, **extra
        )


class TextEncoder(nn.Module):
    """input_ids [B,77] (any int dtype) -> hidden states [B,77,D] the UNet attends to."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        from transformers import CLIPTextModel

        self.config = config
        self.model = CLIPTextModel(config.to_transformers())

    @property
    def dtype(self) -> torch.dtype:
        # transformers >= 5.6 flattened CLIPTextModel (no `.text_model`); older ones nest it.
        return getattr(self.model, "text_model", self.model).final_layer_norm.weight.dtype

    @property
    def final_layer_norm(self) -> nn.LayerNorm:
        return getattr(self.model, "text_model", self.model).final_layer_norm

    def forward(
        self, input_ids: torch.Tensor, clip_skip: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`clip_skip` (A1111's "Clip skip", int tensor of one element, 1 = the last layer):
        the hidden states `clip_skip - 1` layers before the last, through the final layer
        norm. Without it, the last layer's output (the same as clip_skip 1)."""
        if clip_skip is None:
            return self.model(input_ids=input_ids.long()).last_hidden_state
        out = self.model(input_ids=input_ids.long(), output_hidden_states=True)
        stacked = torch.stack(out.hidden_states)  # [layers + 1, B, T, D], embeddings first
        layers = stacked.shape[0] - 1
        skip = clip_skip.reshape(1).long().clamp(1, layers)
        chosen = torch.index_select(stacked, 0, layers - (skip - 1)).squeeze(0)
        return self.final_layer_norm(chosen)


class PenultimateTextEncoder(TextEncoder):
    """SDXL's first tower (`conditioner.embedders.0`, OpenAI CLIP ViT-L): the hidden states of
    the layer before last, without the final layer norm (sgm's `layer="hidden"`,
    `layer_idx=11`; diffusers' `hidden_states[-2]`). The last layer is kept so that the
    checkpoint's keys load as they are; it does not run in the exported graph."""

    def forward(
        self, input_ids: torch.Tensor, clip_skip: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = self.model(input_ids=input_ids.long(), output_hidden_states=True)
        return out.hidden_states[-2]

    def unused_modules(self) -> tuple[nn.Module, ...]:
        """What the exported graph never runs (the last layer): kohya's SDXL LoRAs carry
        pairs for it (`lora_te1_..._layers_11_`), which change nothing."""
        return (getattr(self.model, "text_model", self.model).encoder.layers[-1],)


class ProjectedTextEncoder(nn.Module):
    """SDXL's second tower (`conditioner.embedders.1`, OpenCLIP ViT-bigG) as transformers'
    `CLIPTextModelWithProjection`: input_ids [B,77] -> (penultimate hidden states without the
    final norm [B,77,D], the pooled embedding [B,P]: the EOS token of the last layer through
    the final norm and `text_projection`, as sgm's `FrozenOpenCLIPEmbedder2`)."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        from transformers import CLIPTextModelWithProjection

        self.config = config
        self.model = CLIPTextModelWithProjection(
            config.to_transformers(projection_dim=config.hidden_size)
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.model.text_projection.weight.dtype

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids=input_ids.long(), output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds
