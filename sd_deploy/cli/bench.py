"""sd-bench: parity with PyTorch and speed, backend against backend."""

from __future__ import annotations

from pathlib import Path

import click

from sd_deploy.cli.common import (
    command,
    engine_option,
    sampler_help,
    user_errors,
)


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
@click.option("--sampler", default=None, metavar="NAME", help=sampler_help())
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
