"""Checkpoints: single files and diffusers folders in, ldm-layout single files out.

What loads:

- Single files: `.safetensors` (memory-mapped; each tensor is read when its module parameter
  is filled, never the whole file first) and `.ckpt`/`.pt`/`.pth`/`.bin` through
  `torch.load(weights_only=True)` (memory-mapped for zip archives). The format is told from
  the file's first bytes, the extension only has to be one of those. A pickle that needs
  more than tensors and plain containers is refused: unpickling arbitrary objects can run
  code. Keys follow the original ldm layout: `model.diffusion_model.*` (UNet),
  `first_stage_model.*` (VAE), `cond_stage_model.transformer.*` (SD 1.x, OpenAI CLIP in
  transformers' layout) or `cond_stage_model.model.*` (SD 2.x, OpenCLIP layout, converted
  here). `state_dict` nesting, ldm's DDPM buffers (`betas`, `alphas_cumprod` ...),
  `global_step` and fp16/bf16 weights (cast to the fp32 modules on load) are handled.
- EMA: when a checkpoint carries a complete set of UNet EMA weights (`model_ema.*`, ldm's
  flattened names) they are used for the UNet, as ldm does for sampling with `use_ema`
  (EMA weights are the ones meant for inference); `use_ema=False` takes the raw weights.
  Incomplete EMA sets are ignored.
- Diffusers folders (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
  `scheduler/`): architectures come from the config.json files, the prediction type and
  noise schedule from `scheduler/scheduler_config.json`, weights (safetensors or `.bin`,
  sharded or not, fp16 variants as a fallback) are renamed to the ldm layout.

How the model is recognised (single files), in this order; `family=` (a preset name) and
`prediction_type=` override it:

1. Files written by `save_checkpoint` carry their `ModelConfig` in the safetensors metadata.
2. Otherwise the architecture is read from tensor shapes (channels, levels, blocks, where
   attention sits, context width, conv vs linear projections, text width and depth). If it
   equals a preset's (sd15, sd21/sd21-base, tiny, tiny-v), that preset is used; if not, the
   configs are built from the shapes (family named after the context width: 768 -> sd15,
   1024 -> sd21/sd21-base, else "custom"). Head counts cannot be read from weights; such
   custom models get 8 heads (conv projections, SD 1.x style) or 64 channels per head
   (linear projections, SD 2.x style).
3. Prediction type: metadata (`prediction_type`, or ModelSpec's `modelspec.prediction_type`)
   if present, else the matched preset's. SD 2.x 768-v (v_prediction) and 512-base
   (epsilon) have identical shapes and cannot be told apart from weights; like diffusers,
   a `global_step` of 875000 (the released 512-base) means epsilon, anything else
   v_prediction. Pass `--prediction-type` when that guess is wrong.

Writing: `save_checkpoint` writes an ldm-layout `.safetensors` (`ldm_state_dict` gives the
tensors) with the `ModelConfig` in its metadata; SD 2.x-style text towers go out in OpenCLIP
layout so that the OpenCLIP conversion is exercised by every round trip.

Memory: modules are created on the meta device and allocated once (fp32, uninitialised),
then filled tensor by tensor; memory-mapped files are re-mapped every 256 MiB read so that
pages already copied stop counting. Loading a full-size fp16 SD 1.5 file peaks at about
1.15x the fp32 model size (tools/measure_load_memory.py).

Errors are `CheckpointError`s with a one-line message naming the file and the first few
offending keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sd_deploy.errors import CheckpointError
from sd_deploy.models.loading import LoadedModels
from sd_deploy.models.presets import PRESETS, ModelConfig, get_preset
from sd_deploy.models.text_encoder import TextEncoder, TextEncoderConfig
from sd_deploy.models.unet import UNetConfig, UNetModel
from sd_deploy.models.vae import AutoencoderKL, VAEConfig

__all__ = [
    "DEFAULT_MODEL_PATH",
    "SINGLE_FILE_SUFFIXES",
    "file_sha256",
    "ldm_state_dict",
    "load_checkpoint",
    "load_default_model",
    "save_checkpoint",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
DEFAULT_MODEL_PATH = (
    Path(__file__).resolve().parent.parent / "data" / "default_model" / "model.safetensors"
)

# Metadata keys save_checkpoint writes (values are strings, as safetensors requires).
META_FAMILY = "family"
META_PREDICTION = "prediction_type"
META_CONFIG = "sd_deploy.config"
META_WRITER = "sd_deploy.writer"

# ldm LatentDiffusion buffers and bookkeeping that single files often carry.
_IGNORED_KEYS = frozenset(
    {
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
        "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
        "logvar", "lvlb_weights", "scale_factor", "model_ema.decay", "model_ema.num_updates",
        OPENCLIP_PREFIX + "text_projection", OPENCLIP_PREFIX + "logit_scale",
        OPENCLIP_PREFIX + "attn_mask",
    }
)  # fmt: skip
_IGNORED_PREFIXES = ("first_stage_model.loss.",)
_SD2_BASE_GLOBAL_STEP = 875000  # global_step of the released SD 2.0/2.1 512-base checkpoints
_HASH_CHUNK = 1 << 20
# Re-map a memory-mapped file (safetensors or zip .ckpt) after this many bytes were read from it,
# so pages already copied into the modules stop counting towards resident memory.
_REMAP_BYTES = 256 << 20
_SHOWN_KEYS = 3
_COMPONENTS = ("unet", "vae", "text_encoder")


# --------------------------------------------------------------------------- small helpers


def _one_line(text: object, limit: int = 200) -> str:
    """First line of an exception message, shortened: user errors are one line."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = lines[0] if lines else type(text).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _first(keys: Iterable[str], n: int = _SHOWN_KEYS) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks (memory-light)."""
    digest = hashlib.sha256()
    _hash_into(digest, Path(path))
    return digest.hexdigest()


def _hash_into(digest: Any, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in t)


# --------------------------------------------------------------------------- tensor readers


class _Reader:
    """Lazy access to one checkpoint's tensors: names and shapes up front, data on demand."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]
    extras: dict[str, Any]  # non-tensor entries (global_step, epoch ...)

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _SafetensorsReader(_Reader):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.extras = {}
        self._handle: Any = None
        self._read_since_open = 0
        handle = self._open()
        try:
            self.metadata = dict(handle.metadata() or {})
            self.shapes = {k: _shape(handle.get_slice(k).get_shape()) for k in handle.keys()}
        except Exception as e:  # any reader failure means a broken file
            self.close()
            raise CheckpointError(f"{path}: cannot read safetensors header: {_one_line(e)}") from e

    def _open(self) -> Any:
        from safetensors import safe_open

        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as e:  # SafetensorError, OSError ...
            raise CheckpointError(
                f"{self.path} is not a valid safetensors file (truncated or corrupted?): "
                f"{_one_line(e)}"
            ) from e
        self._read_since_open = 0
        return self._handle

    def get(self, key: str) -> torch.Tensor:
        if self._handle is None or self._read_since_open > _REMAP_BYTES:
            self.close()
            self._open()
        try:
            tensor = self._handle.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {key}: {_one_line(e)}") from e
        self._read_since_open += tensor.numel() * tensor.element_size()
        return tensor

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.__exit__(None, None, None)


class _TorchReader(_Reader):
    """`torch.load(weights_only=True)`; zip archives are memory-mapped, re-mapped as read."""

    def __init__(self, path: Path, zip_archive: bool) -> None:
        self.path = path
        self.metadata = {}
        self._mmap = zip_archive
        self._tensors, self.extras = self._load()
        if not self._tensors:
            raise CheckpointError(f"{path} is not a checkpoint: it holds no tensors")
        self.shapes = {k: _shape(v.shape) for k, v in self._tensors.items()}
        self._read_since_load = 0

    def _load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        import pickle

        path = self.path
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=self._mmap)
        except pickle.UnpicklingError as e:
            text = str(e)
            found = re.search(r"GLOBAL ([\w.]+)", text)
            if found or "global" in text.lower():
                what = f" ({found.group(1)})" if found else ""
                raise CheckpointError(
                    f"{path} needs Python objects beyond tensors to unpickle{what}, and "
                    "unpickling arbitrary objects can execute code: refusing to load it; "
                    "convert it to .safetensors with a tool you trust"
                ) from e
            raise CheckpointError(
                f"{path} is not a PyTorch checkpoint (corrupted or not a weights file): "
                f"{_one_line(text.split('WeightsUnpickler error:')[-1])}"
            ) from e
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{path} cannot be read as a PyTorch checkpoint (truncated or corrupted?): "
                f"{_one_line(e)}"
            ) from e
        extras: dict[str, Any] = {}
        while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            extras.update({k: v for k, v in obj.items() if k != "state_dict"})
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(
                f"{path} is not a checkpoint: it holds a {type(obj).__name__}, "
                "not a dict of tensors"
            )
        extras.update({k: v for k, v in obj.items() if isinstance(v, int | float | str | bool)})
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, extras

    def get(self, key: str) -> torch.Tensor:
        if self._mmap and self._read_since_load > _REMAP_BYTES:
            # A fresh mapping; the old one (and its resident pages) goes with its last tensor.
            self._tensors, _ = self._load()
            self._read_since_load = 0
        tensor = self._tensors[key]
        self._read_since_load += tensor.numel() * tensor.element_size()
        return tensor

    def close(self) -> None:
        self._tensors = {}


class _MultiReader(_Reader):
    """Several files of one component (sharded diffusers weights) seen as one."""

    def __init__(self, path: Path, readers: list[_Reader]) -> None:
        self.path = path
        self.readers = readers
        self.metadata = {}
        self.extras = {}
        self.shapes = {}
        self._owner: dict[str, _Reader] = {}
        for reader in readers:
            for key, shape in reader.shapes.items():
                if key in self._owner:
                    raise CheckpointError(
                        f"{path}: tensor {key} is in both {self._owner[key].path.name} "
                        f"and {reader.path.name}"
                    )
                self._owner[key] = reader
                self.shapes[key] = shape

    def get(self, key: str) -> torch.Tensor:
        return self._owner[key].get(key)

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


def _open_file(path: Path) -> _Reader:
    """Open a single weights file, telling safetensors from PyTorch by its first bytes."""
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise CheckpointError(
            f"{path}: unknown checkpoint type {path.suffix or '(no extension)'!r}; expected a "
            f"{', '.join(SINGLE_FILE_SUFFIXES)} file or a diffusers folder"
        )
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {_one_line(e)}") from e
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint")
    if head[:4] == b"PK\x03\x04":
        return _TorchReader(path, zip_archive=True)
    if len(head) >= 9 and head[8:9] == b"{":
        header_len = struct.unpack("<Q", head[:8])[0]
        if header_len > size - 8:
            raise CheckpointError(
                f"{path} is not a valid safetensors file (truncated or corrupted?): its header "
                f"claims {header_len} bytes but the file has {size}"
            )
        return _SafetensorsReader(path)
    if head[:1] == b"\x80":  # a pickle (legacy, non-zip torch.save format)
        return _TorchReader(path, zip_archive=False)
    raise CheckpointError(
        f"{path} is not a checkpoint: neither safetensors nor a PyTorch archive or pickle "
        f"(starts with {head[:12]!r})"
    )


# --------------------------------------------------------------------------- key mapping


@dataclass
class _Source:
    """Where one module tensor comes from: a file key, its shape there, how to read it."""

    key: str  # the file key named in messages
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


def _plain(reader: _Reader, key: str) -> _Source:
    return _Source(key, reader.shapes[key], lambda: reader.get(key))


def _sliced(reader: _Reader, key: str, index: int, parts: int) -> _Source | None:
    shape = reader.shapes[key]
    if not shape or shape[0] % parts:
        return None
    n = shape[0] // parts

    def load() -> torch.Tensor:
        return reader.get(key)[index * n : (index + 1) * n]

    return _Source(key, (n, *shape[1:]), load)


def _as_conv1x1(source: _Source, expected: tuple[int, ...]) -> _Source:
    """Linear [O,I] weights stored for a 1x1 conv [O,I,1,1] (VAE attention)."""
    if len(expected) == 4 and len(source.shape) == 2 and expected == (*source.shape, 1, 1):
        load = source.load
        return _Source(source.key, expected, lambda: load().reshape(expected))
    return source


def _text_bare(key: str) -> str:
    """CLIPTextModel key without `TextEncoder`'s `model.` and transformers' `text_model.`."""
    return key.removeprefix("model.").removeprefix("text_model.")


_OPENCLIP_LAYER = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}
_OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def _openclip_key(bare: str) -> tuple[str, int | None] | None:
    """CLIPTextModel key (bare) -> (OpenCLIP key, third of in_proj or None)."""
    if bare in _OPENCLIP_TOP:
        return _OPENCLIP_TOP[bare], None
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", bare)
    if not m:
        return None
    block, rest = f"transformer.resblocks.{m[1]}.", m[2]
    qkv = re.fullmatch(r"self_attn\.([qkv]_proj)\.(weight|bias)", rest)
    if qkv:
        return f"{block}attn.in_proj_{qkv[2]}", _QKV[qkv[1]]
    for ours, theirs in _OPENCLIP_LAYER.items():
        if rest.startswith(ours):
            return block + theirs + rest[len(ours) :], None
    return None


_UNET_TOP = {
    "time_embed.0.": "time_embedding.linear_1.",
    "time_embed.2.": "time_embedding.linear_2.",
    "input_blocks.0.0.": "conv_in.",
    "out.0.": "conv_norm_out.",
    "out.2.": "conv_out.",
}
_UNET_RESNET = (
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("emb_layers.1.", "time_emb_proj."),
    ("skip_connection.", "conv_shortcut."),
)


def _unet_resnet(rest: str) -> str:
    for ours, theirs in _UNET_RESNET:
        if rest.startswith(ours):
            return theirs + rest[len(ours) :]
    return rest


def _unet_key_to_diffusers(key: str, layers_per_block: int) -> str | None:
    """ldm UNet key -> diffusers UNet2DConditionModel key (the generalised unet_conversion_map)."""
    for ours, theirs in _UNET_TOP.items():
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    per_level = layers_per_block + 1
    if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", key):
        level, j = divmod(int(m[1]) - 1, per_level)
        if j == layers_per_block:
            return f"down_blocks.{level}.downsamplers.0.conv." + m[3].removeprefix("op.")
        if m[2] == "0":
            return f"down_blocks.{level}.resnets.{j}." + _unet_resnet(m[3])
        return f"down_blocks.{level}.attentions.{j}." + m[3]
    if m := re.fullmatch(r"middle_block\.(\d)\.(.+)", key):
        if m[1] == "1":
            return "mid_block.attentions.0." + m[2]
        return f"mid_block.resnets.{int(m[1]) // 2}." + _unet_resnet(m[2])
    if m := re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", key):
        level, j = divmod(int(m[1]), per_level)
        if m[2] == "0":
            return f"up_blocks.{level}.resnets.{j}." + _unet_resnet(m[3])
        if m[3].startswith("conv."):
            return f"up_blocks.{level}.upsamplers.0." + m[3]
        return f"up_blocks.{level}.attentions.{j}." + m[3]
    return None


# Current diffusers names first, then the pre-0.14 ones (query/key/value/proj_attn).
_VAE_ATTN = {
    "norm.": ("group_norm.",),
    "q.": ("to_q.", "query."),
    "k.": ("to_k.", "key."),
    "v.": ("to_v.", "value."),
    "proj_out.": ("to_out.0.", "proj_attn."),
}


def _vae_keys_to_diffusers(key: str, levels: int) -> tuple[str, ...]:
    """ldm VAE key -> candidate diffusers AutoencoderKL keys."""
    if m := re.fullmatch(
        r"(encoder|decoder)\.(down|up)\.(\d+)\.(block|downsample|upsample)\.(.+)", key
    ):
        part, direction, index, kind, rest = m.groups()
        level = int(index) if direction == "down" else levels - 1 - int(index)
        block = f"{part}.{direction}_blocks.{level}."
        if kind == "block":
            rest = rest.replace("nin_shortcut.", "conv_shortcut.")
            return (block + "resnets." + rest,)
        return (block + f"{kind}rs.0." + rest,)
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.block_(\d)\.(.+)", key):
        rest = m[3].replace("nin_shortcut.", "conv_shortcut.")
        return (f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{rest}",)
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(.+)", key):
        for ours, theirs in _VAE_ATTN.items():
            if m[2].startswith(ours):
                tail = m[2][len(ours) :]
                return tuple(f"{m[1]}.mid_block.attentions.0.{t}{tail}" for t in theirs)
    if m := re.fullmatch(r"(encoder|decoder)\.norm_out\.(.+)", key):
        return (f"{m[1]}.conv_norm_out.{m[2]}",)
    return (key,)


# --------------------------------------------------------------------------- configs


def _config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """ModelConfig from `asdict` output (lists back to tuples, unknown fields dropped)."""

    def build(cls: Any, values: dict[str, Any]) -> Any:
        known = {f.name for f in fields(cls)}
        kwargs = {
            k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known
        }
        return cls(**kwargs)

    parts = {
        "unet": build(UNetConfig, data["unet"]),
        "vae": build(VAEConfig, data["vae"]),
        "text_encoder": build(TextEncoderConfig, data["text_encoder"]),
    }
    rest = {k: v for k, v in data.items() if k not in parts}
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**parts, **{k: v for k, v in rest.items() if k in known})


def _unet_heads(c: UNetConfig, channels: int) -> tuple[int, int]:
    if c.num_head_channels == -1:
        return c.num_heads, channels // c.num_heads
    return channels // c.num_head_channels, c.num_head_channels


def _attention_channels(c: UNetConfig) -> set[int]:
    levels = [c.model_channels * m for m in c.channel_mult]
    found = {ch for i, ch in enumerate(levels) if 2**i in c.attention_resolutions}
    return found | {levels[-1]}  # the middle block always attends


def _canonical_unet(c: UNetConfig, **changes: Any) -> UNetConfig:
    """attention_resolutions is a set in all but type: (4, 2, 1) and (1, 2, 4) are one model."""
    return replace(c, attention_resolutions=tuple(sorted(set(c.attention_resolutions))), **changes)


def _same_unet(a: UNetConfig, b: UNetConfig) -> bool:
    """Equal architectures, however the head count is written (num_heads or head channels)."""
    neutral = {"num_heads": 8, "num_head_channels": -1}
    return _canonical_unet(a, **neutral) == _canonical_unet(b, **neutral) and all(
        _unet_heads(a, ch) == _unet_heads(b, ch) for ch in _attention_channels(a)
    )


def _normalize_prediction(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip().lower()
    return {"v": "v_prediction", "v-prediction": "v_prediction", "eps": "epsilon"}.get(value, value)


def _custom_base(openclip_like: bool, context_dim: int, prediction: str | None) -> ModelConfig:
    """Sampling defaults for a model that is no preset: named after the closest family."""
    if context_dim == 768 and not openclip_like:
        return PRESETS["sd15"]
    if context_dim == 1024 and openclip_like:
        return PRESETS["sd21-base" if prediction == "epsilon" else "sd21"]
    base = PRESETS["sd21-base" if openclip_like else "sd15"]
    return replace(base, family="custom")


@dataclass
class _Detected:
    unet: UNetConfig
    vae: VAEConfig
    text: TextEncoderConfig
    openclip: bool


def _dim(shapes: dict[str, tuple[int, ...]], *options: tuple[str, int]) -> int | None:
    """A size read from the first (key, axis) present: detection survives a missing key."""
    for key, axis in options:
        shape = shapes.get(key)
        if shape is not None and len(shape) > axis:
            return shape[axis]
    return None


def _has_prefix(shapes: dict[str, tuple[int, ...]], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def _resblock_channels(shapes: dict[str, tuple[int, ...]], block: str) -> int | None:
    return _dim(
        shapes,
        *((f"{block}{name}", 0) for name in (
            "in_layers.2.weight", "in_layers.2.bias", "out_layers.3.weight",
            "out_layers.3.bias", "out_layers.0.weight", "emb_layers.1.weight",
        )),
    )  # fmt: skip


def _groups(channels: Iterable[int]) -> int:
    """Group-norm groups: SD's 32 unless some channel count needs fewer (unreadable otherwise)."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c in channels))


def _detect_unet(shapes: dict[str, tuple[int, ...]]) -> UNetConfig:
    p = UNET_PREFIX
    mc = _dim(shapes, (p + "input_blocks.0.0.weight", 0), (p + "input_blocks.0.0.bias", 0))
    if mc is None:
        return UNetConfig()  # key validation will say what is missing
    in_ch = _dim(shapes, (p + "input_blocks.0.0.weight", 1)) or 4
    out_ch = _dim(shapes, (p + "out.2.weight", 0), (p + "out.2.bias", 0)) or 4
    levels: list[list[tuple[int, bool]]] = [[]]
    n = 1
    while _has_prefix(shapes, f"{p}input_blocks.{n}."):
        if _has_prefix(shapes, f"{p}input_blocks.{n}.0.op."):
            levels.append([])
        else:
            width = _resblock_channels(shapes, f"{p}input_blocks.{n}.0.")
            attends = _has_prefix(shapes, f"{p}input_blocks.{n}.1.")
            levels[-1].append((width or 0, attends))
        n += 1
    if not levels[0] or any(len(level) != len(levels[0]) for level in levels):
        return UNetConfig(in_channels=in_ch, out_channels=out_ch, model_channels=mc)
    context_dim, depth, linear = 768, 1, False
    k_keys = sorted(k for k in shapes if re.search(r"\.transformer_blocks\.\d+\.attn2\.to_k\.", k))
    if k_keys:
        context_dim = shapes[k_keys[0]][-1]
        block = k_keys[0].split(".transformer_blocks.")[0]
        depth = _count(shapes, re.escape(block) + r"\.transformer_blocks\.(\d+)\.")
        shape = shapes.get(block + ".proj_in.weight") or shapes.get(block + ".proj_out.weight")
        linear = shape is not None and len(shape) == 2
    channels = [max(ch for ch, _ in level) for level in levels]
    attention = tuple(2**i for i, level in enumerate(levels) if any(a for _, a in level))
    attn_channels = [channels[i] for i in range(len(levels)) if 2**i in attention]
    attn_channels.append(channels[-1])
    if linear and all(ch % 64 == 0 for ch in attn_channels):
        heads = {"num_heads": 8, "num_head_channels": 64}
    elif all(ch % 8 == 0 for ch in attn_channels):
        heads = {"num_heads": 8, "num_head_channels": -1}
    else:
        heads = {"num_heads": 1, "num_head_channels": -1}
    return UNetConfig(
        in_channels=in_ch,
        out_channels=out_ch,
        model_channels=mc,
        channel_mult=tuple(max(ch // mc, 1) for ch in channels),
        num_res_blocks=len(levels[0]),
        attention_resolutions=attention,
        context_dim=context_dim,
        transformer_depth=max(depth, 1),
        use_linear_in_transformer=linear,
        upcast_attention=linear,
        norm_num_groups=_groups([mc, *channels]),
        **heads,
    )


def _detect_vae(shapes: dict[str, tuple[int, ...]]) -> VAEConfig:
    p = VAE_PREFIX
    ch = _dim(shapes, (p + "encoder.conv_in.weight", 0), (p + "encoder.conv_in.bias", 0))
    levels = _count(shapes, re.escape(p) + r"encoder\.down\.(\d+)\.")
    if ch is None or not levels:
        return VAEConfig()
    mult = []
    for i in range(levels):
        block = f"{p}encoder.down.{i}.block.0."
        out = _dim(
            shapes, *((block + k, 0) for k in ("conv1.weight", "conv1.bias", "conv2.weight",
                                               "conv2.bias", "norm2.weight"))
        )  # fmt: skip
        mult.append(max((out or ch) // ch, 1))
    moments = _dim(shapes, (p + "encoder.conv_out.weight", 0), (p + "encoder.conv_out.bias", 0))
    z = _dim(
        shapes, (p + "decoder.conv_in.weight", 1), (p + "post_quant_conv.weight", 0),
        (p + "post_quant_conv.bias", 0),
    ) or (moments // 2 if moments else 4)  # fmt: skip
    embed = _dim(shapes, (p + "quant_conv.weight", 0), (p + "quant_conv.bias", 0))
    return VAEConfig(
        in_channels=_dim(shapes, (p + "encoder.conv_in.weight", 1)) or 3,
        out_channels=_dim(
            shapes, (p + "decoder.conv_out.weight", 0), (p + "decoder.conv_out.bias", 0)
        )
        or 3,
        ch=ch,
        ch_mult=tuple(mult),
        num_res_blocks=_count(shapes, re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\.") or 1,
        z_channels=z,
        embed_dim=embed // 2 if embed else z,
        norm_num_groups=_groups([ch * m for m in mult]),
    )


def _count(shapes: dict[str, tuple[int, ...]], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m[1] for k in shapes if (m := regex.match(k))})


def _detect_text(shapes: dict[str, tuple[int, ...]]) -> tuple[TextEncoderConfig, bool]:
    if any(k.startswith(OPENCLIP_PREFIX) for k in shapes):
        p = OPENCLIP_PREFIX
        tok, pos = shapes.get(p + "token_embedding.weight"), shapes.get(p + "positional_embedding")
        fc1 = shapes.get(p + "transformer.resblocks.0.mlp.c_fc.weight")
        blocks = _count(shapes, re.escape(p) + r"transformer\.resblocks\.(\d+)\.")
        if not (tok and pos and fc1 and blocks > 1):
            return PRESETS["sd21"].text_encoder, True
        return (
            TextEncoderConfig(
                vocab_size=tok[0], hidden_size=tok[1], intermediate_size=fc1[0],
                num_hidden_layers=blocks - 1, num_attention_heads=max(tok[1] // 64, 1),
                max_position_embeddings=pos[0], hidden_act="gelu",
            ),
            True,
        )  # fmt: skip
    p = CLIP_PREFIX + (
        "text_model." if any(k.startswith(CLIP_PREFIX + "text_model.") for k in shapes) else ""
    )
    tok = shapes.get(p + "embeddings.token_embedding.weight")
    pos = shapes.get(p + "embeddings.position_embedding.weight")
    fc1 = shapes.get(p + "encoder.layers.0.mlp.fc1.weight")
    layers = _count(shapes, re.escape(p) + r"encoder\.layers\.(\d+)\.")
    if not (tok and pos and fc1 and layers):
        return PRESETS["sd15"].text_encoder, False
    return (
        TextEncoderConfig(
            vocab_size=tok[0], hidden_size=tok[1], intermediate_size=fc1[0],
            num_hidden_layers=layers, num_attention_heads=max(tok[1] // 64, 1),
            max_position_embeddings=pos[0], hidden_act="quick_gelu",
        ),
        False,
    )  # fmt: skip


def _matches_preset(d: _Detected, p: ModelConfig) -> bool:
    """The detectable parts of the architecture equal the preset's."""
    if (p.text_encoder.hidden_act == "gelu") != d.openclip:
        return False
    unet = _canonical_unet(
        d.unet,
        num_heads=p.unet.num_heads,
        num_head_channels=p.unet.num_head_channels,
        upcast_attention=p.unet.upcast_attention,
        norm_num_groups=p.unet.norm_num_groups,
    )
    vae = replace(d.vae, scaling_factor=p.vae.scaling_factor, norm_num_groups=p.vae.norm_num_groups)
    text = replace(
        d.text,
        num_attention_heads=p.text_encoder.num_attention_heads,
        hidden_act=p.text_encoder.hidden_act,
        layer_norm_eps=p.text_encoder.layer_norm_eps,
    )
    return unet == _canonical_unet(p.unet) and vae == p.vae and text == p.text_encoder


def _choose_preset(
    candidates: list[ModelConfig], prediction: str | None, step: Any, named: str | None
) -> ModelConfig:
    if len(candidates) == 1:
        chosen = candidates[0]
    elif named in {c.family for c in candidates}:  # the file says which
        chosen = next(c for c in candidates if c.family == named)
    else:  # same shapes, different prediction type: sd21 (768-v) vs sd21-base (512)
        if prediction is None:
            prediction = "epsilon" if step == _SD2_BASE_GLOBAL_STEP else "v_prediction"
        chosen = next((c for c in candidates if c.prediction_type == prediction), candidates[0])
    return chosen.with_prediction_type(prediction) if prediction else chosen


# --------------------------------------------------------------------------- plans


@dataclass
class _Component:
    """One module to build: its meta-device instance and where each tensor comes from."""

    name: str
    module: nn.Module
    sources: dict[str, _Source] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # file keys looked for, not found
    unexpected: list[str] = field(default_factory=list)
    wrong_shapes: list[str] = field(default_factory=list)


def _meta_modules(config: ModelConfig) -> dict[str, nn.Module]:
    with torch.device("meta"):
        return {
            "unet": UNetModel(config.unet),
            "vae": AutoencoderKL(config.vae),
            "text_encoder": TextEncoder(config.text_encoder),
        }


def _expected(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _resolve(
    component: _Component,
    lookup: Callable[[str, tuple[int, ...]], _Source | str],
) -> None:
    """Fill a component's sources; `lookup` gives a source or the file key it looked for."""
    for key, shape in _expected(component.module).items():
        if key.endswith("embeddings.position_ids"):
            # A persistent buffer in some transformers versions: always 0..76, never read
            # from files (some merged SD 1.x checkpoints carry damaged float copies).
            component.sources[key] = _Source(key, shape, partial(_positions, shape))
            continue
        found = lookup(key, shape)
        if isinstance(found, str):
            component.missing.append(found)
            continue
        if found.shape != shape:
            component.wrong_shapes.append(
                f"{found.key} is {list(found.shape)}, expected {list(shape)}"
            )
        component.sources[key] = found


def _positions(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.arange(shape[-1]).expand(shape)


def _check(components: list[_Component], path: Path, config: ModelConfig, how: str) -> None:
    """One line naming the file and the first few missing, unexpected and mis-shaped keys."""
    problems = []
    for kind, label in (
        ("missing", "missing key"),
        ("unexpected", "unexpected key"),
        ("wrong_shapes", "wrong shape"),
    ):
        items = [item for c in components for item in getattr(c, kind)]
        if items:
            problems.append(f"{len(items)} {label}{'s' * (len(items) > 1)} ({_first(items)})")
    if problems:
        raise CheckpointError(
            f"{path} does not match the {config.family} architecture ({how}): "
            + "; ".join(problems)
        )


def _reset_nonpersistent_buffers(module: nn.Module) -> None:
    persistent = set(module.state_dict())
    for name, buffer in module.named_buffers():
        if name in persistent:
            continue
        if name.endswith("position_ids"):  # transformers' CLIP: arange over positions
            buffer.copy_(torch.arange(buffer.shape[-1]).expand(buffer.shape))
        else:  # pragma: no cover - a new module type needs handling here
            raise RuntimeError(f"cannot initialise non-persistent buffer {name}")


def _materialize(component: _Component, path: Path) -> nn.Module:
    """Allocate the module (fp32, uninitialised) and copy each tensor in, casting as needed."""
    module = component.module.to_empty(device="cpu")
    with torch.no_grad():
        _reset_nonpersistent_buffers(module)
        for key, target in module.state_dict(keep_vars=True).items():
            source = component.sources[key]
            tensor = source.load()
            if target.is_floating_point() and not tensor.is_floating_point():
                raise CheckpointError(
                    f"{path}: tensor {source.key} has dtype {tensor.dtype}, expected floats"
                )
            target.copy_(tensor)
            del tensor
    return module


def _build(
    config: ModelConfig, components: list[_Component], path: Path, how: str
) -> dict[str, Any]:
    _check(components, path, config, how)
    built = {}
    for component in components:
        built[component.name] = _materialize(component, path)
        component.sources.clear()
    return built


# --------------------------------------------------------------------------- single files


def _single_file_config(
    reader: _Reader, family: str | None, prediction: str | None
) -> tuple[ModelConfig, str]:
    meta = reader.metadata
    meta_prediction = _normalize_prediction(
        meta.get(META_PREDICTION) or meta.get("modelspec.prediction_type")
    )
    if meta_prediction not in (None, "epsilon", "v_prediction"):
        meta_prediction = None
    wanted = prediction or meta_prediction
    if family is not None:
        config = get_preset(family)
        how = f"as --family {family} says"
        return (config.with_prediction_type(wanted) if wanted else config), how
    if META_CONFIG in meta:
        try:
            config = _config_from_dict(json.loads(meta[META_CONFIG]))
        except (ValueError, TypeError, KeyError):
            pass  # written by something else or damaged: fall back to the shapes
        else:
            how = "from the file's metadata"
            return (config.with_prediction_type(wanted) if wanted else config), how
    keys = reader.shapes
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise CheckpointError(
            f"{reader.path} is an SDXL checkpoint (conditioner.embedders.*): "
            "SDXL is not supported yet; SD 1.x and 2.x are"
        )
    if not any(k.startswith(UNET_PREFIX) for k in keys) and not any(
        k.startswith(EMA_PREFIX + "diffusion_model") for k in keys
    ):
        hint = ""
        if "conv_in.weight" in keys or any(k.startswith("down_blocks.") for k in keys):
            hint = " (a diffusers component file? pass the diffusers folder instead)"
        raise CheckpointError(
            f"{reader.path} does not look like a Stable Diffusion checkpoint: "
            f"no {UNET_PREFIX}* keys{hint}; it has {_first(sorted(keys))}"
        )
    text, openclip = _detect_text(keys)
    detected = _Detected(_detect_unet(keys), _detect_vae(keys), text, openclip)
    step = reader.extras.get("global_step")
    candidates = [p for p in PRESETS.values() if _matches_preset(detected, p)]
    if candidates:
        config = _choose_preset(candidates, wanted, step, meta.get(META_FAMILY))
        return config, f"detected as {config.family} from the tensor shapes"
    if wanted is None and openclip:
        wanted = "epsilon" if step == _SD2_BASE_GLOBAL_STEP else "v_prediction"
    base = _custom_base(openclip, detected.unet.context_dim, wanted)
    config = replace(base, unet=detected.unet, vae=detected.vae, text_encoder=detected.text)
    config = config.with_prediction_type(wanted) if wanted else config
    return config, "architecture read from the tensor shapes"


def _single_file_components(
    reader: _Reader, config: ModelConfig, use_ema: bool
) -> list[_Component]:
    modules = _meta_modules(config)
    shapes = reader.shapes
    consumed: set[str] = set()
    unet, vae, text = (_Component(n, modules[n]) for n in _COMPONENTS)

    unet_keys = _expected(unet.module)
    ema = {k: EMA_PREFIX + "diffusion_model" + k.replace(".", "") for k in unet_keys}
    ema_complete = use_ema and all(e in shapes for e in ema.values())

    def unet_lookup(key: str, shape: tuple[int, ...]) -> _Source | str:
        name = ema[key] if ema_complete else UNET_PREFIX + key
        if name not in shapes:
            return name
        consumed.add(name)
        return _plain(reader, name)

    def vae_lookup(key: str, shape: tuple[int, ...]) -> _Source | str:
        name = VAE_PREFIX + key
        if name not in shapes:
            return name
        consumed.add(name)
        return _as_conv1x1(_plain(reader, name), shape)

    openclip = any(k.startswith(OPENCLIP_PREFIX) for k in shapes)
    nested = any(k.startswith(CLIP_PREFIX + "text_model.") for k in shapes)

    def text_lookup(key: str, shape: tuple[int, ...]) -> _Source | str:
        bare = _text_bare(key)
        if openclip:
            mapped = _openclip_key(bare)
            if mapped is None:
                return f"{OPENCLIP_PREFIX}? (for {bare})"
            name, third = OPENCLIP_PREFIX + mapped[0], mapped[1]
            if name not in shapes:
                return name
            consumed.add(name)
            if third is None:
                return _plain(reader, name)
            # An in_proj that does not split in three is reported as a wrong shape.
            return _sliced(reader, name, third, 3) or _plain(reader, name)
        name = CLIP_PREFIX + ("text_model." if nested else "") + bare
        if name not in shapes:
            return name
        consumed.add(name)
        return _plain(reader, name)

    _resolve(unet, unet_lookup)
    _resolve(vae, vae_lookup)
    _resolve(text, text_lookup)

    dropped_block = (
        f"{OPENCLIP_PREFIX}transformer.resblocks.{config.text_encoder.num_hidden_layers}."
    )
    for key in shapes:
        if key in consumed or key in _IGNORED_KEYS or key.startswith(_IGNORED_PREFIXES):
            continue
        if key.startswith(EMA_PREFIX) or (ema_complete and key.startswith(UNET_PREFIX)):
            continue  # the EMA copy, or the raw weights when the EMA copy is used
        if openclip and key.startswith(dropped_block):
            continue  # SD 2.x uses the penultimate layer: OpenCLIP's last block never runs
        if key.endswith("embeddings.position_ids") and key.startswith("cond_stage_model."):
            continue
        owner = unet if key.startswith(UNET_PREFIX) else vae if key.startswith(VAE_PREFIX) else text
        owner.unexpected.append(key)
    return [unet, vae, text]


def _load_single_file(
    path: Path, family: str | None, prediction: str | None, use_ema: bool
) -> LoadedModels:
    reader = _open_file(path)
    try:
        config, how = _single_file_config(reader, family, prediction)
        components = _single_file_components(reader, config, use_ema)
        built = _build(config, components, path, how)
    finally:
        reader.close()
    return LoadedModels(
        unet=built["unet"],
        vae=built["vae"],
        text_encoder=built["text_encoder"],
        config=config,
        source=str(path),
        source_sha256=file_sha256(path),
    )


# --------------------------------------------------------------------------- diffusers folders

_WEIGHT_NAMES = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}
_TEXT_BIN = "pytorch_model"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path} is missing") from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {_one_line(e)}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def _weight_files(folder: Path, name: str) -> list[Path]:
    """The weight files of one diffusers component, best format first."""
    stems = [_WEIGHT_NAMES[name]] + ([_TEXT_BIN] if name == "text_encoder" else [])
    stems += [s for s in ("diffusion_pytorch_model", "model", "pytorch_model") if s not in stems]
    for variant in ("", ".fp16"):
        for ext in (".safetensors", ".bin"):
            for stem in stems:
                single = folder / f"{stem}{variant}{ext}"
                if single.is_file():
                    return [single]
                index = folder / f"{stem}{variant}{ext}.index.json"
                if index.is_file():
                    weight_map = _read_json(index).get("weight_map")
                    if not isinstance(weight_map, dict) or not weight_map:
                        raise CheckpointError(f"{index} has no weight_map")
                    files = [folder / f for f in sorted(set(weight_map.values()))]
                    for f in files:
                        if not f.is_file():
                            raise CheckpointError(f"{index} names {f.name}, which is missing")
                    return files
    raise CheckpointError(
        f"{folder} has no weights ({_WEIGHT_NAMES[name]}.safetensors or .bin, sharded or not)"
    )


def _open_component(folder: Path, name: str) -> tuple[_Reader, list[Path]]:
    files = _weight_files(folder, name)
    readers: list[_Reader] = []
    try:
        for f in files:
            readers.append(_open_file(f))
    except CheckpointError:
        for r in readers:
            r.close()
        raise
    if len(readers) == 1:
        return readers[0], files
    return _MultiReader(folder, readers), files


def _require(cfg: dict[str, Any], path: Path, key: str, allowed: Iterable[Any]) -> None:
    allowed = list(allowed)
    if cfg.get(key, allowed[0]) not in allowed:
        raise CheckpointError(
            f"{path}: {key}={cfg[key]!r} is not supported (Stable Diffusion 1.x/2.x UNets "
            f"use {allowed[0]!r})"
        )


def _int(cfg: dict[str, Any], path: Path, key: str, default: Any = None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, list):
        if not value or any(v != value[0] for v in value):
            raise CheckpointError(f"{path}: per-block {key}={value} is not supported")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(f"{path}: {key} is {value!r}, expected an integer")
    return value


def _unet_config_from_diffusers(cfg: dict[str, Any], path: Path) -> UNetConfig:
    checks: dict[str, list[Any]] = {
        "_class_name": ["UNet2DConditionModel"],
        "time_embedding_type": ["positional"],
        "flip_sin_to_cos": [True],
        "freq_shift": [0],
        "act_fn": ["silu"],
        "class_embed_type": [None],
        "addition_embed_type": [None],
        "encoder_hid_dim": [None],
        "num_class_embeds": [None],
        "time_cond_proj_dim": [None],
        "dual_cross_attention": [False],
        "only_cross_attention": [False],
        "center_input_sample": [False],
        "resnet_time_scale_shift": ["default"],
        "mid_block_type": ["UNetMidBlock2DCrossAttn", None],
        "conv_in_kernel": [3],
        "conv_out_kernel": [3],
        "attention_type": ["default"],
        "norm_eps": [1e-5],
    }
    for key, allowed in checks.items():
        _require(cfg, path, key, allowed)
    blocks = cfg.get("block_out_channels", [320, 640, 1280, 1280])
    down = cfg.get("down_block_types", [])
    up = cfg.get("up_block_types", [])
    if len(down) != len(blocks) or len(up) != len(blocks):
        raise CheckpointError(f"{path}: block types do not match block_out_channels")
    attention_levels = []
    for i, (d, u) in enumerate(zip(down, reversed(up), strict=True)):
        if (d, u) == ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D"):
            attention_levels.append(i)
        elif (d, u) != ("DownBlock2D", "UpBlock2D"):
            raise CheckpointError(f"{path}: block types {d}/{u} are not supported")
    mc = blocks[0]
    if any(b % mc for b in blocks):
        raise CheckpointError(f"{path}: block_out_channels {blocks} are not multiples of the first")
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    heads = list(heads) if isinstance(heads, list | tuple) else [heads] * len(blocks)
    attn = sorted(set(attention_levels) | {len(blocks) - 1})
    per_level = [(blocks[i], heads[i]) for i in attn]
    if len({h for _, h in per_level}) == 1 and not cfg.get("use_linear_projection"):
        head_args = {"num_heads": per_level[0][1], "num_head_channels": -1}
    elif len({c // h for c, h in per_level}) == 1 and all(c % h == 0 for c, h in per_level):
        head_args = {"num_heads": 8, "num_head_channels": per_level[0][0] // per_level[0][1]}
    elif len({h for _, h in per_level}) == 1:
        head_args = {"num_heads": per_level[0][1], "num_head_channels": -1}
    else:
        raise CheckpointError(f"{path}: attention heads {heads} fit neither a fixed head count "
                              "nor a fixed head width")  # fmt: skip
    cross = cfg.get("cross_attention_dim", 1280)
    if not isinstance(cross, int):
        raise CheckpointError(f"{path}: cross_attention_dim={cross!r} is not supported")
    return UNetConfig(
        in_channels=_int(cfg, path, "in_channels", 4),
        out_channels=_int(cfg, path, "out_channels", 4),
        model_channels=mc,
        channel_mult=tuple(b // mc for b in blocks),
        num_res_blocks=_int(cfg, path, "layers_per_block", 2),
        attention_resolutions=tuple(2**i for i in attention_levels),
        context_dim=cross,
        transformer_depth=_int(cfg, path, "transformer_layers_per_block", 1),
        use_linear_in_transformer=bool(cfg.get("use_linear_projection", False)),
        upcast_attention=bool(cfg.get("upcast_attention", False)),
        norm_num_groups=_int(cfg, path, "norm_num_groups", 32),
        **head_args,
    )


def _vae_config_from_diffusers(cfg: dict[str, Any], path: Path) -> VAEConfig:
    checks: dict[str, list[Any]] = {
        "_class_name": ["AutoencoderKL"],
        "act_fn": ["silu"],
        "use_quant_conv": [True],
        "use_post_quant_conv": [True],
        "mid_block_add_attention": [True],
        "latents_mean": [None],
        "shift_factor": [None],
    }
    for key, allowed in checks.items():
        _require(cfg, path, key, allowed)
    blocks = cfg.get("block_out_channels", [64])
    if any(t != "DownEncoderBlock2D" for t in cfg.get("down_block_types", [])) or any(
        t != "UpDecoderBlock2D" for t in cfg.get("up_block_types", [])
    ):
        raise CheckpointError(f"{path}: only DownEncoderBlock2D/UpDecoderBlock2D are supported")
    ch = blocks[0]
    latent = _int(cfg, path, "latent_channels", 4)
    return VAEConfig(
        in_channels=_int(cfg, path, "in_channels", 3),
        out_channels=_int(cfg, path, "out_channels", 3),
        ch=ch,
        ch_mult=tuple(b // ch for b in blocks),
        num_res_blocks=_int(cfg, path, "layers_per_block", 1),
        z_channels=latent,
        embed_dim=latent,
        norm_num_groups=_int(cfg, path, "norm_num_groups", 32),
        scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
    )


def _text_config_from_diffusers(cfg: dict[str, Any], path: Path) -> TextEncoderConfig:
    architectures = cfg.get("architectures") or ["CLIPTextModel"]
    if architectures != ["CLIPTextModel"] or cfg.get("model_type", "clip_text_model") != (
        "clip_text_model"
    ):
        raise CheckpointError(
            f"{path}: text encoder {architectures} is not supported (expected CLIPTextModel)"
        )
    defaults = TextEncoderConfig()
    values: dict[str, Any] = {}
    for f in fields(TextEncoderConfig):
        value = cfg.get(f.name, getattr(defaults, f.name))
        values[f.name] = float(value) if f.name == "layer_norm_eps" else value
    return TextEncoderConfig(**values)


def _pad_token_id(tokenizer_dir: Path) -> int | None:
    """Id of the tokenizer's pad token (SD 2.x pads with "!", id 0), if the files say."""
    pad = None
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = tokenizer_dir / name
        if f.is_file():
            try:
                pad = json.loads(f.read_text(encoding="utf-8")).get("pad_token")
            except (OSError, ValueError, AttributeError):
                pad = None
            if isinstance(pad, dict):
                pad = pad.get("content")
            if isinstance(pad, str):
                break
    vocab = tokenizer_dir / "vocab.json"
    if not isinstance(pad, str) or not vocab.is_file():
        return None
    try:
        value = json.loads(vocab.read_text(encoding="utf-8")).get(pad)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def _folder_config(
    folder: Path, family: str | None, prediction: str | None
) -> tuple[ModelConfig, str]:
    unet = _unet_config_from_diffusers(
        _read_json(folder / "unet" / "config.json"), folder / "unet" / "config.json"
    )
    vae = _vae_config_from_diffusers(
        _read_json(folder / "vae" / "config.json"), folder / "vae" / "config.json"
    )
    text_path = folder / "text_encoder" / "config.json"
    text = _text_config_from_diffusers(_read_json(text_path), text_path)
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_path) if scheduler_path.is_file() else {}
    file_prediction = _normalize_prediction(scheduler.get("prediction_type"))
    if file_prediction not in (None, "epsilon", "v_prediction"):
        raise CheckpointError(
            f"{scheduler_path}: prediction_type {file_prediction!r} is not supported"
        )
    wanted = prediction or file_prediction
    if family is not None:
        config = get_preset(family)
        how = f"as --family {family} says"
        return (config.with_prediction_type(wanted) if wanted else config), how
    wanted = wanted or "epsilon"  # diffusers' own default
    matches = [
        p
        for p in PRESETS.values()
        if _same_unet(unet, p.unet) and vae == p.vae and text == p.text_encoder
    ]
    if matches:
        base = next((p for p in matches if p.prediction_type == wanted), matches[0])
        how = f"config.json files match {base.family}"
        unet = base.unet  # the same model, written the preset's way
    else:
        base = _custom_base(text.hidden_act == "gelu", unet.context_dim, wanted)
        how = "architecture from the config.json files"
    pad = _pad_token_id(folder / "tokenizer")
    config = replace(
        base,
        unet=unet,
        vae=vae,
        text_encoder=text,
        scheduler={**base.scheduler, **{k: scheduler[k] for k in base.scheduler if k in scheduler}},
        pad_token_id=base.pad_token_id if pad is None else pad,
    )
    return config.with_prediction_type(wanted), how


def _folder_components(readers: dict[str, _Reader], config: ModelConfig) -> list[_Component]:
    modules = _meta_modules(config)
    components = [_Component(n, modules[n]) for n in _COMPONENTS]
    unet, vae, text = components
    consumed: dict[str, set[str]] = {n: set() for n in _COMPONENTS}

    def finder(name: str, candidates: Callable[[str], Iterable[str]], conv1x1: bool = False):
        reader = readers[name]

        def lookup(key: str, shape: tuple[int, ...]) -> _Source | str:
            names = list(candidates(key))
            for candidate in names:
                if candidate in reader.shapes:
                    consumed[name].add(candidate)
                    source = _plain(reader, candidate)
                    source.key = f"{name}/{candidate}"  # messages name the component
                    return _as_conv1x1(source, shape) if conv1x1 else source
            return f"{name}/{names[0] if names else key}"

        return lookup

    layers = config.unet.num_res_blocks

    def unet_names(key: str) -> list[str]:
        mapped = _unet_key_to_diffusers(key, layers)
        return [mapped] if mapped else []

    levels = len(config.vae.ch_mult)
    _resolve(unet, finder("unet", unet_names))
    _resolve(vae, finder("vae", lambda k: _vae_keys_to_diffusers(k, levels), conv1x1=True))
    _resolve(text, finder("text_encoder", lambda k: ("text_model." + _text_bare(k), _text_bare(k))))
    for component in components:
        for key in readers[component.name].shapes:
            if key not in consumed[component.name] and not key.endswith("position_ids"):
                component.unexpected.append(f"{component.name}/{key}")
    return components


def _load_diffusers_folder(
    folder: Path, family: str | None, prediction: str | None
) -> LoadedModels:
    index = _read_json(folder / "model_index.json")
    for name in _COMPONENTS:
        if not (folder / name).is_dir():
            listed = " (model_index.json lists it)" if name in index else ""
            raise CheckpointError(f"{folder} is a diffusers folder without {name}/{listed}")
    config, how = _folder_config(folder, family, prediction)
    readers: dict[str, _Reader] = {}
    files: list[Path] = []
    try:
        for name in _COMPONENTS:
            readers[name], component_files = _open_component(folder / name, name)
            files += component_files
        components = _folder_components(readers, config)
        built = _build(config, components, folder, how)
    finally:
        for reader in readers.values():
            reader.close()
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(folder).as_posix().encode() + b"\0")
        _hash_into(digest, f)
    tokenizer = folder / "tokenizer"
    has_tokenizer = (tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file()
    return LoadedModels(
        unet=built["unet"],
        vae=built["vae"],
        text_encoder=built["text_encoder"],
        config=config,
        source=str(folder),
        source_sha256=digest.hexdigest(),
        tokenizer_dir=tokenizer if has_tokenizer else None,
    )


# --------------------------------------------------------------------------- public API


def load_checkpoint(
    path: str | Path,
    family: str | None = None,
    prediction_type: str | None = None,
    *,
    use_ema: bool = True,
) -> LoadedModels:
    """Load a single-file checkpoint or a diffusers folder into fp32 reference modules.

    family: a preset name whose architecture the weights must have (skips detection).
    prediction_type: "epsilon" or "v_prediction", overriding metadata and heuristics.
    use_ema: take the UNet's EMA weights when the file has a complete set (ldm `use_ema`).
    `source_sha256` is the file's sha256, or for a folder the sha256 over its weight files
    (relative path, NUL, contents, in unet, vae, text_encoder order).
    """
    path = Path(path)
    prediction = _normalize_prediction(prediction_type)
    if prediction is not None:
        PRESETS["sd15"].with_prediction_type(prediction)  # validates, UserError if unknown
    if family is not None:
        get_preset(family)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CheckpointError(
                f"{path} is a directory but not a diffusers model folder (no model_index.json); "
                f"pass a {'/'.join(SINGLE_FILE_SUFFIXES)} file or a diffusers folder"
            )
        models = _load_diffusers_folder(path, family, prediction)
    else:
        models = _load_single_file(path, family, prediction, use_ema)
    return models.eval()


def load_default_model() -> LoadedModels:
    """The small trained model shipped in the package (sd_deploy/data/default_model/)."""
    if not DEFAULT_MODEL_PATH.is_file():
        raise CheckpointError(
            "the default model is not in this install "
            f"({DEFAULT_MODEL_PATH.relative_to(DEFAULT_MODEL_PATH.parents[2])} is missing); "
            "pass --model with a checkpoint file or diffusers folder, or use "
            "--model tiny --random-weights for an untrained preset"
        )
    models = load_checkpoint(DEFAULT_MODEL_PATH)
    models.source = "default"
    return models


def _openclip_state_dict(text: TextEncoder) -> Iterator[tuple[str, torch.Tensor]]:
    """Our CLIPTextModel in OpenCLIP layout, plus the two tensors SD 2.x never uses.

    OpenCLIP has one resblock more than we run (SD 2.x takes the penultimate layer); it is
    written as zeros, which makes it an exact identity block (pre-norm residual with zero
    output projections), and `text_projection` as the identity. Loading drops both.
    """
    sd = {_text_bare(k): v for k, v in text.model.state_dict().items()}
    for bare, value in sd.items():
        if bare in _OPENCLIP_TOP:
            yield _OPENCLIP_TOP[bare], value
    layers = text.config.num_hidden_layers
    for i in range(layers + 1):
        src = f"encoder.layers.{i if i < layers else layers - 1}."
        zero = i == layers
        for kind in ("weight", "bias"):
            qkv = torch.cat([sd[f"{src}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")])
            yield f"transformer.resblocks.{i}.attn.in_proj_{kind}", qkv * 0 if zero else qkv
        for ours, theirs in _OPENCLIP_LAYER.items():
            for kind in ("weight", "bias"):
                value = sd[f"{src}{ours}{kind}"]
                yield (
                    f"transformer.resblocks.{i}.{theirs}{kind}",
                    (torch.zeros_like(value) if zero else value),
                )
    width = text.config.hidden_size
    dtype = sd["final_layer_norm.weight"].dtype
    yield "text_projection", torch.eye(width, dtype=dtype)


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
    if text.config.hidden_act == "gelu":
        for key, value in _openclip_state_dict(text):
            put(OPENCLIP_PREFIX + key, value)
    else:
        for key, value in text.model.state_dict().items():
            put(CLIP_PREFIX + "text_model." + _text_bare(key), value)
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
    config = models.config
    metadata = {
        "format": "pt",
        META_FAMILY: config.family,
        META_PREDICTION: config.prediction_type,
        META_CONFIG: json.dumps(asdict(config), sort_keys=True),
        META_WRITER: "sd-deploy",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
