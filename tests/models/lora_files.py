"""Seeded LoRA files in the formats users have, written with safetensors' own writer.

Shared by the merge, oracle, export and run-time switching tests. Module names come from
the model's own modules (ldm names) through diffusers' names, so the files are what kohya
(which trains SD 1.x on diffusers modules) and diffusers/PEFT write for such a model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from sd_deploy.models import LoadedModels
from sd_deploy.models.checkpoints.diffusers_names import unet_key_to_diffusers
from sd_deploy.models.checkpoints.layout import text_bare
from sd_deploy.models.lora import lora_modules

# A UNet sample over every kind of layer: attention (self/cross, out), feed-forward, 1x1
# conv projections, 3x3 resnet convs (LoCon), time embedding, skip conv, down/up samplers.
UNET_PATTERNS = (
    "attn1.to_q", "attn1.to_out.0", "attn2.to_k", "attn2.to_v", "ff.net.0.proj", "ff.net.2",
    "proj_in", "proj_out", "in_layers.2", "out_layers.3", "emb_layers.1", "skip_connection",
    ".op", "time_embed.0", ".conv", "input_blocks.0.0",
)  # fmt: skip
TEXT_PATTERNS = ("self_attn.q_proj", "self_attn.out_proj", "mlp.fc1", "self_attn.v_proj")


def targets(models: LoadedModels, every: bool = False) -> dict[str, dict[str, nn.Module]]:
    """The modules a seeded LoRA covers: a sample of every kind, or every targetable one."""
    chosen: dict[str, dict[str, nn.Module]] = {}
    for component, modules in lora_modules(models).items():
        patterns = UNET_PATTERNS if component == "unet" else TEXT_PATTERNS
        chosen[component] = {
            t: m
            for t, m in modules.items()
            if every or any(p in t.removesuffix(".weight") for p in patterns)
        }
    return chosen


def pair(module: nn.Module, rank: int, g: torch.Generator, magnitude: float):
    weight = module.weight
    if weight.ndim == 4:
        out, fan_in, kh, kw = weight.shape
        down = torch.randn(rank, fan_in, kh, kw, generator=g) / (fan_in * kh * kw) ** 0.5
        up = torch.randn(out, rank, 1, 1, generator=g) * magnitude
    else:
        out, fan_in = weight.shape
        down = torch.randn(rank, fan_in, generator=g) / fan_in**0.5
        up = torch.randn(out, rank, generator=g) * magnitude
    return down, up


def names(models: LoadedModels, component: str, target: str) -> tuple[str, str]:
    """(kohya name, diffusers module name) of a target weight; SDXL's towers are kohya's
    lora_te1_ / lora_te2_."""
    if component == "unet":
        module = unet_key_to_diffusers(target, models.config.unet.num_res_blocks)
        module = module.removesuffix(".weight")
        return "lora_unet_" + module.replace(".", "_"), "unet." + module
    module = "text_model." + text_bare(target.removesuffix(".weight"))
    module = module.replace("text_model.text_projection", "text_projection")
    two_towers = getattr(models, "text_encoder_2", None) is not None
    prefix = {"text_encoder": "lora_te1_" if two_towers else "lora_te_"}.get(component, "lora_te2_")
    return prefix + module.replace(".", "_"), f"{component}.{module}"


_PROCESSOR = {
    "to_q": "to_q_lora",
    "to_k": "to_k_lora",
    "to_v": "to_v_lora",
    "to_out.0": "to_out_lora",
}
_TEXT_PROCESSOR = {"q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora"}
_TEXT_PROCESSOR["out_proj"] = "to_out_lora"


def old_diffusers_name(module: str) -> str:
    """The pre-PEFT diffusers name of a LoRA pair (attention processors, lora_linear_layer)."""
    head, _, leaf = module.rpartition(".")
    if module.startswith("unet."):
        for ours, theirs in _PROCESSOR.items():
            if module.endswith("." + ours) and ".attn" in module:
                return module.removesuffix("." + ours) + ".processor." + theirs
        return module + ".lora"
    if leaf in _TEXT_PROCESSOR:
        return f"{head}.{_TEXT_PROCESSOR[leaf]}"
    return module + ".lora_linear_layer"


def write_lora(
    path: Path,
    models: LoadedModels,
    fmt: str,
    *,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    magnitude: float = 0.05,
    every: bool = False,
    components: Iterable[str] = ("unet", "text_encoder"),
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A seeded LoRA in `fmt`: "kohya", "peft" (lora_A/lora_B) or "lora_down_up" (old diffusers:
    attention processors' to_q_lora.down, lora.down, text lora_linear_layer.down; no alpha)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    chosen = targets(models, every)
    for component in components:
        for target, module in chosen[component].items():
            down, up = pair(module, rank, g, magnitude)
            kohya, theirs = names(models, component, target)
            if fmt == "kohya":
                tensors[f"{kohya}.lora_down.weight"] = down
                tensors[f"{kohya}.lora_up.weight"] = up
                if alpha is not None:
                    tensors[f"{kohya}.alpha"] = torch.tensor(float(alpha))
            elif fmt == "peft":
                tensors[f"{theirs}.lora_A.weight"] = down
                tensors[f"{theirs}.lora_B.weight"] = up
            elif fmt == "lora_down_up":
                old = old_diffusers_name(theirs)
                tensors[f"{old}.down.weight"] = down
                tensors[f"{old}.up.weight"] = up
            else:
                raise ValueError(fmt)
    metadata = {"format": "pt"}
    if fmt == "peft" and alpha is not None:
        packed = {}
        for component in components:
            packed[f"{component}.r"] = rank
            packed[f"{component}.lora_alpha"] = alpha
            packed[f"{component}.target_modules"] = sorted(
                # suffixes PEFT matches whether or not CLIP nests `text_model.`
                names(models, component, t)[1].split(".", 1)[1].removeprefix("text_model.")
                for t in chosen[component]
            )
        metadata["lora_adapter_metadata"] = json.dumps(packed)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path
