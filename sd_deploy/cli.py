"""Command-line entry points: sd-export, sd-build, sd-run, sd-bench.

Thin by design: parse, call the library, report. Heavy libraries (torch, onnx,
onnxruntime, tensorrt) are imported inside the commands so `--help` is instant.
A `UserError` becomes one line on stderr and exit status 1; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from sd_deploy.engine_dir.layout import COMPONENTS
from sd_deploy.errors import UserError
from sd_deploy.runtime.schedulers import SAMPLERS

F = TypeVar("F", bound=Callable[..., Any])


class _OneLineHandler(logging.Handler):
    """The library's log messages (logger "sd_deploy") as one `warning: ...` line each,
    printed under any progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        level = "warning" if record.levelno >= logging.WARNING else "note"
        tqdm.write(f"{level}: {record.getMessage()}", file=sys.stderr)


def user_errors(func: F) -> F:
    """Turn UserError into `error: <message>` and exit 1; KeyboardInterrupt into exit 130;
    the library's warnings into one `warning: <message>` line each."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logger = logging.getLogger("sd_deploy")
        handler = _OneLineHandler(logging.WARNING)
        logger.addHandler(handler)
        logger.propagate = False
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing half-written was kept", err=True)
            sys.exit(130)
        finally:
            logger.removeHandler(handler)
            logger.propagate = True

    return wrapper  # type: ignore[return-value]


def range_options(func: F) -> F:
    """--batch/--height/--width as N or MIN:OPT:MAX."""
    for name, what in (("width", "pixels"), ("height", "pixels"), ("batch", "images per call")):
        func = click.option(
            f"--{name}",
            metavar="N|MIN:OPT:MAX",
            default=None,
            help=f"{name.capitalize()} range ({what}).",
        )(func)
    return func


def command(func: F) -> click.Command:
    """A click command whose help is its own docstring. (One shared `click.command(...)`
    decorator object would give every command the first one's help text.)"""
    return click.command(context_settings={"help_option_names": ["-h", "--help"]})(func)


engine_option = click.option(
    "--engine",
    "engine_dir",
    default="engines",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Engine dir made by sd-export (and sd-build).",
)

COMPONENT_CHOICES = ["all", *COMPONENTS]


# ---------------------------------------------------------------------------- sd-export


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


# ---------------------------------------------------------------------------- sd-build


@command
@engine_option
@click.option(
    "--component", "components", multiple=True, default=("all",), show_default=True, metavar="NAME"
)
@range_options
@click.option("--static", is_flag=True, help="One fixed shape (the opt values): fastest engines.")
@click.option(
    "--timing-cache", type=click.Path(path_type=Path), default=None, help="Reused across builds."
)
@click.option("--optimization-level", type=click.IntRange(0, 5), default=None)
@click.option("--workspace", default=None, metavar="SIZE", help="Builder workspace, e.g. 4G.")
@click.option("--force", is_flag=True, help="Rebuild even up-to-date plans.")
@click.option(
    "--refittable",
    is_flag=True,
    help="Plans whose weights can be refit: sd-run --lora switches LoRAs without a rebuild "
    "(engine dirs exported with --lora-ready).",
)
@user_errors
def build_command(
    engine_dir: Path,
    components: tuple[str, ...],
    batch: str | None,
    height: str | None,
    width: str | None,
    static: bool,
    timing_cache: Path | None,
    optimization_level: int | None,
    workspace: str | None,
    force: bool,
    refittable: bool,
) -> None:
    """Build FP16 TensorRT engines (strongly typed) from an engine dir's ONNX graphs."""
    from sd_deploy.engines import build_engines

    results = build_engines(
        engine_dir,
        components=components,
        batch=batch,
        height=height,
        width=width,
        static=static,
        timing_cache=timing_cache,
        optimization_level=optimization_level,
        workspace=workspace,
        force=force,
        refittable=refittable,
    )
    for result in results:
        click.echo(str(result))


# ---------------------------------------------------------------------------- sd-run


def _sampler_help() -> str:
    return "Sampler: " + "; ".join(f"{name} ({s.description})" for name, s in SAMPLERS.items())


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
@click.option("--sampler", default=None, metavar="NAME", help=_sampler_help())
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
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16"]),
    default="auto",
    show_default=True,
    help="OpenVINO's compute precision: auto is bf16 where the CPU has AMX or AVX512-BF16, "
    "else fp32. Other backends run the graphs as exported (bf16 is refused there).",
)
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

    given = _from_png_request(
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
    prompt, negative_prompt, steps = given["prompt"], given["negative_prompt"], given["steps"]
    guidance, sampler, seed = given["guidance"], given["sampler"], given["seed"]
    width, height, strength = given["width"], given["height"], given["strength"]
    clip_skip, no_emphasis = given["clip_skip"], not given["emphasis"]
    if server is not None and (clip_skip not in (None, 1) or no_emphasis):
        raise UserError("--clip-skip / --no-emphasis: the served model reads prompts its way")

    if server is not None:
        if init_image is not None:
            raise UserError("--init-image: the served model does txt2img only")
        if loras:
            raise UserError("--lora: the served model has no run-time LoRAs")
        _run_on_server(
            server,
            model_name,
            out,
            overwrite,
            prompt=prompt,
            negative_prompt=negative_prompt,
            steps=steps,
            guidance=guidance,
            sampler=sampler,
            seed=seed,
            width=width,
            height=height,
            batch=batch,
        )
        return

    from sd_deploy.runtime import BackendOptions, GenerationRequest, Pipeline
    from sd_deploy.runtime.images import load_init_image, output_paths, save_png

    image = load_init_image(init_image) if init_image is not None else None
    options = BackendOptions(threads=threads, graph_cache=not no_graph_cache, precision=precision)
    pipe = Pipeline(engine_dir, backend=backend, options=options, keep_loaded=False)
    wants_lora = bool(loras) or "<lora:" in (prompt or "")
    if wants_lora and backend == "auto" and not pipe.lora.supported:
        # auto picked a backend without run-time LoRAs (OpenVINO): ONNX Runtime has them
        pipe = Pipeline(engine_dir, backend="onnxruntime", options=options, keep_loaded=False)
        pipe.backend_reason = "auto, and the LoRAs need ONNX Runtime or TensorRT"
    if lora_dirs:
        pipe.lora_dirs = list(lora_dirs)
    request = GenerationRequest(
        loras=list(loras),
        prompt=prompt,
        negative_prompt=negative_prompt,
        steps=steps,
        guidance=guidance,
        sampler=sampler,
        seed=seed,
        width=width,
        height=height,
        batch=batch,
        init_image=image,
        strength=strength,
        clip_skip=clip_skip,
        emphasis=not no_emphasis,
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


# ---------------------------------------------------------------------------- sd-bench


@command
@engine_option
@click.option(
    "--backends",
    default="torch,onnxruntime,tensorrt,diffusers",
    show_default=True,
    help="Comma-separated: torch (the PyTorch fp32 reference, always run), diffusers, "
    "tensorrt, onnxruntime, onnxruntime-cpu, onnxruntime-cuda, onnxruntime-trt.",
)
@click.option("--steps", type=int, default=None, help="Sampling steps [engine default].")
@click.option("--batch", "batches", default="1", show_default=True, help="Batch sizes, e.g. 1,2,4.")
@click.option("--size", default=None, metavar="WxH", help="Image size [model default].")
@click.option("--sampler", default=None, metavar="NAME", help=_sampler_help())
@click.option("--guidance", type=float, default=None, help="Guidance scale [engine default].")
@click.option(
    "--runs", type=click.IntRange(min=1), default=3, show_default=True, help="Timed runs."
)
@click.option(
    "--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed runs first."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial noise.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Intra-op CPU threads for PyTorch, diffusers and ONNX Runtime alike [each library's "
    "default].",
)
@click.option(
    "--report",
    "report_dir",
    default="bench-report",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Folder for report.json, report.md and the PNG plots.",
)
@click.option(
    "--model",
    "model_source",
    default=None,
    help="PyTorch model to compare with [the manifest's provenance.source]: checkpoint, "
    "diffusers folder, or preset:NAME:random-seed-S.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def bench_command(
    engine_dir: Path,
    backends: str,
    steps: int | None,
    batches: str,
    size: str | None,
    sampler: str | None,
    guidance: float | None,
    runs: int,
    warmup: int,
    seed: int,
    threads: int | None,
    report_dir: Path,
    model_source: str | None,
    quiet: bool,
) -> None:
    """Parity and latency of PyTorch and every backend on the same inputs."""
    from sd_deploy.benchmarks.harness import run_benchmark

    report = run_benchmark(
        engine_dir,
        backends=backends,
        steps=steps,
        batches=batches,
        size=size,
        sampler=sampler,
        guidance=guidance,
        runs=runs,
        warmup=warmup,
        seed=seed,
        threads=threads,
        report_dir=report_dir,
        model_source=model_source,
        progress=not quiet,
    )
    first = str(report["config"]["batches"][0])
    for name, entry in report["backends"].items():
        if entry["status"] != "ok":
            click.echo(f"{name:16s} {entry['status']}: {entry['reason']}")
            continue
        median = entry["latency"][first]["end_to_end"]["median"]
        speedup = report["ratios"].get("vs_torch", {}).get(name, {}).get("latency", {})
        ratio = speedup.get(first, {}).get("end_to_end")
        images = entry.get("parity", {}).get("images", {})
        psnr = images.get("psnr_db")
        click.echo(
            f"{name:16s} {median:8.3f} s/generation (batch {first})"
            + (f"  {ratio:.2f}x PyTorch" if ratio else "")
            + (f"  PSNR {psnr if isinstance(psnr, str) else f'{psnr:.1f}'} dB" if psnr else "")
        )
    click.echo(f"report: {report_dir / 'report.md'}")


# ---------------------------------------------------------------------------- sd-triton


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def triton_group() -> None:
    """Serve engine dirs with NVIDIA Triton Inference Server (docs/serving.md)."""


@triton_group.command("export")
@engine_option
@click.option(
    "--out",
    default="model_repository",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Model repository folder (the model goes to OUT/NAME/).",
)
@click.option("--name", default="sd", show_default=True, help="Model name clients call.")
@click.option(
    "--max-batch",
    type=click.IntRange(min=0),
    default=None,
    help="max_batch_size; > 0 turns dynamic batching on, 0 means unbatched I/O "
    "[the engine dir's batch range max: the most images one generation takes].",
)
@click.option(
    "--instances",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Model instances (each loads the engine dir once) per device.",
)
@click.option(
    "--kind",
    type=click.Choice(["auto", "cpu", "gpu"]),
    default="auto",
    show_default=True,
    help="Instance kind: KIND_GPU (one instance set per GPU) or KIND_CPU; auto = gpu where "
    "an NVIDIA GPU is visible here.",
)
@click.option(
    "--backend",
    default="auto",
    show_default=True,
    help="Runtime backend each instance uses (as sd-run --backend).",
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime threads.")
@click.option(
    "--queue-delay-us",
    type=click.IntRange(min=0),
    default=5000,
    show_default=True,
    help="How long the dynamic batcher waits for more requests.",
)
@click.option(
    "--max-prompt-chars",
    type=click.IntRange(min=1),
    default=4096,
    show_default=True,
    help="Longer prompts are refused with an error response.",
)
@click.option("--force", is_flag=True, help="Replace an existing OUT/NAME/.")
@user_errors
def triton_export_command(
    engine_dir: Path,
    out: Path,
    name: str,
    max_batch: int | None,
    instances: int,
    kind: str,
    backend: str,
    threads: int | None,
    queue_delay_us: int,
    max_prompt_chars: int,
    force: bool,
) -> None:
    """Write a Triton model repository whose Python-backend model runs the engine dir."""
    from sd_deploy.serving import RepositoryConfig, write_model_repository
    from sd_deploy.serving.repository import resolve_kind

    config = RepositoryConfig(
        name=name,
        max_batch=max_batch,
        instances=instances,
        kind=kind,
        backend=backend,
        threads=threads,
        queue_delay_us=queue_delay_us,
        max_prompt_chars=max_prompt_chars,
    )
    model_dir = write_model_repository(engine_dir, out, config, force=force)
    text = (model_dir / "config.pbtxt").read_text()
    max_batch = int(text.split("max_batch_size: ", 1)[1].split()[0])
    click.echo(
        f"{model_dir}: model {name}, max_batch_size {max_batch}, "
        f"{instances} x KIND_{resolve_kind(kind).upper()}, engine dir {engine_dir.resolve()}"
    )
    click.echo(f"serve it: sd-triton serve --repository {out}")


@triton_group.command("serve")
@click.option(
    "--repository",
    default="model_repository",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Model repository made by sd-triton export.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--http-port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=8002, show_default=True)
@click.option(
    "--stub-env",
    type=click.Path(path_type=Path),
    default=None,
    envvar="SD_TRITON_STUB_ENV",
    help="NumPy 1 env for the Python backend stubs (sd-triton stub-env) [$SD_TRITON_STUB_ENV].",
)
@click.option(
    "--log",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the server's log to this file [this terminal].",
)
@user_errors
def triton_serve_command(
    repository: Path,
    host: str,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    stub_env: Path | None,
    log: Path | None,
) -> None:
    """Run tritonserver on the repository until Ctrl-C / SIGTERM (port 0: any free one)."""
    import signal
    import threading

    from sd_deploy.serving.server import TritonServer

    server = TritonServer(
        repository,
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        stub_env=stub_env,
        log=log,
    )
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        for state in server.model_states() or []:
            reason = str(state.get("reason", "")).strip().splitlines()
            why = f": {reason[0]}" if reason and state.get("state") != "READY" else ""
            click.echo(f"model {state['name']}: {state.get('state')}{why}")
        click.echo(f"HTTP    {server.http_url}")
        click.echo(f"gRPC    {server.grpc_url}")
        click.echo(f"metrics {server.metrics_url}")
        status = "ready" if server.ready() else "up, NOT ready (a model failed to load)"
        click.echo(f"{status}; Ctrl-C stops", nl=True)
        while not stop.wait(0.5):
            if server.process is None or server.process.poll() is not None:
                code = server.stop()
                raise UserError(f"tritonserver exited by itself (status {code})")
        code = server.stop()
        click.echo(f"stopped (tritonserver exit status {code})")
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@triton_group.command("stub-env")
@click.argument("folder", type=click.Path(path_type=Path))
@user_errors
def triton_stub_env_command(folder: Path) -> None:
    """Make the NumPy 1 env the Python backend stubs run in (runs pip once)."""
    from sd_deploy.serving.server import STUB_ENV_VAR, STUB_NUMPY, make_stub_env

    env = make_stub_env(folder)
    click.echo(f"{env}: {STUB_NUMPY} over this environment's packages")
    click.echo(f"use it: sd-triton serve --stub-env {env}   (or export {STUB_ENV_VAR}={env})")
