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

This module is the public API and the loading flow (open, recognise, plan, fill); each step
lives in its own module:

- `readers`: lazy tensor access to one weights file; format sniffing, safe unpickling, mmap.
- `single_file`: ldm single files: config from metadata or shapes, key plan, EMA, leftovers.
- `detection`: architecture from tensor shapes, and which preset it is.
- `families`: comparing configs with presets, custom-model defaults, prediction type names.
- `metadata`: the safetensors metadata `save_checkpoint` writes and loading reads back.
- `openclip`: OpenCLIP text tower <-> CLIPTextModel names, both directions.
- `diffusers_configs`: a diffusers folder's config.json files -> `ModelConfig`.
- `diffusers_names`: ldm UNet/VAE keys -> diffusers keys.
- `diffusers_folder`: a folder's weight files and their plan into our modules.
- `assembly`: meta-device modules, key validation, filling them tensor by tensor.
- `writing`: `ldm_state_dict` and `save_checkpoint`.
- `layout`, `messages`: the ldm key layout and one-line error text (sha256s of files come
  from `sd_deploy.engine_dir.hashing`, shared with the engine-dir contract).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from sd_deploy.engine_dir.hashing import files_sha256, sha256_file
from sd_deploy.errors import CheckpointError
from sd_deploy.models.checkpoints import (
    assembly,
    diffusers_configs,
    diffusers_folder,
    families,
    readers,
    single_file,
)
from sd_deploy.models.checkpoints.readers import SINGLE_FILE_SUFFIXES
from sd_deploy.models.checkpoints.writing import ldm_state_dict, save_checkpoint
from sd_deploy.models.loaded import LoadedModels
from sd_deploy.models.presets import PRESETS, get_preset

__all__ = [
    "DEFAULT_MODEL_PATH",
    "SINGLE_FILE_SUFFIXES",
    "ldm_state_dict",
    "load_checkpoint",
    "load_default_model",
    "save_checkpoint",
]

DEFAULT_MODEL_PATH = (
    Path(__file__).resolve().parents[2] / "data" / "default_model" / "model.safetensors"
)


def load_checkpoint(
    path: str | Path,
    family: str | None = None,
    prediction_type: str | None = None,
    *,
    use_ema: bool = True,
    materialize: Collection[str] | None = None,
) -> LoadedModels:
    """Load a single-file checkpoint or a diffusers folder into fp32 reference modules.

    family: a preset name whose architecture the weights must have (skips detection).
    prediction_type: "epsilon" or "v_prediction", overriding metadata and heuristics.
    use_ema: take the UNet's EMA weights when the file has a complete set (ldm `use_ema`).
    materialize: the modules to fill ("unet", "vae", "text_encoder", "text_encoder_2"; None:
    all); the others stay on the meta device, so exporting one graph holds one module.
    `source_sha256` is the file's sha256, or for a folder the sha256 over its weight files
    (relative path, NUL, contents, in unet, vae, text_encoder order).
    """
    path = Path(path)
    prediction = families.normalize_prediction(prediction_type)
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
        models = _load_diffusers_folder(path, family, prediction, materialize)
    else:
        models = _load_single_file(path, family, prediction, use_ema, materialize)
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


def _load_single_file(
    path: Path,
    family: str | None,
    prediction: str | None,
    use_ema: bool,
    materialize: Collection[str] | None = None,
) -> LoadedModels:
    reader = readers.open_weights_file(path)
    try:
        config, how = single_file.single_file_config(reader, family, prediction)
        components = single_file.single_file_components(
            reader, config, assembly.meta_modules(config), use_ema
        )
        built = assembly.build(config, components, path, how, materialize)
    finally:
        reader.close()
    return LoadedModels(
        unet=built["unet"],
        vae=built["vae"],
        text_encoder=built["text_encoder"],
        text_encoder_2=built.get("text_encoder_2"),
        config=config,
        source=str(path),
        source_sha256=sha256_file(path),
    )


def _load_diffusers_folder(
    folder: Path,
    family: str | None,
    prediction: str | None,
    materialize: Collection[str] | None = None,
) -> LoadedModels:
    diffusers_folder.check_layout(folder)
    config, how = diffusers_configs.folder_config(folder, family, prediction)
    readers, files = diffusers_folder.open_components(folder)
    try:
        components = diffusers_folder.folder_components(
            readers, config, assembly.meta_modules(config)
        )
        built = assembly.build(config, components, folder, how, materialize)
    finally:
        for reader in readers.values():
            reader.close()
    return LoadedModels(
        unet=built["unet"],
        vae=built["vae"],
        text_encoder=built["text_encoder"],
        text_encoder_2=built.get("text_encoder_2"),
        config=config,
        source=str(folder),
        source_sha256=files_sha256(folder, files),
        tokenizer_dir=diffusers_folder.tokenizer_dir(folder),
        tokenizer_2_dir=diffusers_folder.tokenizer_dir(folder, "tokenizer_2"),
    )
