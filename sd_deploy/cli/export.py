"""sd-export: a model (checkpoint, diffusers folder, preset) to per-component ONNX graphs."""

from __future__ import annotations

from pathlib import Path

import click

from sd_deploy.cli.common import (
    COMPONENT_CHOICES,
    command,
    range_options,
    user_errors,
)


@command
@click.option(
    "--model",
    "source",
    default="default",
    show_default=True,
    help="Checkpoint file (.safetensors/.ckpt), diffusers folder, 'default' (the packaged "
    "model), or a preset name with --random-weights.",
)
@click.option(
    "--component",
    "components",
    multiple=True,
    default=("all",),
    show_default=True,
    metavar="NAME",
    help=f"Component to export, repeatable: {', '.join(COMPONENT_CHOICES)}.",
)
@click.option("--fp16", is_flag=True, help="Write FP16 graphs (norms/softmax kept in fp32).")
@click.option(
    "--out",
    default="engines",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Engine dir.",
)
@range_options
@click.option(
    "--context-length",
    default=None,
    metavar="MIN:OPT:MAX",
    help="Tokens of the UNet's prompt context, multiples of 77 (one per 75-token prompt "
    "chunk) [77:77:231: prompts up to 225 tokens].",
)
@click.option("--opset", default=17, show_default=True, type=click.IntRange(14, 21))
@click.option("--force", is_flag=True, help="Replace an engine dir holding another model.")
@click.option("--no-validate", is_flag=True, help="Skip the ONNX Runtime vs PyTorch check.")
@click.option("--random-weights", is_flag=True, help="Seeded random weights for a preset.")
@click.option("--seed", default=0, show_default=True, help="Seed for --random-weights.")
@click.option("--family", default=None, help="Override the detected model family.")
@click.option(
    "--prediction-type",
    type=click.Choice(["epsilon", "v_prediction"]),
    default=None,
    help="Override the detected prediction type.",
)
@click.option(
    "--lora",
    "loras",
    multiple=True,
    metavar="FILE[:SCALE]",
    help="Merge a LoRA (.safetensors, kohya or diffusers format) into the weights before "
    "export, at SCALE (default 1); repeatable.",
)
@click.option(
    "--lora-ready",
    is_flag=True,
    help="Keep what switching LoRAs at run time needs (sd-run --lora), without re-export.",
)
@user_errors
def export_command(
    source: str,
    components: tuple[str, ...],
    fp16: bool,
    out: Path,
    batch: str | None,
    height: str | None,
    width: str | None,
    context_length: str | None,
    opset: int,
    force: bool,
    no_validate: bool,
    random_weights: bool,
    seed: int,
    family: str | None,
    prediction_type: str | None,
    loras: tuple[str, ...],
    lora_ready: bool,
) -> None:
    """Export a Stable Diffusion model to ONNX graphs in an engine dir."""
    import time

    from sd_deploy.engine_dir import shapes
    from sd_deploy.engine_dir.lora import parse_lora_arg
    from sd_deploy.exporter import export_engine_dir, resolve_components
    from sd_deploy.models import load_models
    from sd_deploy.models.loading import modules_for

    resolve_components(components)  # unknown names fail before the model loads
    lora_specs = [parse_lora_arg(text) for text in loras]
    start = time.perf_counter()
    click.echo(f"loading {source} ...", err=True)
    models = load_models(
        source,
        random_init=random_weights,
        seed=seed,
        family=family,
        prediction_type=prediction_type,
        # only the modules the named components need are filled (LoRAs merge into all)
        materialize=None if lora_specs else modules_for(components),
    )
    applied = []
    if lora_specs:
        from sd_deploy.models.lora import merge_loras

        applied = merge_loras(models, lora_specs)
        for lora in applied:
            click.echo(
                f"merged LoRA {lora.name} ({lora.format}, {lora.layers} layers) at {lora.scale:g}",
                err=True,
            )
    defaults = shapes.default_ranges(models.config.default_size)
    ranges = shapes.override(defaults, batch, height, width, context_length)
    manifest = export_engine_dir(
        models,
        out,
        components=components,
        fp16=fp16,
        ranges=ranges,
        opset=opset,
        force=force,
        validate=not no_validate,
        loras=[lora.to_dict() for lora in applied],
        lora_ready=lora_ready,
    )
    for name in resolve_components(components):
        spec = manifest.components.get(name)
        if spec is None:  # "all" names text_encoder_2, which only SDXL models have
            continue
        v = spec.validation
        check = (
            f"rel L2 {v['max_rel_l2']:.2e} <= {v['tolerance_rel_l2']:g}"
            if v.get("validated")
            else "not validated"
        )
        click.echo(f"{name:13s} {spec.precision}  {check}  -> {out / spec.onnx}")
    click.echo(f"exported {models.config.family} to {out} in {time.perf_counter() - start:.1f} s")
