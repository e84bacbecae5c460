"""sd-run: images from an engine dir (or a Triton server), as PNGs with their parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from sd_deploy.cli.common import (
    command,
    engine_option,
    precision_option,
    sampler_help,
    user_errors,
)
from sd_deploy.errors import UserError


@command
@engine_option
@click.option(
    "--prompt",
    default=None,
    help="What to draw, in A1111's syntax: (word:1.3) emphasis, BREAK, any length.",
)
@click.option("--negative-prompt", default="", help="What to steer away from.")
@click.option("--steps", type=int, default=None, help="Sampling steps [engine default].")
@click.option("--guidance", type=float, default=None, help="Classifier-free guidance scale.")
@click.option("--sampler", default=None, metavar="NAME", help=sampler_help())
@click.option(
    "--clip-skip",
    type=int,
    default=None,
    help="A1111's Clip skip: use the text encoder's layer N-1 before the last [1]; SD 2.x "
    "has a fixed layer.",
)
@click.option(
    "--no-emphasis", is_flag=True, help="Read brackets and BREAK as plain text (no weights)."
)
@click.option(
    "--original-size",
    type=int,
    nargs=2,
    default=None,
    metavar="H W",
    help="SDXL size conditioning: the original image size [the image size].",
)
@click.option(
    "--crop-top-left",
    type=int,
    nargs=2,
    default=None,
    metavar="TOP LEFT",
    help="SDXL size conditioning: crop coordinates [0 0].",
)
@click.option(
    "--target-size",
    type=int,
    nargs=2,
    default=None,
    metavar="H W",
    help="SDXL size conditioning: the target size [the image size].",
)
@click.option(
    "--from-png",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    metavar="IMAGE",
    help="Make an image again from the parameters it carries (ours or A1111's); flags "
    "given as well override them.",
)
@click.option(
    "--seed",
    type=int,
    default=None,
    help="Seed; image i uses seed + i. Negative (A1111's -1) or absent: a random one, "
    "written into each PNG.",
)
@click.option("--width", type=int, default=None, help="Pixels, multiple of 8 [model default].")
@click.option("--height", type=int, default=None, help="Pixels, multiple of 8 [model default].")
@click.option("--batch", type=int, default=1, show_default=True, help="Images per call.")
@click.option("--init-image", type=click.Path(path_type=Path), default=None, help="img2img source.")
@click.option(
    "--strength", type=float, default=0.8, show_default=True, help="img2img strength in (0, 1]."
)
@click.option(
    "--backend",
    default="auto",
    show_default=True,
    help="auto (TensorRT if its plans are usable here, else ONNX Runtime CUDA, else OpenVINO "
    "on a CPU with bf16 instructions when installed, else ONNX Runtime CPU), tensorrt, "
    "onnxruntime, onnxruntime-cpu, onnxruntime-cuda, onnxruntime-trt or openvino.",
)
@click.option(
    "--out",
    default="outputs",
    show_default=True,
    type=click.Path(path_type=Path),
    help="A folder (PNGs named NNNNN-SEED.png, never overwritten) or a file name ending in "
    ".png (batch > 1: NAME-0.png, NAME-1.png, ...).",
)
@click.option("--overwrite", is_flag=True, help="Let --out NAME.png replace existing files.")
@click.option(
    "--threads",
    type=int,
    default=None,
    help="ONNX Runtime intra-op CPU threads [one per physical core].",
)
@click.option(
    "--no-graph-cache",
    is_flag=True,
    help="Don't keep ONNX Runtime's optimized CPU graphs in the engine dir (saves about "
    "the graphs' size on disk; every load then re-optimizes, ~6 s for SD 1.5); with "
    "OpenVINO, don't keep its compiled models there.",
)
@precision_option
@click.option(
    "--server",
    default=None,
    metavar="URL",
    help="Generate on a Triton server (http://HOST:PORT or grpc://HOST:PORT) serving an "
    "sd-triton model instead of here; --engine/--backend/--threads are then the server's.",
)
@click.option(
    "--model-name", default="sd", show_default=True, help="The served model (with --server)."
)
@click.option(
    "--lora",
    "loras",
    multiple=True,
    metavar="FILE[:SCALE]",
    help="Apply a LoRA at run time (engine dirs exported with --lora-ready), repeatable; "
    "<lora:name:scale> in the prompt works too.",
)
@click.option(
    "--lora-dir",
    "lora_dirs",
    multiple=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Where <lora:name:scale> prompt tags find name.safetensors (default: the current "
    "folder); repeatable.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def run_command(
    engine_dir: Path,
    prompt: str,
    negative_prompt: str,
    steps: int | None,
    guidance: float | None,
    sampler: str | None,
    clip_skip: int | None,
    no_emphasis: bool,
    original_size: tuple[int, int] | None,
    crop_top_left: tuple[int, int] | None,
    target_size: tuple[int, int] | None,
    from_png: Path | None,
    seed: int | None,
    width: int | None,
    height: int | None,
    batch: int,
    init_image: Path | None,
    strength: float,
    backend: str,
    out: Path,
    overwrite: bool,
    threads: int | None,
    no_graph_cache: bool,
    precision: str,
    server: str | None,
    model_name: str,
    loras: tuple[str, ...],
    lora_dirs: tuple[Path, ...],
    quiet: bool,
) -> None:
    """Generate images from an engine dir with the numpy runtime.

    One call, so each component is loaded when first needed and freed when done:
    only one is resident at a time (the lowest peak memory)."""
    from tqdm.auto import tqdm

    # The request's fields, once: --from-png fills the ones not given as flags.
    fields = _from_png_request(
        from_png,
        dict(
            prompt=prompt,
            negative_prompt=negative_prompt,
            steps=steps,
            guidance=guidance,
            sampler=sampler,
            seed=seed,
            width=width,
            height=height,
            strength=strength,
            clip_skip=clip_skip,
            emphasis=not no_emphasis,
        ),
        engine_dir,
        init_image is not None,
    )
    if server is not None:
        if init_image is not None:
            raise UserError("--init-image: the served model does txt2img only")
        if loras:
            raise UserError("--lora: the served model has no run-time LoRAs")
        served = {k: v for k, v in fields.items() if k != "strength"}
        _run_on_server(server, model_name, out, overwrite, **served, batch=batch)
        return

    from sd_deploy.runtime import BackendOptions, GenerationRequest, Pipeline
    from sd_deploy.runtime.images import load_init_image, output_paths, save_png

    image = load_init_image(init_image) if init_image is not None else None
    options = BackendOptions(threads=threads, graph_cache=not no_graph_cache, precision=precision)
    pipe = Pipeline(engine_dir, backend=backend, options=options, keep_loaded=False)
    wants_lora = bool(loras) or "<lora:" in (fields["prompt"] or "")
    if wants_lora and backend == "auto" and not pipe.lora.supported:
        # auto picked a backend without run-time LoRAs (OpenVINO): ONNX Runtime has them
        pipe = Pipeline(engine_dir, backend="onnxruntime", options=options, keep_loaded=False)
        pipe.backend_reason = "auto, and the LoRAs need ONNX Runtime or TensorRT"
    if lora_dirs:
        pipe.lora_dirs = list(lora_dirs)
    request = GenerationRequest(
        **fields,
        loras=list(loras),
        batch=batch,
        init_image=image,
        original_size=tuple(original_size) if original_size else None,  # type: ignore[arg-type]
        crop_top_left=tuple(crop_top_left) if crop_top_left else (0, 0),  # type: ignore[arg-type]
        target_size=tuple(target_size) if target_size else None,  # type: ignore[arg-type]
    )
    resolved = pipe.validate(request)  # refuse a bad request before any output
    request.seed = resolved.seed  # a random seed drawn once: the files are named after it
    paths = output_paths(out, [resolved.seed + i for i in range(resolved.batch)], overwrite)
    click.echo(f"backend: {pipe.backend.describe()} ({pipe.backend_reason})", err=True)
    with tqdm(disable=quiet, unit="step", desc="sampling") as bar:

        def progress(i: int, total: int) -> None:
            bar.total = total
            bar.update(1)

        result = pipe.generate(request, progress=progress)
    for image_array, params, path in zip(result.images, result.parameters, paths, strict=True):
        click.echo(str(save_png(image_array, path, params.infotext())))
    t = result.timings
    click.echo(
        f"{len(result.images)} image(s) in {t['total']:.2f} s "
        f"(unet {t.get('unet', 0):.2f} s, runtime overhead {t['outside_backend']:.3f} s)",
        err=True,
    )


# sd-run options --from-png fills (flag name -> GenerationRequest field), unless given.
_FROM_PNG_FIELDS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "steps": "steps",
    "guidance": "guidance",
    "sampler": "sampler",
    "seed": "seed",
    "width": "width",
    "height": "height",
    "strength": "strength",
    "clip_skip": "clip_skip",
    "no_emphasis": "emphasis",
}


def _from_png_request(
    path: Path | None, values: dict[str, Any], engine_dir: Path, img2img: bool
) -> dict[str, Any]:
    """sd-run's request values: the flags, and with --from-png the image's parameters for
    every flag not given on the command line. Says when the image came from another model
    or from img2img without --init-image."""
    if path is None:
        if values["prompt"] is None:
            raise UserError("--prompt is required (or --from-png IMAGE)")
        return values
    import logging

    from click.core import ParameterSource

    from sd_deploy.engine_dir.manifest import read_manifest
    from sd_deploy.runtime.images import read_png_parameters
    from sd_deploy.runtime.infotext import model_short_hash, parse_infotext

    ctx = click.get_current_context()
    given = {
        field
        for flag, field in _FROM_PNG_FIELDS.items()
        if ctx.get_parameter_source(flag) not in (None, ParameterSource.DEFAULT)
    }
    parsed = parse_infotext(read_png_parameters(path))
    result = {**values, **parsed.request_fields(skip=given)}
    log = logging.getLogger("sd_deploy")
    theirs = parsed.params.get("Model hash")
    ours = model_short_hash(read_manifest(engine_dir).provenance.get("source_sha256"))
    if theirs and theirs != ours:
        name = parsed.params.get("Model", "?")
        log.warning(
            "%s was made with model %s [%s]; %s holds %s: the image will differ",
            path,
            name,
            theirs,
            engine_dir,
            f"[{ours}]" if ours else "another model",
        )
    if parsed.strength is not None and not img2img:
        log.warning(
            "%s was made by img2img (Denoising strength %s); without --init-image this is txt2img",
            path,
            parsed.strength,
        )
    return result


def _run_on_server(url: str, model: str, out: Path, overwrite: bool, **request: Any) -> None:
    """sd-run --server: the same request and PNGs, the work done by the Triton server."""
    import random
    import time

    from sd_deploy.runtime.images import output_paths, save_png
    from sd_deploy.serving.client import RemotePipeline

    if request["seed"] is None or request["seed"] < 0:
        request["seed"] = random.randrange(2**31)
    seeds = [request["seed"] + i for i in range(max(request["batch"], 1))]
    paths = output_paths(out, seeds, overwrite)
    start = time.perf_counter()
    with RemotePipeline(url, model=model) as remote:
        images, texts = remote.generate(**request)
    for image_array, text, path in zip(images, texts, paths, strict=True):
        click.echo(str(save_png(image_array, path, text)))
    elapsed = time.perf_counter() - start
    click.echo(f"{len(images)} image(s) in {elapsed:.2f} s on {url} ({model})", err=True)
