"""What one sd-bench run measures: parsed and checked against the engine dir before any work.

Every problem a user can fix (an unknown backend, a size the engines were not exported for,
an unwritable report folder) is a one-line `UserError` raised here, so a long benchmark never
fails half-way through for a reason that was knowable at the start.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sd_deploy.engine_dir import shapes
from sd_deploy.engine_dir.layout import REQUIRED_COMPONENTS
from sd_deploy.engine_dir.manifest import Manifest, read_manifest
from sd_deploy.errors import UserError
from sd_deploy.runtime.backends import BACKEND_NAMES
from sd_deploy.runtime.schedulers import make_scheduler

# Backends sd-bench knows besides the runtime's own: the PyTorch reference modules behind the
# runtime's loop, diffusers' StableDiffusionPipeline built from the same weights (in fp32, or
# fp16 on a GPU; and in bf16 on a CPU: the fastest plain-PyTorch way a user has there), and
# stable-diffusion.cpp through its Python package on the same weights saved as a checkpoint.
REFERENCE_BACKEND = "torch"
DIFFUSERS_BACKEND = "diffusers"
DIFFUSERS_BF16_BACKEND = "diffusers-bf16"
DIFFUSERS_BACKENDS = (DIFFUSERS_BACKEND, DIFFUSERS_BF16_BACKEND)
SDCPP_BACKEND = "stable-diffusion.cpp"
ENGINE_BACKENDS = tuple(name for name in BACKEND_NAMES if name != "auto")
BENCH_BACKENDS = (
    REFERENCE_BACKEND,
    *ENGINE_BACKENDS,
    *DIFFUSERS_BACKENDS,
    SDCPP_BACKEND,
)
DEFAULT_BACKENDS = "torch,onnxruntime,tensorrt,diffusers"

# Real prompts, so the text embeddings (and through them the UNet inputs) are what a user's
# requests produce rather than random tensors.
PROMPTS = (
    "a photograph of an astronaut riding a horse on the moon, detailed, 8k",
    "a watercolor painting of a lighthouse at dawn, soft light",
    "a bowl of ramen on a wooden table, studio photo, shallow depth of field",
    "an isometric pixel-art castle on a floating island",
)
NEGATIVE_PROMPT = "blurry, low quality, watermark, text"


def parse_backends(text: str) -> tuple[str, ...]:
    """'torch,onnxruntime' -> ('torch', 'onnxruntime'); torch (the reference) always first."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    if not names:
        raise UserError(f"--backends {text!r} names no backend; choose from {_backend_list()}")
    unknown = [name for name in names if name not in BENCH_BACKENDS]
    if unknown:
        raise UserError(f"unknown backend {unknown[0]!r}; choose from {_backend_list()}")
    ordered = [REFERENCE_BACKEND] + [n for n in names if n != REFERENCE_BACKEND]
    return tuple(dict.fromkeys(ordered))


def _backend_list() -> str:
    return ", ".join(BENCH_BACKENDS)


def parse_batches(text: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4): positive integers, duplicates dropped, order kept."""
    values: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or int(part) < 1:
            raise UserError(f"--batch {text!r} is not a list of positive integers (e.g. 1,2,4)")
        values.append(int(part))
    if not values:
        raise UserError(f"--batch {text!r} is not a list of positive integers (e.g. 1,2,4)")
    return tuple(dict.fromkeys(values))


_SIZE = re.compile(r"^\s*(\d+)\s*(?:[x×X*]\s*(\d+))?\s*$")


def parse_size(text: str) -> tuple[int, int]:
    """'512x512' (WIDTHxHEIGHT) or '512' (square) -> (width, height)."""
    match = _SIZE.match(text)
    if match is None:
        raise UserError(f"--size {text!r} is not WIDTHxHEIGHT in pixels (e.g. 512x512)")
    width = int(match.group(1))
    height = int(match.group(2)) if match.group(2) else width
    if width < 8 or height < 8:
        raise UserError(f"--size {text!r} is too small: at least 8x8 pixels")
    return width, height


@dataclass(frozen=True)
class BenchConfig:
    """A checked benchmark configuration; defaults already filled in from the manifest."""

    engine_dir: Path
    backends: tuple[str, ...]
    steps: int
    batches: tuple[int, ...]
    width: int
    height: int
    sampler: str
    guidance: float
    runs: int
    warmup: int
    seed: int
    report_dir: Path
    model_source: str | None = None
    # Intra-op threads for PyTorch, diffusers and ONNX Runtime alike; None: each library's own.
    threads: int | None = None

    @property
    def guided(self) -> bool:
        return self.guidance > 1.0

    def prompts(self, batch: int) -> list[str]:
        return [PROMPTS[i % len(PROMPTS)] for i in range(batch)]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["engine_dir"] = str(self.engine_dir)
        data["report_dir"] = str(self.report_dir)
        data["prompts"] = self.prompts(max(self.batches))
        data["negative_prompt"] = NEGATIVE_PROMPT
        return data


def resolve_config(
    engine_dir: str | Path,
    backends: str | Sequence[str] = DEFAULT_BACKENDS,
    steps: int | None = None,
    batches: str | Sequence[int] = (1,),
    size: str | tuple[int, int] | None = None,
    sampler: str | None = None,
    guidance: float | None = None,
    runs: int = 3,
    warmup: int = 1,
    seed: int = 0,
    report_dir: str | Path = "bench-report",
    model_source: str | None = None,
    threads: int | None = None,
) -> tuple[BenchConfig, Manifest]:
    """Parse, fill defaults from the engine dir's manifest, and refuse what cannot run."""
    from sd_deploy.runtime.images import check_writable_dir

    names = parse_backends(backends if isinstance(backends, str) else ",".join(backends))
    batch_sizes = (
        parse_batches(batches)
        if isinstance(batches, str)
        else parse_batches(",".join(map(str, batches)))
    )
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    sched = manifest.scheduler
    if size is None:
        width, height = manifest.model.default_width, manifest.model.default_height
    elif isinstance(size, str):
        width, height = parse_size(size)
    else:
        width, height = int(size[0]), int(size[1])
    steps = int(sched.get("default_steps", 30) if steps is None else steps)
    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    if runs < 1:
        raise UserError(f"--runs must be >= 1, got {runs}")
    if warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {warmup}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    sampler = sampler or str(sched.get("default_sampler", "euler_a"))
    make_scheduler(sampler, sched)  # unknown sampler: one line listing the names
    guidance = float(sched.get("default_guidance", 7.5) if guidance is None else guidance)
    if guidance < 0:
        raise UserError(f"--guidance must be >= 0, got {guidance}")
    for name in REQUIRED_COMPONENTS:
        for batch in batch_sizes:
            shapes.check_request(manifest.components[name].shape_ranges, batch, height, width, name)
    report = check_writable_dir(report_dir)
    config = BenchConfig(
        engine_dir=engine_dir,
        backends=names,
        steps=steps,
        batches=batch_sizes,
        width=width,
        height=height,
        sampler=sampler,
        guidance=guidance,
        runs=int(runs),
        warmup=int(warmup),
        seed=int(seed),
        report_dir=report,
        model_source=model_source,
        threads=threads,
    )
    return config, manifest
