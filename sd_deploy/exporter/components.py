"""What each exported graph is: its module, fixed I/O names, symbolic shapes, sample inputs.

These names and shapes are the contract the runtime, the TensorRT builder and a
C++ caller rely on (recorded in manifest.json). Pre/post-processing that every
caller would otherwise repeat lives inside the graphs:

- vae_decoder takes the sampler's (scaled) latent and returns RGB in [0, 1];
- vae_encoder takes RGB in [0, 1] and returns the scaled latent mean and std;
- text_encoder takes int32 ids (no int64 needed by callers);
- unet takes float32 timesteps (fractional for Karras/Euler samplers) in any precision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sd_deploy.models import LoadedModels
from sd_deploy.models.unet import sdxl_vector
from sd_deploy.models.vae import VAEDecoder, VAEEncoder

IO_CONVENTIONS = {
    "text_encoder": "input_ids: int32 CLIP BPE ids, BOS first, EOS after the text, padded with "
    "tokenizer.pad_token_id to max_length (one 77-token chunk of a prompt); clip_skip (when the "
    "graph has it): int32 [1], A1111's Clip skip, 1 .. model.clip_skip_max, 1 = last layer; "
    "output: hidden states the UNet attends to",
    "unet": "sample: the scheduler-scaled latent; timestep: float32, one per batch row; "
    "encoder_hidden_states: text_encoder outputs of a prompt's chunks concatenated along the "
    "sequence (context_length = 77 x chunks, within shape_ranges.context_length); "
    "model_output: epsilon or v per model.prediction_type. With guidance run uncond and cond "
    "rows in one call",
    "text_encoder_2": "SDXL's second tower (OpenCLIP ViT-bigG): input_ids as text_encoder's, "
    "padded with tokenizer_2.pad_token_id; text_embeddings: penultimate hidden states (no final "
    "norm), concatenated after text_encoder's on the last axis to make the unet's context; "
    "text_embeds: the pooled, projected EOS embedding (the unet's text_embeds input)",
    "vae_decoder": "latent: the sampler's latent (scaling_factor is applied inside); "
    "images: RGB NCHW in [0, 1]",
    "vae_encoder": "images: RGB NCHW in [0, 1]; latent_mean / latent_std: already multiplied "
    "by scaling_factor, so latent = latent_mean + latent_std * N(0, 1)",
}


class TextEncoderGraph(nn.Module):
    """int32 ids in, hidden states out; the layer is chosen by `clip_skip` at run time."""

    def __init__(self, models: LoadedModels) -> None:
        super().__init__()
        self.text_encoder = models.text_encoder

    def forward(self, input_ids: torch.Tensor, clip_skip: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids.long(), clip_skip)


class FixedLayerTextEncoderGraph(TextEncoderGraph):
    """SD 2.x: the layer is fixed (built in), so there is no `clip_skip` input."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.text_encoder(input_ids.long())


def clip_skip_max(models: LoadedModels) -> int:
    """The largest Clip skip the text encoder graph serves (1: its layer is fixed)."""
    if models.config.fixed_text_layer:
        return 1
    return models.config.text_encoder.num_hidden_layers


class UNetGraph(nn.Module):
    """The UNet with float32 timesteps whatever the graph precision."""

    def __init__(self, models: LoadedModels) -> None:
        super().__init__()
        self.unet = models.unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(sample, timestep.float(), encoder_hidden_states)


SDXL_UNET_CONVENTIONS = (
    IO_CONVENTIONS["unet"]
    + "; SDXL: encoder_hidden_states is [text_encoder | text_encoder_2] text_embeddings "
    "concatenated on the last axis; text_embeds: text_encoder_2's text_embeds of the first "
    "prompt chunk; time_ids: float32 [original_height, original_width, crop_top, crop_left, "
    "target_height, target_width] in pixels (model.time_ids); an empty negative prompt uses "
    "zeros for both (model.zero_negative_for_empty_prompt)"
)
SDXL_TIME_IDS = [
    "original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width"
]  # fmt: skip


class SDXLTextEncoder2Graph(nn.Module):
    """int32 ids in; penultimate hidden states and the pooled projected embedding out."""

    def __init__(self, models: LoadedModels) -> None:
        super().__init__()
        if models.text_encoder_2 is None:
            raise ValueError("text_encoder_2 is SDXL's only")
        self.text_encoder = models.text_encoder_2

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_encoder(input_ids.long())


class SDXLUNetGraph(nn.Module):
    """The SDXL UNet: the vector conditioning (pooled text + size embeddings) built inside."""

    def __init__(self, models: LoadedModels) -> None:
        super().__init__()
        self.unet = models.unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        vector = sdxl_vector(text_embeds, time_ids)
        return self.unet(sample, timestep.float(), encoder_hidden_states, vector)


@dataclass(frozen=True)
class GraphInput:
    name: str
    shape: tuple[int | str, ...]
    kind: str  # "float" follows the graph precision; "float32" / "int32" are fixed


@dataclass(frozen=True)
class ComponentGraph:
    """One exportable component."""

    name: str
    build: Callable[[LoadedModels], nn.Module]
    inputs: tuple[GraphInput, ...]
    outputs: tuple[tuple[str, tuple[int | str, ...]], ...]
    # Exported in fp32 even with --fp16 (the SDXL VAE: its activations overflow fp16).
    keep_fp32: bool = False

    def input_dtype(self, graph_input: GraphInput, fp16: bool) -> str:
        if graph_input.kind == "float":
            return "float16" if fp16 else "float32"
        return graph_input.kind


def component_graphs(models: LoadedModels) -> dict[str, ComponentGraph]:
    """The four graphs with shapes filled in from this model's sizes."""
    cfg = models.config
    text_dim = cfg.text_encoder.hidden_size
    tokens = cfg.text_encoder.max_position_embeddings
    text_inputs = [GraphInput("input_ids", ("cfg_batch", tokens), "int32")]
    if not cfg.fixed_text_layer:
        text_inputs.append(GraphInput("clip_skip", (1,), "int32"))
    lat = cfg.latent_channels
    latent_shape = ("batch", lat, "latent_height", "latent_width")
    image_shape = ("batch", 3, "height", "width")
    unet_latent = ("cfg_batch", lat, "latent_height", "latent_width")
    if cfg.is_sdxl:
        return sdxl_component_graphs(models)
    return {
        "text_encoder": ComponentGraph(
            "text_encoder",
            FixedLayerTextEncoderGraph if cfg.fixed_text_layer else TextEncoderGraph,
            tuple(text_inputs),
            (("text_embeddings", ("cfg_batch", tokens, text_dim)),),
        ),
        "unet": ComponentGraph(
            "unet",
            UNetGraph,
            (
                GraphInput("sample", unet_latent, "float"),
                GraphInput("timestep", ("cfg_batch",), "float32"),
                GraphInput(
                    "encoder_hidden_states", ("cfg_batch", "context_length", text_dim), "float"
                ),
            ),
            (("model_output", unet_latent),),
        ),
        "vae_decoder": ComponentGraph(
            "vae_decoder",
            lambda m: VAEDecoder(m.vae),
            (GraphInput("latent", latent_shape, "float"),),
            (("images", image_shape),),
        ),
        "vae_encoder": ComponentGraph(
            "vae_encoder",
            lambda m: VAEEncoder(m.vae),
            (GraphInput("images", image_shape, "float"),),
            (("latent_mean", latent_shape), ("latent_std", latent_shape)),
        ),
    }


def sdxl_component_graphs(models: LoadedModels) -> dict[str, ComponentGraph]:
    """SDXL's five graphs: two text towers, the UNet with text_embeds and time_ids, the VAE
    (kept fp32 under --fp16)."""
    cfg = models.config
    assert cfg.text_encoder_2 is not None
    tokens = cfg.text_encoder.max_position_embeddings
    ids = (GraphInput("input_ids", ("cfg_batch", tokens), "int32"),)
    width_1, width_2 = cfg.text_encoder.hidden_size, cfg.text_encoder_2.hidden_size
    lat = cfg.latent_channels
    latent_shape = ("batch", lat, "latent_height", "latent_width")
    image_shape = ("batch", 3, "height", "width")
    unet_latent = ("cfg_batch", lat, "latent_height", "latent_width")
    return {
        "text_encoder": ComponentGraph(
            "text_encoder",
            FixedLayerTextEncoderGraph,
            ids,
            (("text_embeddings", ("cfg_batch", tokens, width_1)),),
        ),
        "text_encoder_2": ComponentGraph(
            "text_encoder_2",
            SDXLTextEncoder2Graph,
            ids,
            (
                ("text_embeddings", ("cfg_batch", tokens, width_2)),
                ("text_embeds", ("cfg_batch", width_2)),
            ),
        ),
        "unet": ComponentGraph(
            "unet",
            SDXLUNetGraph,
            (
                GraphInput("sample", unet_latent, "float"),
                GraphInput("timestep", ("cfg_batch",), "float32"),
                GraphInput(
                    "encoder_hidden_states",
                    ("cfg_batch", "context_length", width_1 + width_2),
                    "float",
                ),
                GraphInput("text_embeds", ("cfg_batch", width_2), "float"),
                GraphInput("time_ids", ("cfg_batch", len(SDXL_TIME_IDS)), "float32"),
            ),
            (("model_output", unet_latent),),
        ),
        "vae_decoder": ComponentGraph(
            "vae_decoder",
            lambda m: VAEDecoder(m.vae),
            (GraphInput("latent", latent_shape, "float"),),
            (("images", image_shape),),
            keep_fp32=True,
        ),
        "vae_encoder": ComponentGraph(
            "vae_encoder",
            lambda m: VAEEncoder(m.vae),
            (GraphInput("images", image_shape, "float"),),
            (("latent_mean", latent_shape), ("latent_std", latent_shape)),
            keep_fp32=True,
        ),
    }


def sample_inputs(
    graph: ComponentGraph, shapes: dict[str, list[int]], fp16: bool, seed: int
) -> dict[str, np.ndarray]:
    """Seeded inputs of realistic magnitude for export tracing and validation."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for graph_input in graph.inputs:
        shape = shapes[graph_input.name]
        dtype = np.dtype(graph.input_dtype(graph_input, fp16))
        if graph_input.name == "input_ids":
            ids = rng.integers(0, 49406, size=shape)
            ids[:, 0] = 49406
            length = rng.integers(2, shape[1], size=shape[0])
            for row, n in enumerate(length):
                ids[row, n] = 49407
                ids[row, n + 1 :] = 49407
            arrays[graph_input.name] = ids.astype(dtype)
        elif graph_input.name == "clip_skip":
            # every model with the input has 2+ layers; 2 checks the non-default path
            arrays[graph_input.name] = np.full(shape, 2, dtype=dtype)
        elif graph_input.name == "timestep":
            arrays[graph_input.name] = rng.uniform(0, 999, size=shape).astype(dtype)
        elif graph_input.name == "time_ids":  # sizes in pixels, crops smaller
            sizes = rng.integers(64, 2048, size=(shape[0], 2)).astype(np.float64)
            crops = rng.integers(0, 128, size=(shape[0], 2)).astype(np.float64)
            arrays[graph_input.name] = np.concatenate([sizes, crops, sizes], 1).astype(dtype)
        elif graph_input.name == "images":
            arrays[graph_input.name] = rng.uniform(0, 1, size=shape).astype(dtype)
        else:
            arrays[graph_input.name] = rng.standard_normal(size=shape).astype(dtype)
    return arrays
