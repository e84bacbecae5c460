"""ldm single files: which model a file holds, and which file key fills each module tensor.

Recognition, in this order (`family=` and `prediction_type=` override it): the `ModelConfig`
that `save_checkpoint` writes into the metadata; else the architecture read from shapes,
named after the preset it equals or built from the shapes. The prediction type comes from
metadata, else the matched preset; SD 2.x 768-v and 512-base are told apart by global_step.

Key planning handles EMA (a complete set of `model_ema.*` UNet weights is used, as ldm's
`use_ema` sampling does; incomplete sets are ignored), both SD 1.x text layouts (with and
without `text_model.`), OpenCLIP text towers (SD 2.x, converted on the fly), 1x1 conv VAE
attention stored as linear, and the ldm buffers that are not weights.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from sd_deploy.errors import CheckpointError
from sd_deploy.models.checkpoints import sdxl
from sd_deploy.models.checkpoints.assembly import (
    Component,
    Source,
    as_conv1x1,
    expected_shapes,
    plain,
    resolve,
    sliced,
)
from sd_deploy.models.checkpoints.detection import choose_preset, detect, matches_preset
from sd_deploy.models.checkpoints.families import (
    custom_base,
    named_preset,
    sd2_prediction_from_step,
)
from sd_deploy.models.checkpoints.layout import (
    CLIP_PREFIX,
    COMPONENTS,
    EMA_PREFIX,
    IGNORED_KEYS,
    IGNORED_PREFIXES,
    OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    text_bare,
)
from sd_deploy.models.checkpoints.messages import first_keys
from sd_deploy.models.checkpoints.metadata import (
    META_FAMILY,
    metadata_config,
    metadata_prediction,
)
from sd_deploy.models.checkpoints.openclip import openclip_key
from sd_deploy.models.checkpoints.readers import Reader
from sd_deploy.models.presets import PRESETS, ModelConfig, get_preset


def single_file_config(
    reader: Reader, family: str | None, prediction: str | None
) -> tuple[ModelConfig, str]:
    """The file's `ModelConfig`, and how it was found (for error messages)."""
    meta = reader.metadata
    wanted = prediction or metadata_prediction(meta)
    keys = reader.shapes
    xl_file = sdxl.is_sdxl_file(keys)
    if family is not None:
        if xl_file != get_preset(family).is_sdxl:
            what = "an SDXL" if xl_file else "not an SDXL"
            raise CheckpointError(
                f"{reader.path} is {what} checkpoint (conditioner.embedders.* keys "
                f"{'present' if xl_file else 'absent'}) but --family {family} was given; "
                "leave --family out to detect the family"
            )
        if xl_file:
            sdxl.refuse_refiner(reader)
        return named_preset(family, wanted)
    config = metadata_config(meta)
    if config is not None:
        how = "from the file's metadata"
        return (config.with_prediction_type(wanted) if wanted else config), how
    if xl_file:
        config, how = sdxl.sdxl_preset(reader)
        return (config.with_prediction_type(wanted) if wanted else config), how
    if not any(k.startswith(UNET_PREFIX) for k in keys) and not any(
        k.startswith(EMA_PREFIX + "diffusion_model") for k in keys
    ):
        hint = ""
        if "conv_in.weight" in keys or any(k.startswith("down_blocks.") for k in keys):
            hint = " (a diffusers component file? pass the diffusers folder instead)"
        if any("lora" in k for k in keys):
            hint = " (a LoRA file: pass it with --lora on top of a base model)"
        raise CheckpointError(
            f"{reader.path} does not look like a Stable Diffusion checkpoint: "
            f"no {UNET_PREFIX}* keys{hint}; it has {first_keys(sorted(keys))}"
        )
    detected = detect(keys)
    step = reader.extras.get("global_step")
    candidates = [p for p in PRESETS.values() if not p.is_sdxl and matches_preset(detected, p)]
    if candidates:
        config = choose_preset(candidates, wanted, step, meta.get(META_FAMILY))
        return config, f"detected as {config.family} from the tensor shapes"
    if wanted is None and detected.openclip:
        wanted = sd2_prediction_from_step(step)
    base = custom_base(detected.openclip, detected.unet.context_dim, wanted)
    config = replace(base, unet=detected.unet, vae=detected.vae, text_encoder=detected.text)
    config = config.with_prediction_type(wanted) if wanted else config
    return config, "architecture read from the tensor shapes"


def single_file_components(
    reader: Reader, config: ModelConfig, modules: dict[str, nn.Module], use_ema: bool
) -> list[Component]:
    """Plan the three modules (four for SDXL, from `meta_modules(config)`) from one file."""
    if config.is_sdxl:
        return sdxl.sdxl_components(reader, modules)
    shapes = reader.shapes
    consumed: set[str] = set()
    unet, vae, text = (Component(n, modules[n]) for n in COMPONENTS)

    unet_keys = expected_shapes(unet.module)
    ema = {k: EMA_PREFIX + "diffusion_model" + k.replace(".", "") for k in unet_keys}
    ema_complete = use_ema and all(e in shapes for e in ema.values())

    def take(name: str) -> Source | str:
        """The file tensor `name` (now consumed), or just the name when the file lacks it."""
        if name not in shapes:
            return name
        consumed.add(name)
        return plain(reader, name)

    def unet_lookup(key: str, shape: tuple[int, ...]) -> Source | str:
        return take(ema[key] if ema_complete else UNET_PREFIX + key)

    def vae_lookup(key: str, shape: tuple[int, ...]) -> Source | str:
        found = take(VAE_PREFIX + key)
        return found if isinstance(found, str) else as_conv1x1(found, shape)

    openclip = any(k.startswith(OPENCLIP_PREFIX) for k in shapes)
    nested = any(k.startswith(CLIP_PREFIX + "text_model.") for k in shapes)

    def text_lookup(key: str, shape: tuple[int, ...]) -> Source | str:
        bare = text_bare(key)
        if not openclip:
            return take(CLIP_PREFIX + ("text_model." if nested else "") + bare)
        mapped = openclip_key(bare)
        if mapped is None:
            return f"{OPENCLIP_PREFIX}? (for {bare})"
        name, third = OPENCLIP_PREFIX + mapped[0], mapped[1]
        found = take(name)
        if isinstance(found, str) or third is None:
            return found
        # An in_proj that does not split in three is reported as a wrong shape.
        return sliced(reader, name, third, 3) or found

    resolve(unet, unet_lookup)
    resolve(vae, vae_lookup)
    resolve(text, text_lookup)

    dropped_block = (
        f"{OPENCLIP_PREFIX}transformer.resblocks.{config.text_encoder.num_hidden_layers}."
    )
    for key in shapes:
        if key in consumed or key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES):
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
