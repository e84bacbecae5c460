"""LoRA: read the files users have and merge them into the reference modules' weights.

The file formats, scales and deltas are numpy code in `format` (shared with run-time
switching); this package adds what needs PyTorch: the table of LoRA-targetable weights
of a `LoadedModels` (every Linear and Conv2d of the UNet and text encoder, under their
ldm, diffusers and kohya spellings), pickle LoRAs through `torch.load(weights_only=True)`,
and merging in place.

    models = load_models(...)
    merged = merge_loras(models, [parse_lora_arg("style.safetensors:0.8")])

Everything is read and checked before any weight changes: a bad LoRA leaves the models as
they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sd_deploy.engine_dir.lora import (
    PICKLE_SUFFIXES,
    LoraError,
    LoraFile,
    LoraLayer,
    LoraSpec,
    TargetTable,
    addnet_hash,
    flatten,
    lora_from_tensors,
    merged_deltas,
    parse_lora_arg,
    read_lora,
    resolve,
)
from sd_deploy.models import LoadedModels
from sd_deploy.models.checkpoints.diffusers_names import unet_key_to_diffusers
from sd_deploy.models.checkpoints.layout import text_bare
from sd_deploy.models.checkpoints.readers import BoundedFile

__all__ = [
    "AppliedLora",
    "LoraError",
    "LoraFile",
    "LoraLayer",
    "LoraSpec",
    "TargetTable",
    "load_lora",
    "merge_loras",
    "parse_lora_arg",
    "target_table",
]

TARGET_TYPES = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class AppliedLora:
    """A LoRA merged into the weights, as the manifest and PNG parameters record it."""

    name: str
    file: str
    sha256: str
    scale: float
    format: str
    layers: int
    short_hash: str = ""  # A1111's "Lora hashes" value (safetensors data hash, 12 hex)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "file": self.file, "sha256": self.sha256, "scale": self.scale,
            "format": self.format, "layers": self.layers, "short_hash": self.short_hash,
        }  # fmt: skip


def lora_modules(models: LoadedModels) -> dict[str, dict[str, nn.Linear | nn.Conv2d]]:
    """component -> {target weight key in the module's state dict: module}."""
    result: dict[str, dict[str, nn.Linear | nn.Conv2d]] = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(models, component, None)
        if module is None:
            continue
        result[component] = {
            f"{name}.weight": child
            for name, child in module.named_modules()
            if isinstance(child, TARGET_TYPES)
        }
    return result


def target_table(models: LoadedModels) -> TargetTable:
    """Every LoRA-targetable weight of the UNet and text encoder, with its names in files."""
    config = models.config
    table = TargetTable(
        family=config.family,
        context_dim=config.unet.context_dim,
        text_width=config.text_encoder.hidden_size,
    )
    modules = lora_modules(models)
    unet = modules["unet"]
    for target, module in unet.items():  # ldm (sgm) names first: they are never ambiguous
        table.add("unet", target, tuple(module.weight.shape), [target.removesuffix(".weight")])
    for target in unet:
        theirs = unet_key_to_diffusers(target, config.unet.num_res_blocks)
        flat = None if theirs is None else flatten(theirs.removesuffix(".weight"))
        if flat is not None and table.aliases["unet"].get(flat, target) == target:
            table.aliases["unet"][flat] = target
    for component in ("text_encoder", "text_encoder_2"):
        for target, module in modules.get(component, {}).items():
            bare = text_bare(target.removesuffix(".weight"))
            shape = tuple(module.weight.shape)
            table.add(component, target, shape, [bare, "text_model." + bare])
    return table


def load_lora(path: str | Path) -> LoraFile:
    """A LoRA file: `.safetensors`, or a pickle that `torch.load(weights_only=True)` accepts."""
    path = Path(path)
    if path.suffix.lower() not in PICKLE_SUFFIXES or not path.is_file():
        return read_lora(path)
    try:  # BoundedFile: a pickle claiming a 4 GB string in a small file allocates nothing
        with BoundedFile(path) as f:
            data = torch.load(f, map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the user's file
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoraError(
            f"LoRA {path} is a pickle that cannot be loaded safely (weights_only): {text[:160]}; "
            "convert it to .safetensors"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise LoraError(f"LoRA {path} does not hold a dict of tensors")
    tensors = {str(k): v.detach().float().numpy() for k, v in data.items()}
    return lora_from_tensors(tensors, {}, path)


def merge_loras(models: LoadedModels, specs: Sequence[LoraSpec]) -> list[AppliedLora]:
    """Add each LoRA's deltas (times its scale) to the models' weights, in place.

    All files are read and matched first; on any error nothing has changed.
    """
    if not specs:
        return []
    table = target_table(models)
    files = [load_lora(spec.path) for spec in specs]
    resolved = resolve(zip(files, [s.scale for s in specs], strict=True), table)
    deltas = merged_deltas(resolved, table)
    modules = lora_modules(models)
    with torch.no_grad():
        for (component, target), delta in deltas.items():
            weight = modules[component][target].weight
            update = torch.from_numpy(np.ascontiguousarray(delta))
            weight.copy_((weight.float() + update).to(weight.dtype))
    return [
        AppliedLora(
            f.name, f.path.name, f.sha256, spec.scale, f.format, len(f.layers),
            addnet_hash(f.path)[:12] if f.path.suffix.lower() == ".safetensors" else "",
        )
        for f, spec in zip(files, specs, strict=True)
    ]  # fmt: skip
