"""The PyTorch models an engine dir was exported from, found through its manifest.

`provenance.source` is a checkpoint file, a diffusers folder, "default" (the packaged
model) or "preset:NAME:random-seed-S" for seeded random weights, which are rebuilt
bit-for-bit with `build_random(get_preset(NAME), seed=S)`. `--model SOURCE` overrides it
(same forms, plus a bare preset name meaning seed 0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd_deploy.engine_dir.manifest import Manifest
from sd_deploy.errors import UserError
from sd_deploy.models import DEFAULT_MODEL, PRESETS, LoadedModels, build_random, get_preset

_PRESET_SOURCE = re.compile(r"^preset:(?P<name>[^:]+):random-seed-(?P<seed>-?\d+)$")


@dataclass(frozen=True)
class ReferenceSource:
    """Where the reference models will come from: a preset (name, seed), "default" or a path."""

    source: str
    recorded: str | None
    overridden: bool
    preset: str | None = None
    seed: int = 0


def reference_source(
    manifest: Manifest, engine_dir: Path, override: str | None = None
) -> ReferenceSource:
    """Resolve and check the model source without loading anything (one-line errors, fast)."""
    recorded = manifest.provenance.get("source")
    source = override if override is not None else recorded
    if not source:
        raise UserError(
            f"{engine_dir}/manifest.json records no provenance.source; pass --model SOURCE "
            "(the checkpoint the engines were exported from)"
        )
    source = str(source)
    overridden = override is not None
    match = _PRESET_SOURCE.match(source)
    if match is not None or source in PRESETS:
        name = match.group("name") if match else source
        get_preset(name)  # unknown preset: one line listing the known ones
        if name != manifest.model.family:
            raise UserError(
                f"model source {source} is preset {name}, but the engines in {engine_dir} are "
                f"{manifest.model.family}; pass --model with the source they were exported from"
            )
        seed = int(match.group("seed")) if match else 0
        return ReferenceSource(source, recorded, overridden, preset=name, seed=seed)
    if source != DEFAULT_MODEL and not Path(source).exists():
        origin = "--model" if overridden else f"{engine_dir}/manifest.json"
        raise UserError(
            f"model source {source} (from {origin}) does not exist; pass --model with the "
            "checkpoint file or diffusers folder the engines were exported from"
        )
    return ReferenceSource(source, recorded, overridden)


def load_reference_models(
    manifest: Manifest, engine_dir: Path, override: str | None = None
) -> tuple[LoadedModels, dict[str, Any]]:
    """fp32 reference modules and a note on where they came from (for the report).

    Refuses (one line) a source that does not exist, and models whose architecture or
    weights differ from what the manifest records, since every parity figure would be
    meaningless.
    """
    from sd_deploy.models import load_models

    ref = reference_source(manifest, engine_dir, override)
    prediction = manifest.model.prediction_type
    if ref.preset is not None:
        config = get_preset(ref.preset)
        if config.prediction_type != prediction:
            config = config.with_prediction_type(prediction)
        models = build_random(config, seed=ref.seed)
        how = f"rebuilt seeded random weights (preset {ref.preset}, seed {ref.seed})"
    elif ref.source == DEFAULT_MODEL:
        models = load_models(DEFAULT_MODEL, prediction_type=prediction)
        how = "the packaged default model"
    else:
        models = load_models(Path(ref.source), prediction_type=prediction)
        how = f"loaded from {ref.source}"
    check_matches(models, manifest, engine_dir)
    note = {
        "source": ref.source,
        "recorded_source": ref.recorded,
        "how": how,
        "overridden": ref.overridden,
        "family": models.config.family,
    }
    return models, note


def check_matches(models: LoadedModels, manifest: Manifest, engine_dir: Path) -> None:
    """The models must be the ones the engines hold: same architecture, same weights hash."""
    m = manifest.model
    if (
        models.config.latent_channels != m.latent_channels
        or models.config.text_encoder.hidden_size != m.text_embed_dim
    ):
        raise UserError(
            f"the reference model ({models.source}, {models.config.family}) does not have the "
            f"architecture of the engines in {engine_dir} ({m.family}); pass --model with the "
            "checkpoint they were exported from"
        )
    recorded = manifest.provenance.get("source_sha256")
    if recorded and models.source_sha256 and recorded != models.source_sha256:
        raise UserError(
            f"{models.source} is not the checkpoint the engines in {engine_dir} were exported "
            f"from (sha256 {models.source_sha256[:12]}... vs {recorded[:12]}... in the manifest)"
        )
