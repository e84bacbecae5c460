"""A diffusers folder's config.json files -> our `ModelConfig`, refusing what we cannot run.

Architectures come from `unet/`, `vae/` and `text_encoder/config.json`; the prediction type
and noise schedule from `scheduler/scheduler_config.json`; the pad token from `tokenizer/`.
Options our modules do not implement are errors naming the file and key, not silently
different models.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from sd_deploy.errors import CheckpointError
from sd_deploy.models.checkpoints.families import (
    custom_base,
    named_preset,
    normalize_prediction,
    same_unet,
)
from sd_deploy.models.checkpoints.messages import one_line
from sd_deploy.models.presets import PRESETS, ModelConfig, get_preset
from sd_deploy.models.text_encoder import TextEncoderConfig
from sd_deploy.models.unet import UNetConfig
from sd_deploy.models.vae import VAEConfig


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from the folder, or a one-line error saying what is wrong with it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path} is missing") from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {one_line(e)}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def _require(cfg: dict[str, Any], path: Path, key: str, allowed: Iterable[Any]) -> None:
    """`key` is one of `allowed` (absent counts as the first)."""
    allowed = list(allowed)
    if cfg.get(key, allowed[0]) not in allowed:
        raise CheckpointError(
            f"{path}: {key}={cfg[key]!r} is not supported (Stable Diffusion 1.x/2.x UNets "
            f"use {allowed[0]!r})"
        )


def _int(cfg: dict[str, Any], path: Path, key: str, default: Any = None) -> int:
    """An integer setting; per-block lists are accepted when every block agrees."""
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


def _parsed(parse: Any, path: Path) -> Any:
    """`parse` of the config file at `path`; a value of the wrong type or shape (a dict where
    a list of channels belongs, fewer head counts than blocks, a zero width) is one line."""
    try:
        return parse(read_json(path), path)
    except CheckpointError as e:  # messages quote the file's values: keep them one short line
        if len(str(e)) <= 400:
            raise
        raise CheckpointError(one_line(e, 400)) from e
    except (TypeError, ValueError, IndexError, KeyError, AttributeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path}: malformed config ({one_line(e)})") from e


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


def is_sdxl_folder(folder: Path) -> bool:
    """An SDXL pipeline folder: a second text tower, or the XL pipeline class."""
    if (folder / "text_encoder_2").is_dir():
        return True
    index_path = folder / "model_index.json"
    return index_path.is_file() and "XL" in str(read_json(index_path).get("_class_name", ""))


def _sdxl_folder_config(
    folder: Path, family: str | None, prediction: str | None
) -> tuple[ModelConfig, str]:
    """The SDXL preset the folder's UNet is (by width and vector width); the refiner refused."""
    index_path = folder / "model_index.json"
    index = read_json(index_path) if index_path.is_file() else {}
    unet_path = folder / "unet" / "config.json"
    unet = read_json(unet_path)
    channels = (unet.get("block_out_channels") or [None])[0]
    vector = unet.get("projection_class_embeddings_input_dim")
    if not (folder / "text_encoder").is_dir() or index.get("requires_aesthetics_score"):
        raise CheckpointError(
            f"{folder} is an SDXL refiner (one OpenCLIP bigG tower, aesthetic-score "
            "conditioning): only SDXL base models are supported; pass the base model"
        )
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = read_json(scheduler_path) if scheduler_path.is_file() else {}
    wanted = prediction or normalize_prediction(scheduler.get("prediction_type")) or "epsilon"
    if family is not None:
        if not get_preset(family).is_sdxl:
            raise CheckpointError(
                f"{folder} is an SDXL folder (text_encoder_2/) but --family {family} was given; "
                "leave --family out to detect the family"
            )
        return named_preset(family, wanted)
    for preset in PRESETS.values():
        if preset.is_sdxl and (channels, vector) == (
            preset.unet.model_channels,
            preset.unet.adm_in_channels,
        ):
            return preset.with_prediction_type(wanted), f"config.json files match {preset.family}"
    raise CheckpointError(
        f"{unet_path}: an SDXL UNet of width {channels} and vector width {vector} is no known "
        "SDXL architecture (sdxl: 320/2816)"
    )


def folder_config(
    folder: Path, family: str | None, prediction: str | None
) -> tuple[ModelConfig, str]:
    """The folder's `ModelConfig` (a preset's when the architecture equals one), and how."""
    if is_sdxl_folder(folder):
        return _sdxl_folder_config(folder, family, prediction)
    unet_path = folder / "unet" / "config.json"
    unet = _parsed(_unet_config_from_diffusers, unet_path)
    vae_path = folder / "vae" / "config.json"
    vae = _parsed(_vae_config_from_diffusers, vae_path)
    text_path = folder / "text_encoder" / "config.json"
    text = _parsed(_text_config_from_diffusers, text_path)
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = read_json(scheduler_path) if scheduler_path.is_file() else {}
    file_prediction = normalize_prediction(scheduler.get("prediction_type"))
    if file_prediction not in (None, "epsilon", "v_prediction"):
        raise CheckpointError(
            f"{scheduler_path}: prediction_type {file_prediction!r} is not supported"
        )
    wanted = prediction or file_prediction
    if family is not None:
        return named_preset(family, wanted)
    wanted = wanted or "epsilon"  # diffusers' own default
    matches = [
        p
        for p in PRESETS.values()
        if same_unet(unet, p.unet) and vae == p.vae and text == p.text_encoder
    ]
    if matches:
        base = next((p for p in matches if p.prediction_type == wanted), matches[0])
        how = f"config.json files match {base.family}"
        unet = base.unet  # the same model, written the preset's way
    else:
        base = custom_base(text.hidden_act == "gelu", unet.context_dim, wanted)
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
