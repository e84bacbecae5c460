"""The safetensors metadata `save_checkpoint` writes, and what loading reads back from it.

The whole `ModelConfig` travels as JSON, which makes loading exact even for architectures
that shapes alone cannot pin down (head counts); `prediction_type` is also read from
ModelSpec's `modelspec.prediction_type`, which other tools write.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from typing import Any

from sd_deploy.models.checkpoints.families import normalize_prediction
from sd_deploy.models.presets import ModelConfig
from sd_deploy.models.text_encoder import TextEncoderConfig
from sd_deploy.models.unet import UNetConfig
from sd_deploy.models.vae import VAEConfig

# Metadata keys save_checkpoint writes (values are strings, as safetensors requires).
META_FAMILY = "family"
META_PREDICTION = "prediction_type"
META_CONFIG = "sd_deploy.config"
META_WRITER = "sd_deploy.writer"


def config_metadata(config: ModelConfig) -> dict[str, str]:
    """What `save_checkpoint` puts in the file's metadata."""
    return {
        "format": "pt",
        META_FAMILY: config.family,
        META_PREDICTION: config.prediction_type,
        META_CONFIG: json.dumps(asdict(config), sort_keys=True),
        META_WRITER: "sd-deploy",
    }


def metadata_prediction(meta: dict[str, str]) -> str | None:
    """The prediction type the metadata states, if it is one we support."""
    value = normalize_prediction(meta.get(META_PREDICTION) or meta.get("modelspec.prediction_type"))
    return value if value in ("epsilon", "v_prediction") else None


def metadata_config(meta: dict[str, str]) -> ModelConfig | None:
    """The `ModelConfig` a file written by `save_checkpoint` carries, or None.

    None also when it is damaged or written by something else: shapes are the fallback.
    """
    if META_CONFIG not in meta:
        return None
    try:
        return _config_from_dict(json.loads(meta[META_CONFIG]))
    except (ValueError, TypeError, KeyError):
        return None


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
    if data.get("text_encoder_2"):
        parts["text_encoder_2"] = build(TextEncoderConfig, data["text_encoder_2"])
    rest = {k: v for k, v in data.items() if k not in parts and k != "text_encoder_2"}
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**parts, **{k: v for k, v in rest.items() if k in known})
