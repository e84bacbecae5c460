"""`load_models`: one entry point from whatever the user has to reference modules."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import torch

from sd_deploy.errors import CheckpointError, UserError
from sd_deploy.models import checkpoints
from sd_deploy.models.loaded import LoadedModels, build_modules
from sd_deploy.models.presets import PRESETS, ModelConfig, get_preset

# Name users pass (or omit) for the small trained model shipped inside the package.
DEFAULT_MODEL = "default"


# Export components -> the module each one needs (what `materialize` names).
COMPONENT_MODULES = {
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
    "unet": "unet",
    "vae_decoder": "vae",
    "vae_encoder": "vae",
}


def modules_for(components: Collection[str]) -> set[str] | None:
    """The modules exporting `components` needs; None (all) for "all"."""
    if "all" in components:
        return None
    return {COMPONENT_MODULES[c] for c in components if c in COMPONENT_MODULES}


def build_random(
    config: ModelConfig, seed: int = 0, materialize: Collection[str] | None = None
) -> LoadedModels:
    """Seeded random weights for a preset: for tests and size/speed measurements only.

    SDXL presets seed each module on its own (seed + its index), so a module's weights do not
    depend on which others are built; modules not in `materialize` (None: all) stay on the
    meta device: exporting the full-size UNet alone holds the UNet alone."""
    generator_state = torch.random.get_rng_state()
    try:
        if config.is_sdxl:
            with torch.device("meta"):
                modules = build_modules(config)
            for index, name in enumerate(list(modules)):
                if materialize is None or name in materialize:
                    torch.manual_seed(seed + index)
                    modules[name] = build_modules(config, only=name)[name]
        else:
            torch.manual_seed(seed)
            modules = build_modules(config)
        models = LoadedModels(
            **modules,  # type: ignore[arg-type]
            config=config,
            source=f"preset:{config.family}:random-seed-{seed}",
        )
    finally:
        torch.random.set_rng_state(generator_state)
    return models.eval()


def load_models(
    source: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    random_init: bool = False,
    seed: int = 0,
    family: str | None = None,
    prediction_type: str | None = None,
    materialize: Collection[str] | None = None,
) -> LoadedModels:
    """Load reference modules from a checkpoint file, diffusers folder, or the default model.

    source: a `.safetensors`/`.ckpt`/`.pt` file, a diffusers folder, None / "default"
    for the packaged trained model, or a preset name together with `random_init=True`.
    family / prediction_type override what is detected from the weights.
    materialize: the modules to hold in memory (`modules_for(components)`; None: all); the
    others stay on the meta device (checkpoints, and SDXL presets with random weights).
    """
    if random_init:
        name = family or (str(source) if source not in (None, DEFAULT_MODEL) else None)
        if name is None:
            raise UserError(
                "random weights need a preset name (e.g. --model tiny --random-weights)"
            )
        config = get_preset(name)
        if prediction_type:
            config = config.with_prediction_type(prediction_type)
        models = build_random(config, seed, materialize)
    elif source in (None, DEFAULT_MODEL):
        if family:
            raise UserError("--family applies to checkpoints, not to the packaged default model")
        models = checkpoints.load_default_model()
        if prediction_type:
            models.config = models.config.with_prediction_type(prediction_type)
    else:
        path = Path(source)
        if not path.exists():
            hint = " (a preset name needs --random-weights)" if str(source) in PRESETS else ""
            raise CheckpointError(f"model source {source} does not exist{hint}")
        models = checkpoints.load_checkpoint(
            path, family=family, prediction_type=prediction_type, materialize=materialize
        )
    return models.to(dtype).eval()
