"""sd-bench's driver: every backend on the same inputs, in one process, into one report.

Order of work:

1. PyTorch reference (fp32, our runtime's loop over the reference modules): load the models
   the engines came from, run one generation while recording every component call (the
   realistic parity inputs), then the timed runs.
2. diffusers (if asked): StableDiffusionPipeline on the same weight tensors, measured while
   the reference models are still in memory (it shares them instead of copying).
3. The reference models are freed; then each engine backend (onnxruntime, tensorrt, ...):
   load, parity on the recorded inputs, timed runs. Each is closed and freed after its turn,
   so peak memory is one backend's, not the sum.

Every generation of every backend starts from the same initial noise, prompts and sampler
settings; a backend that cannot run here is reported as skipped with the reason.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sd_deploy.benchmarks.config import (
    DIFFUSERS_BACKEND,
    DIFFUSERS_BACKENDS,
    DIFFUSERS_BF16_BACKEND,
    NEGATIVE_PROMPT,
    REFERENCE_BACKEND,
    SDCPP_BACKEND,
    BenchConfig,
    resolve_config,
)
from sd_deploy.benchmarks.machine import load_average, machine_info, versions
from sd_deploy.benchmarks.parity import (
    Captured,
    component_parity,
    image_contrast,
    image_parity,
)
from sd_deploy.benchmarks.reference import reference_source
from sd_deploy.benchmarks.timing import CallLog, MemoryWatch, Stopwatch, summarize
from sd_deploy.engine_dir.layout import COMPONENTS
from sd_deploy.engine_dir.manifest import Manifest
from sd_deploy.errors import UserError, first_line
from sd_deploy.runtime import BackendOptions, GenerationRequest, GenerationResult, Pipeline

REPORT_SCHEMA = 1

# A generation: returns uint8 images and advances the progress display once per step.
Generate = Callable[[int], np.ndarray]


@dataclass
class Progress:
    """A tqdm bar counting sampling steps across all backends (or nothing when disabled)."""

    enabled: bool
    total: int
    bar: Any = None
    done: int = 0  # steps counted so far

    def __enter__(self) -> Progress:
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, unit="step", desc="sd-bench", dynamic_ncols=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def step(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def phase(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)

    def drop(self, steps: int) -> None:
        """A backend was skipped: its steps will never come."""
        if self.bar is not None:
            self.bar.total -= steps
            self.bar.refresh()

    def give_up(self, since: int, planned: int) -> None:
        """A backend failed part-way: of the `planned` steps it was to count from `done`
        == `since` on, those it has not counted will never come."""
        self.drop(max(planned - (self.done - since), 0))


@dataclass
class Workload:
    """The identical inputs every backend gets: prompts, ids, initial noise per batch size."""

    config: BenchConfig
    manifest: Manifest
    noise: dict[int, np.ndarray] = field(default_factory=dict)

    def initial_noise(self, batch: int) -> np.ndarray:
        if batch not in self.noise:
            m = self.manifest.model
            shape = (
                m.latent_channels,
                self.config.height // m.vae_scale_factor,
                self.config.width // m.vae_scale_factor,
            )
            rngs = [np.random.default_rng(self.config.seed + i) for i in range(batch)]
            self.noise[batch] = np.stack([r.standard_normal(shape, dtype=np.float32) for r in rngs])
        return self.noise[batch]

    def requests(self, batch: int) -> list[GenerationRequest]:
        """One request per image (each its own prompt, seed + i): one batched generation."""
        c = self.config
        return [
            GenerationRequest(
                prompt=prompt,
                negative_prompt=NEGATIVE_PROMPT,
                height=c.height,
                width=c.width,
                steps=c.steps,
                guidance=c.guidance,
                sampler=c.sampler,
                seed=c.seed + i,
            )
            for i, prompt in enumerate(c.prompts(batch))
        ]

    def generate(self, pipe: Pipeline, batch: int, progress: Progress) -> GenerationResult:
        return pipe.generate_from_noise(
            self.requests(batch), self.initial_noise(batch), lambda i, n: progress.step()
        )

    def steps_per_backend(self) -> int:
        c = self.config
        return (c.warmup + c.runs) * len(c.batches) * c.steps


def measure_series(
    generate: Generate, log: CallLog, batch: int, config: BenchConfig
) -> tuple[dict[str, Any], np.ndarray]:
    """Warm-up runs, then `config.runs` timed runs of one batch size; stats and last images."""
    cold: list[float] = []
    for _ in range(config.warmup):
        with Stopwatch() as sw:
            generate(batch)
        cold.append(sw.seconds)
    totals: list[float] = []
    outside: list[float] = []
    calls: dict[str, list[float]] = {}
    images = np.zeros(0, np.uint8)
    for _ in range(config.runs):
        log.clear()
        with Stopwatch() as sw:
            images = generate(batch)
        totals.append(sw.seconds)
        run_calls = log.snapshot()
        outside.append(sw.seconds - sum(sum(v) for v in run_calls.values()))
        for name, values in run_calls.items():
            calls.setdefault(name, []).extend(values)
    e2e = summarize(totals)
    result: dict[str, Any] = {
        "batch": batch,
        "end_to_end": e2e,
        "images_per_s": batch / e2e["median"] if e2e["median"] else None,
        "warmup_s": cold,
        "components": {name: summarize(calls[name]) for name in COMPONENTS if name in calls},
        "calls_per_run": {name: len(calls[name]) / config.runs for name in calls},
        # Everything outside component calls: tokenizer, sampler math, guidance, copies.
        "outside_components": summarize(outside),
    }
    if "unet" in calls:
        per_run = len(calls["unet"]) // config.runs
        result["unet_all_steps"] = summarize(
            sum(calls["unet"][r * per_run : (r + 1) * per_run]) for r in range(config.runs)
        )
    return result, images


def _pipeline_generate(pipe: Pipeline, work: Workload, progress: Progress) -> Generate:
    def generate(batch: int) -> np.ndarray:
        return work.generate(pipe, batch, progress).images

    return generate


def timed_import(*modules: str) -> float:
    """Import `modules` now and return the seconds it took, so load times exclude imports."""
    import importlib

    with Stopwatch(synchronize=False) as sw:
        for module in modules:
            importlib.import_module(module)
    return sw.seconds


def _free(*objects: Any) -> None:
    for obj in objects:
        close = getattr(obj, "close", None)
        if callable(close):
            close()
    del objects
    gc.collect()


@dataclass
class Reference:
    """What the PyTorch reference run leaves for the others to be compared with."""

    captured: Captured
    images: np.ndarray  # uint8 at the first batch size, from the workload's initial noise
    models: Any  # LoadedModels; dropped before the engine backends run
    device: str
    tokenizer: Any


def measure_reference(work: Workload, progress: Progress) -> tuple[dict[str, Any], Reference]:
    import torch

    from sd_deploy.benchmarks.parity import RecordingBackend
    from sd_deploy.benchmarks.reference import load_reference_models
    from sd_deploy.benchmarks.timing import TimedBackend
    from sd_deploy.benchmarks.torch_backend import TorchBackend

    config, manifest = work.config, work.manifest
    device = "cuda" if torch.cuda.is_available() else "cpu"
    progress.phase("torch: loading")
    import_s = timed_import("transformers.models.clip.modeling_clip")
    with MemoryWatch() as memory:
        with Stopwatch() as load:
            models, source_note = load_reference_models(
                manifest, config.engine_dir, config.model_source
            )
            recorder = RecordingBackend(TorchBackend(models, device))
            timed = TimedBackend(recorder)
            pipe = Pipeline(config.engine_dir, backend=timed)
            pipe.load_all()
        progress.phase("torch: capturing a reference trajectory")
        first = config.batches[0]
        result = work.generate(pipe, first, progress)
        if "vae_encoder" in manifest.components:
            # Real images to encode: the reference run's own output.
            pipe.run_component("vae_encoder", {"images": result.images.transpose(0, 3, 1, 2) / 255})
        recorder.recording = False
        latency: dict[str, Any] = {}
        for batch in config.batches:
            progress.phase(f"torch: batch {batch}")
            latency[str(batch)], _ = measure_series(
                _pipeline_generate(pipe, work, progress), timed.log, batch, config
            )
    entry = {
        "name": REFERENCE_BACKEND,
        "status": "ok",
        "role": "reference (PyTorch fp32 modules in sd-deploy's sampler loop)",
        "describe": timed.describe(),
        "load_s": load.seconds,
        "import_s": import_s,
        "load_means": "load the PyTorch modules from the model source (for preset:... "
        "sources: rebuild the seeded random weights) and open them",
        "source": source_note,
        "torch_threads": torch.get_num_threads(),
        "memory": memory.read(),
        "latency": latency,
        "reference_image_contrast": image_contrast(result.images),
    }
    reference = Reference(recorder.captured, result.images, models, device, pipe.tokenizer)
    _free(pipe)
    return entry, reference


def measure_engine_backend(
    name: str, work: Workload, reference: Reference, progress: Progress
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Load, parity on the recorded inputs, timed runs; skipped with a reason if unusable."""
    from sd_deploy.benchmarks.timing import TimedBackend
    from sd_deploy.runtime.backends import select_backend, tensorrt_ready

    config, manifest = work.config, work.manifest
    entry: dict[str, Any] = {"name": name}
    if name == "tensorrt":
        ready, why = tensorrt_ready(config.engine_dir, manifest)
        if not ready:
            return skipped(entry, why, work, progress), None
    progress.phase(f"{name}: loading")
    started = progress.done
    library = {"tensorrt": "tensorrt", "openvino": "openvino"}.get(name, "onnxruntime")
    import_s = timed_import(library) if importlib.util.find_spec(library) else None
    pipe: Pipeline | None = None
    try:
        with MemoryWatch() as memory:
            with Stopwatch() as load:
                options = BackendOptions(threads=config.threads)
                backend, _ = select_backend(name, config.engine_dir, manifest, options)
                timed = TimedBackend(backend)
                pipe = Pipeline(config.engine_dir, backend=timed)
                pipe.load_all()
            unet = manifest.components.get("unet")
            entry.update(
                status="ok",
                describe=timed.describe(),
                # What the graphs computed in: OpenVINO's choice, else the export's.
                precision=timed.compute_precision() or (unet.precision if unet else ""),
                load_s=load.seconds,
                import_s=import_s,
                load_means="open every component of the engine dir (read the graphs or plans "
                "and build the sessions)",
            )
            session_pipe = pipe
            entry["parity"] = _parity(name, session_pipe.run_component, reference, progress)
            entry["latency"], images = _latency(
                name, _pipeline_generate(pipe, work, progress), timed.log, work, progress
            )
        entry["memory"] = memory.read()
    except UserError as exc:  # a backend missing here, a plan for another GPU, NaN from fp16
        if pipe is None:
            return skipped(entry, str(exc), work, progress), None
        progress.give_up(started, work.steps_per_backend())
        entry.update(status="failed", reason=str(exc))
        return entry, None
    finally:
        if pipe is not None:
            _free(pipe)
    entry["parity"]["images"] = image_parity(images, reference.images)
    return entry, images


def measure_diffusers(
    work: Workload, reference: Reference, progress: Progress, name: str = DIFFUSERS_BACKEND
) -> tuple[dict[str, Any], np.ndarray | None]:
    """diffusers on the reference's weights: fp32 (fp16 on a GPU), or bf16 for
    diffusers-bf16 (torch_dtype=torch.bfloat16, what a user on a bf16 CPU picks)."""
    import torch

    from sd_deploy.benchmarks.diffusers_backend import (
        STOCHASTIC_SAMPLERS,
        DiffusersBackend,
        DiffusersPipelineRunner,
        diffusers_unavailable,
        import_diffusers_pipeline,
    )

    config, manifest = work.config, work.manifest
    entry: dict[str, Any] = {"name": name}
    why = diffusers_unavailable()
    if why is not None:
        return skipped(entry, why, work, progress), None
    dtype = torch.float16 if reference.device == "cuda" else torch.float32
    if name == DIFFUSERS_BF16_BACKEND:
        dtype = torch.bfloat16
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    progress.phase(f"{name}: converting")
    with Stopwatch(synchronize=False) as imports:
        import_diffusers_pipeline()
    with MemoryWatch() as memory:
        with Stopwatch() as load:
            backend = DiffusersBackend(reference.models, reference.device, dtype)
            runner = DiffusersPipelineRunner(backend, config.sampler, manifest.scheduler)
        entry.update(
            status="ok",
            role="baseline (diffusers StableDiffusionPipeline on the same weights)",
            describe=backend.describe(),
            precision=precision,
            load_s=load.seconds,
            import_s=imports.seconds,
            load_means="convert the reference's state dicts with diffusers' single-file "
            "converters and build the pipeline (weights already in memory and shared, so "
            "reading a checkpoint is not included)",
        )
        sessions: dict[str, Any] = {}

        def run_component(component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if component not in sessions:
                spec = manifest.components[component]
                sessions[component] = backend.open(config.engine_dir, spec)
            return sessions[component].run(inputs)

        entry["parity"] = _parity(name, run_component, reference, progress)

        def generate(batch: int) -> np.ndarray:
            prompts = config.prompts(batch)
            texts = [NEGATIVE_PROMPT] * batch + prompts if config.guided else prompts
            return runner.generate(
                reference.tokenizer.encode(texts),
                work.initial_noise(batch),
                config.steps,
                config.guidance,
                config.height,
                config.width,
                config.seed,
                progress=progress.step,
            )

        entry["latency"], images = _latency(name, generate, runner.log, work, progress)
    entry["memory"] = memory.read()
    entry["memory"]["note"] = (
        "shares the reference's weight tensors"
        if dtype == torch.float32
        else f"holds its own {precision} copy of the UNet and VAE weights"
    )
    if config.sampler in STOCHASTIC_SAMPLERS:
        entry["parity"]["images"] = {
            "not_comparable": f"{config.sampler} is stochastic and diffusers draws its step "
            "noise from torch's generator; use a deterministic sampler to compare images"
        }
    else:
        entry["parity"]["images"] = image_parity(images, reference.images)
    _free(runner, backend)
    return entry, images


# Our sampler names -> stable-diffusion.cpp's (sample_method, scheduler).
SDCPP_SAMPLERS = {
    "dpmpp_2m_karras": ("dpm++2m", "karras"),
    "dpmpp_2m": ("dpm++2m", "discrete"),
    "euler": ("euler", "discrete"),
    "euler_a": ("euler_a", "discrete"),
}
SDCPP_MISSING = (
    "stable-diffusion-cpp-python is not installed (pip install stable-diffusion-cpp-python "
    "builds stable-diffusion.cpp from source)"
)


def measure_sdcpp(
    work: Workload, reference: Reference, progress: Progress
) -> tuple[dict[str, Any], np.ndarray | None]:
    """stable-diffusion.cpp (f32 weights, its own CPU build) on the reference's weights saved
    as an ldm checkpoint: end-to-end time only (it exposes no per-component timing), and
    its images are not comparable (it draws its own noise)."""
    import tempfile

    config = work.config
    entry: dict[str, Any] = {"name": SDCPP_BACKEND}
    if importlib.util.find_spec("stable_diffusion_cpp") is None:
        return skipped(entry, SDCPP_MISSING, work, progress), None
    if config.sampler not in SDCPP_SAMPLERS:
        why = f"no stable-diffusion.cpp sampler for {config.sampler}"
        return skipped(entry, f"{why} (known: {', '.join(SDCPP_SAMPLERS)})", work, progress), None
    if reference.models is None:
        return skipped(entry, "the reference weights are already freed", work, progress), None
    from stable_diffusion_cpp import StableDiffusion

    from sd_deploy.models.checkpoints import save_checkpoint

    def failed(exc: Exception) -> tuple[dict[str, Any], None]:
        progress.drop(work.steps_per_backend())
        entry.update(status="failed", reason=f"stable-diffusion.cpp: {first_line(exc)}")
        return entry, None

    method, schedule = SDCPP_SAMPLERS[config.sampler]
    progress.phase(f"{SDCPP_BACKEND}: loading")
    with tempfile.TemporaryDirectory() as tmp, MemoryWatch() as memory:
        path = save_checkpoint(reference.models, Path(tmp) / "model.safetensors")
        with Stopwatch(synchronize=False) as load:
            try:
                sd = StableDiffusion(
                    model_path=str(path), n_threads=config.threads or -1, wtype="f32", verbose=False
                )
            except Exception as exc:  # its own errors, e.g. an architecture it does not know
                return failed(exc)
        entry.update(
            status="ok",
            describe="stable-diffusion.cpp (stable-diffusion-cpp-python, CPU, f32)",
            precision="fp32",
            load_s=load.seconds,
            load_means="read the reference's weights saved as an ldm .safetensors checkpoint",
        )

        def generate(batch: int) -> np.ndarray:
            images = sd.generate_image(
                prompt=config.prompts(1)[0],
                negative_prompt=NEGATIVE_PROMPT if config.guided else "",
                width=config.width,
                height=config.height,
                cfg_scale=config.guidance,
                sample_method=method,
                scheduler=schedule,
                sample_steps=config.steps,
                seed=config.seed,
                batch_count=batch,
            )
            for _ in range(config.steps):
                progress.step()
            return np.stack([np.asarray(image.convert("RGB")) for image in images])

        try:
            entry["latency"], _ = _latency(SDCPP_BACKEND, generate, CallLog(), work, progress)
        except Exception as exc:  # e.g. a NULL image array: a model it loads but cannot run
            keep_unfreed(sd)
            return failed(exc)
    entry["memory"] = memory.read()
    entry["parity"] = {
        "components": {},
        "images": {"not_comparable": "stable-diffusion.cpp draws its own initial noise"},
    }
    return entry, None


# stable-diffusion.cpp contexts whose generation failed: never freed (see keep_unfreed).
_UNFREED: list[Any] = []


def keep_unfreed(sd: Any) -> None:
    """Keep a stable-diffusion.cpp context whose generation failed from ever being freed:
    stable-diffusion-cpp-python 0.4.7 segfaults freeing one (measured: on the tiny preset,
    the crash came at the next garbage collection, in whatever test ran then). Its exit
    stacks are swapped for empty ones, so neither its close() nor its __del__ frees the
    context; the process's exit returns the memory."""
    for owner in (sd, getattr(sd, "_model", None)):
        for name in ("_stack", "_exit_stack"):
            if isinstance(getattr(owner, name, None), contextlib.ExitStack):
                setattr(owner, name, contextlib.ExitStack())
    _UNFREED.append(sd)


def _parity(
    name: str,
    run: Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]],
    reference: Reference,
    progress: Progress,
) -> dict[str, Any]:
    progress.phase(f"{name}: parity")
    return {"components": component_parity(run, reference.captured.samples())}


def _latency(
    name: str, generate: Generate, log: CallLog, work: Workload, progress: Progress
) -> tuple[dict[str, Any], np.ndarray]:
    latency: dict[str, Any] = {}
    first_images = np.zeros(0, np.uint8)
    for batch in work.config.batches:
        progress.phase(f"{name}: batch {batch}")
        latency[str(batch)], images = measure_series(generate, log, batch, work.config)
        if batch == work.config.batches[0]:
            first_images = images
    return latency, first_images


def skipped(entry: dict[str, Any], reason: str, work: Workload, progress: Progress) -> dict:
    progress.drop(work.steps_per_backend())
    entry.update(status="skipped", reason=reason)
    return entry


def ratios(backends: dict[str, dict[str, Any]], batches: tuple[int, ...]) -> dict[str, Any]:
    """Speed-ups (baseline median / backend median; > 1 is faster) against torch and diffusers."""
    result: dict[str, Any] = {}
    for baseline in (REFERENCE_BACKEND, *DIFFUSERS_BACKENDS):
        base = backends.get(baseline)
        if base is None or base.get("status") != "ok":
            continue
        for name, entry in backends.items():
            if entry.get("status") != "ok" or name == baseline:
                continue
            per_batch: dict[str, Any] = {}
            for batch in map(str, batches):
                ours, theirs = entry["latency"][batch], base["latency"][batch]
                figures = {
                    "end_to_end": _ratio(theirs["end_to_end"], ours["end_to_end"]),
                    # Best run against best run: the least disturbed by other work.
                    "end_to_end_best": _ratio(theirs["end_to_end"], ours["end_to_end"], "min"),
                }
                for component in COMPONENTS:
                    if component in ours["components"] and component in theirs["components"]:
                        figures[component] = _ratio(
                            theirs["components"][component], ours["components"][component]
                        )
                per_batch[batch] = figures
            load = base["load_s"] / entry["load_s"] if entry.get("load_s") else None
            result.setdefault(f"vs_{baseline}", {})[name] = {"latency": per_batch, "load": load}
    return result


def _ratio(baseline: dict[str, Any], ours: dict[str, Any], key: str = "median") -> float | None:
    if not ours.get(key) or not baseline.get(key):
        return None
    return float(baseline[key] / ours[key])


def run_benchmark(
    engine_dir: str | Path,
    backends: str | tuple[str, ...] = "torch,onnxruntime,tensorrt,diffusers",
    steps: int | None = None,
    batches: str | tuple[int, ...] = (1,),
    size: str | tuple[int, int] | None = None,
    sampler: str | None = None,
    runs: int = 3,
    warmup: int = 1,
    report_dir: str | Path = "bench-report",
    model_source: str | None = None,
    guidance: float | None = None,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure PyTorch and each backend on the same work; write report.json/.md and plots.

    Returns the report (what report.json holds). User errors (bad options, engine dir
    problems, an unwritable report folder) are raised as `UserError` before any work.
    """
    from sd_deploy.benchmarks.report import write_report

    config, manifest = resolve_config(
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
        report_dir=report_dir,
        model_source=model_source,
        threads=threads,
    )
    reference_source(manifest, config.engine_dir, config.model_source)  # fail before any work
    work = Workload(config, manifest)
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "machine": machine_info(),
        "versions": versions(),
        "config": config.to_json(),
        "engine": engine_summary(manifest),
        "backends": {},
    }
    total = work.steps_per_backend() * len(config.backends) + config.steps
    images: dict[str, np.ndarray] = {}
    with Progress(progress, total) as bar, torch_threads(config.threads) as used:
        report["machine"]["torch_threads"] = used

        def record(name: str, measured: tuple[dict[str, Any], np.ndarray | None], start: Any):
            entry, got = measured
            # Other work on the machine during this backend's phase (1-minute average).
            entry["load_average"] = {"start": start, "end": load_average()}
            report["backends"][name] = entry
            if got is not None:
                images[name] = got

        start = load_average()
        entry, reference = measure_reference(work, bar)
        record(REFERENCE_BACKEND, (entry, reference.images), start)
        for name in DIFFUSERS_BACKENDS:
            if name in config.backends:
                start = load_average()
                record(name, measure_diffusers(work, reference, bar, name), start)
        if SDCPP_BACKEND in config.backends:
            start = load_average()
            record(SDCPP_BACKEND, measure_sdcpp(work, reference, bar), start)
        reference.models = None  # the engine backends need only the recorded outputs
        gc.collect()
        for name in config.backends:
            if name in (REFERENCE_BACKEND, *DIFFUSERS_BACKENDS, SDCPP_BACKEND):
                continue
            start = load_average()
            record(name, measure_engine_backend(name, work, reference, bar), start)
    report["ratios"] = ratios(report["backends"], config.batches)
    report["machine"]["load_average_end"] = load_average()
    write_report(report, images, config.report_dir)
    return report


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """PyTorch's intra-op threads set to `threads` (if given) for the run, then restored."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def engine_summary(manifest: Manifest) -> dict[str, Any]:
    return {
        "family": manifest.model.family,
        "prediction_type": manifest.model.prediction_type,
        "source": manifest.provenance.get("source"),
        "components": {
            name: {
                "precision": spec.precision,
                "export_validation_rel_l2": spec.validation.get("max_rel_l2"),
                "shape_ranges": spec.shape_ranges.to_json(),
            }
            for name, spec in manifest.components.items()
        },
    }
