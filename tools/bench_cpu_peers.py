"""The CPU peers side by side: ours on ONNX Runtime fp32 and OpenVINO bf16, diffusers fp32
and bf16; one command, interleaved rounds, a table with spread.

    python tools/bench_cpu_peers.py ENGINE_DIR [--size 256] [--steps 10] [--threads 2]
        [--rounds 3] [--generations 2] [--candidates ort-fp32,openvino-bf16,...]
        [--json OUT.json]

The engine dir must come from seeded random weights (`sd-export --model sd15
--random-weights`, provenance "preset:NAME:random-seed-S"): the same weights are saved
once as a diffusers folder (--diffusers-dir, unmeasured) for the diffusers candidates.

Every candidate runs in a process of its own (diffusers ran its fastest only when alone in
a process), loads, makes one warm-up generation, then --generations timed ones. A round
runs every candidate once; the order turns each round, so a machine that drifts hits every
candidate alike. Every generation is fed the same initial noise, prompt and sampler
(dpmpp_2m_karras, guidance 7.5, seed 0), so each candidate's image is compared (PSNR)
with ours on ONNX Runtime fp32, the reference pipeline.

Candidates: ort-fp32 (our runtime, ONNX Runtime CPU), openvino-bf16 / openvino-fp32 /
openvino-bf16-static (our runtime on OpenVINO; static: shapes fixed per request),
openvino-int8 (the UNet's int8-weight graph from `sd-quantize`, bf16 compute),
diffusers-fp32, diffusers-bf16 (StableDiffusionPipeline, torch_dtype bfloat16).

Reported per candidate: end-to-end seconds per generation (median, min-max over every
timed generation of every round), UNet seconds per step (one call: cond + uncond batched),
load seconds (first round), peak RSS of its process, the runtime's own share outside
backend calls (ours), PSNR vs ort-fp32, speed-ups over ort-fp32 and diffusers-bf16, and the
UNet's achieved TFLOPS against this CPU's bf16 matrix rate (the faster of PyTorch's and
OpenVINO's 4096^3 bf16 matmul, median of 9, same threads, measured every round; the UNet's
work counted over its convolutions and matmuls), and the TFLOPS each speed target of issue
18 would need.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CANDIDATES = (
    "ort-fp32",
    "openvino-bf16",
    "openvino-fp32",
    "openvino-bf16-static",
    "openvino-int8",
    "diffusers-fp32",
    "diffusers-bf16",
)
DEFAULT_CANDIDATES = "ort-fp32,openvino-bf16,diffusers-fp32,diffusers-bf16"
PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 8k"
NEGATIVE = "blurry, low quality, watermark, text"

# One candidate in its own process: load, warm up, time; images saved for PSNR.
OURS = """
import json, resource, time
import numpy as np
from sd_deploy.runtime.pipeline import GenerationRequest, Pipeline
kind, precision, static = {kind!r}, {precision!r}, {static!r}
start = time.perf_counter()
if kind == "openvino":
    from sd_deploy.runtime.backends.openvino import OpenVinoBackend
    backend = OpenVinoBackend(precision, threads={threads}, static_shapes=static)
else:
    from sd_deploy.runtime.backends.onnxruntime import OnnxRuntimeBackend
    backend = OnnxRuntimeBackend("cpu", threads={threads})
pipe = Pipeline({engine!r}, backend=backend)
load = time.perf_counter() - start  # + the components' loads inside the warm-up
noise = np.load({noise!r})
request = GenerationRequest(prompt={prompt!r}, negative_prompt={negative!r}, seed=0,
    steps={steps}, height={size}, width={size}, sampler="dpmpp_2m_karras", guidance=7.5)
runs = []
for i in range({generations} + 1):
    result = pipe.generate_from_noise(request, noise)
    if not i:
        load += result.timings.get("load", 0.0)
    if i:  # the first is the warm-up
        t = result.timings
        runs.append({{"total": t["total"], "unet_step": t["unet"] / {steps},
            "outside_share": t["outside_backend"] / t["total"]}})
np.save({images!r}, result.images)
print(json.dumps({{"load": load, "runs": runs, "describe": backend.describe(),
    "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
"""

DIFFUSERS = """
import json, resource, time
import numpy as np, torch
torch.set_num_threads({threads})
from diffusers import StableDiffusionPipeline
dtype = torch.bfloat16 if {precision!r} == "bf16" else torch.float32
start = time.perf_counter()
pipe = StableDiffusionPipeline.from_pretrained({folder!r}, local_files_only=True,
                                               torch_dtype=dtype)
pipe.set_progress_bar_config(disable=True)
load = time.perf_counter() - start
latents = torch.from_numpy(np.load({noise!r})).to(dtype)
unet_seconds = []
def pre(module, args):
    unet_seconds.append(-time.perf_counter())
def post(module, args, output):
    unet_seconds[-1] += time.perf_counter()
pipe.unet.register_forward_pre_hook(pre)
pipe.unet.register_forward_hook(post)
runs = []
for i in range({generations} + 1):
    unet_seconds.clear()
    g = time.perf_counter()
    with torch.inference_mode():
        images = pipe({prompt!r}, negative_prompt={negative!r}, num_inference_steps={steps},
            height={size}, width={size}, guidance_scale=7.5, latents=latents,
            output_type="np").images
    total = time.perf_counter() - g
    if i:
        runs.append({{"total": total, "unet_step": sum(unet_seconds) / len(unet_seconds)}})
np.save({images!r}, (np.clip(images, 0, 1) * 255).round().astype(np.uint8))
print(json.dumps({{"load": load, "runs": runs, "describe": f"diffusers {{dtype}}",
    "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
"""

# Once, unmeasured: the engine dir's seeded weights as a diffusers folder.
SAVE_DIFFUSERS = """
import pathlib, tempfile
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer
from sd_deploy.benchmarks.diffusers_backend import convert_to_diffusers, make_diffusers_scheduler
from sd_deploy.engine_dir import read_manifest
from sd_deploy.models import build_random, get_preset
from sd_deploy.runtime.tokenizer import write_clip_tokenizer_files
manifest = read_manifest({engine!r})
_, family, seed = manifest.provenance["source"].split(":")
models = build_random(get_preset(family), seed=int(seed.removeprefix("random-seed-")))
unet, vae = convert_to_diffusers(models)
tok_dir = pathlib.Path(tempfile.mkdtemp())
write_clip_tokenizer_files(tok_dir)
pipe = StableDiffusionPipeline(vae=vae, text_encoder=models.text_encoder.model,
    tokenizer=CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True, model_max_length=77),
    unet=unet, scheduler=make_diffusers_scheduler("dpmpp_2m_karras", manifest.scheduler),
    safety_checker=None, feature_extractor=None, requires_safety_checker=False)
pipe.save_pretrained({folder!r})
"""


# This CPU's bf16 matrix rate: 4096^3 bf16 matmuls in PyTorch (oneDNN, AMX where the CPU
# has it) and in OpenVINO (bf16 hint), in a process of its own with the same threads; the
# median of 9 (what a sustained computation like a UNet step can expect) and the best (a
# burst). It runs once per round, in the round's turning order like a candidate, because on
# this VM it moved 2x between runs and even within one: a peak measured at another time, or
# the best of a few, says little about the seconds the candidates ran in.
PEAK = """
import json, statistics, time
import numpy as np
n = 4096
def rates(call):
    call()
    times = []
    for _ in range(9):
        t = time.perf_counter(); call(); times.append(time.perf_counter() - t)
    work = 2 * n**3 / 1e12
    return work / statistics.median(times), work / min(times)
import torch
torch.set_num_threads({threads})
a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
peaks = {{}}
peaks["torch"], peaks["torch_best"] = rates(lambda: torch.matmul(a, b))
try:
    import openvino as ov, openvino.opset13 as ops
except ImportError:
    pass
else:
    x = ops.parameter([n, n], np.float32)
    w = ops.constant(np.random.default_rng(0).standard_normal((n, n), np.float32))
    compiled = ov.Core().compile_model(ov.Model([ops.matmul(x, w, False, False)], [x]), "CPU",
        {{"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": {threads}}})
    request, feed = compiled.create_infer_request(), [np.ones((n, n), np.float32)]
    peaks["openvino"], peaks["openvino_best"] = rates(lambda: request.infer(feed))
print(json.dumps(peaks))
"""
PEAK_NAME = "bf16-matmul-peak"


def unet_tflop(engine: str, batch: int, size: int) -> float:
    """Multiply-add work of one UNet call (cond + uncond: batch 2) at `size` px, counted
    over the graph's convolutions and matmuls with OpenVINO's shape inference."""
    import numpy as np
    import openvino as ov

    model = ov.Core().read_model(os.path.join(engine, "unet", "model.onnx"))
    latent = size // 8
    model.reshape(
        {
            "sample": [batch, 4, latent, latent],
            "timestep": [batch],
            "encoder_hidden_states": [batch, 77, model.input("encoder_hidden_states")
                                      .get_partial_shape()[2].get_length()],
        }
    )  # fmt: skip
    total = 0
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind in ("Convolution", "GroupConvolution"):
            kernel = int(np.prod(op.input(1).get_shape()[-3:]))  # Cin/groups * kh * kw
            total += 2 * int(np.prod(op.get_output_shape(0))) * kernel
        elif kind == "MatMul":
            a = op.input(0).get_shape()
            inner = a[-2] if op.get_transpose_a() else a[-1]
            total += 2 * int(np.prod(op.get_output_shape(0))) * int(inner)
    return total / 1e12


def run_child(script: str) -> dict:
    """Run a child Python; its last JSON line, or exit with its stderr's tail."""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"a candidate failed (exit {proc.returncode})")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def child_script(candidate: str, fmt: dict) -> str:
    kind, _, rest = candidate.partition("-")
    precision, _, static = rest.partition("-")
    if kind == "diffusers":
        return DIFFUSERS.format(precision=precision, **fmt)
    return OURS.format(
        kind="openvino" if kind == "openvino" else "ort",
        precision=precision,
        static=static == "static",
        **fmt,
    )


def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--generations", type=int, default=2, help="timed ones per process")
    parser.add_argument("--candidates", default=DEFAULT_CANDIDATES, help=", ".join(CANDIDATES))
    parser.add_argument("--diffusers-dir", default=None, help="[a folder in the temp dir]")
    parser.add_argument("--json", default=None, help="also write every number here")
    parser.add_argument(
        "--no-peak", action="store_true", help="skip the bf16 matmul peak and UNet FLOP count"
    )
    args = parser.parse_args()
    import numpy as np

    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    unknown = [c for c in candidates if c not in CANDIDATES]
    if unknown:
        parser.error(f"unknown candidate(s) {unknown}; choose from {', '.join(CANDIDATES)}")
    engine = str(Path(args.engine_dir).resolve())
    work = Path(tempfile.mkdtemp(prefix="bench-cpu-peers-"))
    noise_path = work / "noise.npy"
    latent = args.size // 8
    noise = np.random.default_rng(0).standard_normal((1, 4, latent, latent), np.float32)
    np.save(noise_path, noise)
    folder = args.diffusers_dir or os.path.join(
        tempfile.gettempdir(), "sd-deploy-measure-" + Path(engine).name
    )
    if any(c.startswith("diffusers") for c in candidates) and not os.path.isfile(
        os.path.join(folder, "model_index.json")
    ):
        print(f"saving the seeded weights as a diffusers folder in {folder}", file=sys.stderr)
        run_child(SAVE_DIFFUSERS.format(engine=engine, folder=folder))
    env_threads = str(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", env_threads)
    results: dict[str, list[dict]] = {c: [] for c in candidates}
    started = time.time()
    peaks: list[dict] = []
    order = candidates + ([] if args.no_peak else [PEAK_NAME])
    for round_ in range(args.rounds):
        shift = round_ % len(order)
        for candidate in order[shift:] + order[:shift]:
            if candidate == PEAK_NAME:
                peaks.append(run_child(PEAK.format(threads=args.threads)))
                print(f"round {round_} {candidate:22s} {peaks[-1]}", file=sys.stderr, flush=True)
                continue
            images = work / f"{candidate}-{round_}.npy"
            fmt = dict(
                engine=engine,
                folder=folder,
                noise=str(noise_path),
                images=str(images),
                prompt=PROMPT,
                negative=NEGATIVE,
                steps=args.steps,
                size=args.size,
                threads=args.threads,
                generations=args.generations,
            )
            result = run_child(child_script(candidate, fmt))
            result["images"] = str(images)
            results[candidate].append(result)
            totals = " ".join(f"{r['total']:.2f}" for r in result["runs"])
            print(f"round {round_} {candidate:22s} e2e {totals} s", file=sys.stderr, flush=True)

    peak = work_tflop = None
    if peaks:
        # The faster library's median rate in each round; the median of those over the
        # rounds is what utilisation and the targets' demands are against.
        peak = statistics.median(max(v for k, v in p.items() if "_" not in k) for p in peaks)
        work_tflop = unet_tflop(engine, 2, args.size)
    reference = np.load(results["ort-fp32"][0]["images"]) if "ort-fp32" in results else None
    table = {}
    for candidate, rounds in results.items():
        runs = [r for result in rounds for r in result["runs"]]
        row = {
            "describe": rounds[0]["describe"],
            "e2e": [r["total"] for r in runs],
            "unet_step": [r["unet_step"] for r in runs],
            "load_first_round": rounds[0]["load"],
            "peak_rss_gib": max(r["peak_rss_gib"] for r in rounds),
        }
        if "outside_share" in runs[0]:
            row["outside_share_max"] = max(r["outside_share"] for r in runs)
        if reference is not None:
            row["psnr_vs_ort_fp32_db"] = psnr(np.load(rounds[0]["images"]), reference)
        if peak and work_tflop:
            step = statistics.median(row["unet_step"])
            row["unet_tflops"] = work_tflop / step
            row["unet_share_of_bf16_peak"] = work_tflop / step / peak
        table[candidate] = row
    med = {c: statistics.median(row["e2e"]) for c, row in table.items()}

    def ratio(base: str, c: str) -> str:
        return f"{med[base] / med[c]:.2f}x" if base in med else "-"

    print(
        f"\n{args.size}x{args.size}, {args.steps} steps dpmpp_2m_karras, guidance 7.5, "
        f"{args.threads} threads, {args.rounds} rounds x {args.generations} generations; "
        f"load average now {os.getloadavg()[0]:.2f}\n"
    )
    head = (
        "| candidate | e2e s median [min-max] | UNet step s median [min-max] | load s | "
        "peak RSS GiB | outside backend | PSNR vs ort-fp32 | UNet TFLOPS (% bf16 matmul) | "
        "vs ort-fp32 | vs diffusers-bf16 |"
    )
    print(head)
    print("|" + " --- |" * head.count(" | ") + " --- |")
    for c, row in table.items():
        outside = f"{row['outside_share_max']:.2%}" if "outside_share_max" in row else "-"
        quality = row.get("psnr_vs_ort_fp32_db")
        quality_text = "-" if quality is None else f"{quality:.1f} dB"
        use = "-"
        if "unet_tflops" in row:
            use = f"{row['unet_tflops']:.2f} ({row['unet_share_of_bf16_peak']:.0%})"
        print(
            f"| {c} | {spread(row['e2e'])} | {spread(row['unet_step'])} | "
            f"{row['load_first_round']:.1f} | {row['peak_rss_gib']:.2f} | {outside} | "
            f"{quality_text} | {use} | {ratio('ort-fp32', c)} | {ratio('diffusers-bf16', c)} |"
        )
    if peak and work_tflop:
        by_library = {k: [p[k] for p in peaks if k in p] for k in peaks[0]}
        measured = ", ".join(f"{k} {spread(v)}" for k, v in by_library.items())
        print(
            f"\nbf16 4096^3 matmul rate here, TFLOPS median [min-max] over {len(peaks)} rounds "
            f"of each round's median (_best: fastest) of 9 ({args.threads} threads): "
            f"{measured}; utilisation is against {peak:.2f}; "
            f"one UNet call (batch 2, {args.size} px): {work_tflop:.3f} TFLOP"
        )
        for base, factor in (("ort-fp32", 4), ("diffusers-bf16", 2)):
            if base in med:  # the bound: every second of the target given to the UNet
                need = work_tflop / (med[base] / factor / args.steps)
                print(
                    f"{factor}x {base} ({med[base] / factor:.2f} s end to end) needs the UNet at "
                    f">= {need:.2f} TFLOPS even with nothing else taking time: "
                    f"{need / peak:.0%} of the bf16 matmul rate"
                )
    for c, row in table.items():
        print(f"  {c}: {row['describe']}")
    if args.json:
        report = {
            "args": vars(args),
            "bf16_matmul_peak_tflops": peak,
            "bf16_matmul_peaks_per_round": peaks,
            "unet_call_tflop": work_tflop,
            "started_unix": started,
            "load_average_end": os.getloadavg(),
            "candidates": table,
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
