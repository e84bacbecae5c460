"""Peak RSS and time of generations: sd-run on ONNX Runtime vs diffusers, each in its own process.

    python tools/measure_run_memory.py ENGINE_DIR [--size 256] [--steps 10] [--threads 1]
                                       [--rounds 1 | --interleave N] [--sides A,B]

The engine dir must come from seeded random weights (provenance "preset:NAME:random-seed-S"):
the same weights are saved once as a diffusers folder (--diffusers-dir, unmeasured), which
the diffusers side loads with from_pretrained. Then five processes, one after the other,
the same request in each (seed 0, dpmpp_2m_karras, guidance 7.5):

  sd-run                   the `sd-run` command as a user types it (one generation)
  sd-run --no-graph-cache  the same, ONNX Runtime optimizing every graph at load
  diffusers x1             StableDiffusionPipeline.from_pretrained, then called once
  Pipeline kept loaded x2  the library as a service uses it: loaded once, called twice
  diffusers x2             the same for diffusers

--interleave N instead loads both pipelines in one process and alternates N whole
generations of each (after one warm-up each): steady against a drifting machine, though
diffusers ran its fastest only when alone in a process.

Peak RSS is each process's own ru_maxrss (from wait4, so children never mix). sd-run
frees each component when done with it; a service keeps them loaded, so the x2 rows
are the fair comparison for that use. Times are seconds of wall clock.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PIPELINE = """
import json, numpy as np
from sd_deploy.runtime.pipeline import GenerationRequest, Pipeline
pipe = Pipeline({engine!r}, backend="onnxruntime-cpu", threads={threads})
runs = []
for _ in range(2):
    r = pipe.generate(GenerationRequest(prompt={prompt!r}, seed=0, steps={steps},
                      height={size}, width={size}, sampler="dpmpp_2m_karras", guidance=7.5))
    runs.append(r.timings)
print(json.dumps({{"load_seconds": runs[0]["load"],
    "generate_seconds": [t["total"] for t in runs],
    "outside_backend_share": runs[-1]["outside_backend"] / runs[-1]["total"]}}))
"""

# Once, unmeasured: the same seeded weights as a diffusers folder, so the diffusers side
# loads from disk with from_pretrained as its users do (sd-run reads its graphs from disk).
SAVE_DIFFUSERS = """
import pathlib, tempfile
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer
from sd_deploy.benchmarks.diffusers_backend import convert_to_diffusers, make_diffusers_scheduler
from sd_deploy.models import build_random, get_preset
from sd_deploy.engine_dir.manifest import read_manifest
from sd_deploy.runtime.tokenizer import write_clip_tokenizer_files
manifest = read_manifest({engine!r})
_, family, seed = manifest.provenance["source"].split(":")
models = build_random(get_preset(family), seed=int(seed.removeprefix("random-seed-")))
unet, vae = convert_to_diffusers(models)
tok_dir = pathlib.Path(tempfile.mkdtemp())
write_clip_tokenizer_files(tok_dir)
pipe = StableDiffusionPipeline(vae=vae, text_encoder=models.text_encoder.model,
    tokenizer=CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True, model_max_length=77),
    unet=unet,
    scheduler=make_diffusers_scheduler("dpmpp_2m_karras", manifest.scheduler),
    safety_checker=None, feature_extractor=None, requires_safety_checker=False)
pipe.save_pretrained({folder!r})
"""

DIFFUSERS = """
import json, time
start = time.perf_counter()
import torch
torch.set_num_threads({threads})
from diffusers import StableDiffusionPipeline
imported = time.perf_counter()
pipe = StableDiffusionPipeline.from_pretrained({folder!r}, local_files_only=True)
load = time.perf_counter() - imported
runs = []
for _ in range({generations}):
    g = time.perf_counter()
    pipe({prompt!r}, num_inference_steps={steps}, height={size}, width={size},
         guidance_scale=7.5, generator=torch.Generator().manual_seed(0))
    runs.append(time.perf_counter() - g)
print(json.dumps({{"import_seconds": imported - start, "load_seconds": load,
    "generate_seconds": runs}}))
"""

# Both loaded in one process, whole generations alternated: steady against a machine whose
# speed drifts (peak RSS means nothing here).
INTERLEAVED = """
import json, statistics, time, torch
torch.set_num_threads({threads})
from diffusers import StableDiffusionPipeline
from sd_deploy.runtime.pipeline import GenerationRequest, Pipeline
ours = Pipeline({engine!r}, backend="onnxruntime-cpu", threads={threads})
theirs = StableDiffusionPipeline.from_pretrained({folder!r}, local_files_only=True)
request = GenerationRequest(prompt={prompt!r}, seed=0, steps={steps}, height={size},
                            width={size}, sampler="dpmpp_2m_karras", guidance=7.5)
def run_ours():
    ours.generate(request)
def run_theirs():
    theirs({prompt!r}, num_inference_steps={steps}, height={size}, width={size},
           guidance_scale=7.5, generator=torch.Generator().manual_seed(0))
run_ours(); run_theirs()  # warm-up: first calls pay one-off costs on both sides
times = {{"sd-deploy Pipeline": [], "diffusers": []}}
for i in range({generations}):
    pair = [("sd-deploy Pipeline", run_ours), ("diffusers", run_theirs)]
    for name, fn in (pair if i % 2 == 0 else pair[::-1]):
        start = time.perf_counter(); fn(); times[name].append(time.perf_counter() - start)
med = {{k: statistics.median(v) for k, v in times.items()}}
# Each round's two generations ran back to back, so their ratio sees the same machine.
per_round = [t / o for o, t in zip(times["sd-deploy Pipeline"], times["diffusers"])]
print(json.dumps({{"seconds": times, "median": med,
    "speedup_median": med["diffusers"] / med["sd-deploy Pipeline"],
    "speedup_best": min(times["diffusers"]) / min(times["sd-deploy Pipeline"]),
    "speedup_per_round": per_round, "speedup_per_round_median": statistics.median(per_round)}}))
"""

PROMPT = "a photo of a cat"


def run_measured(argv: list[str]) -> tuple[dict, float, float, str]:
    """Run argv; return (its last JSON line or {}, wall seconds, peak RSS GiB, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        print(stderr[-2000:], file=sys.stderr)
        raise SystemExit(proc.returncode)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    peak_gib = round(usage.ru_maxrss / 2**20, 3)  # Linux: KiB
    return (json.loads(lines[-1]) if lines else {}), wall, peak_gib, stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="repeat every side, interleaved")
    parser.add_argument(
        "--interleave",
        type=int,
        default=0,
        metavar="N",
        help="instead: both pipelines in one process, N generations each, alternated",
    )
    parser.add_argument(
        "--sides",
        default=None,
        help="comma-separated subset of the sides to run, e.g. 'sd-run,diffusers x1' [all]",
    )
    parser.add_argument("--diffusers-dir", default=None, help="[a folder in the temp dir]")
    args = parser.parse_args()
    folder = args.diffusers_dir or os.path.join(
        tempfile.gettempdir(), "sd-deploy-measure-" + Path(args.engine_dir).resolve().name
    )
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        print(f"saving the seeded weights as a diffusers folder in {folder}", file=sys.stderr)
        run_measured(
            [sys.executable, "-c", SAVE_DIFFUSERS.format(engine=args.engine_dir, folder=folder)]
        )
    fmt = dict(
        engine=args.engine_dir,
        size=args.size,
        steps=args.steps,
        threads=args.threads,
        prompt=PROMPT,
        folder=folder,
    )
    if args.interleave:
        script = INTERLEAVED.format(generations=args.interleave, **fmt)
        result, wall, _, _ = run_measured([sys.executable, "-c", script])
        print(json.dumps({"side": "interleaved", "wall_seconds": round(wall, 1), **result}))
        return
    out_dir = tempfile.mkdtemp(prefix="measure-run-")
    sd_run = [
        str(Path(sys.executable).parent / "sd-run"),
        "--engine", args.engine_dir, "--prompt", PROMPT, "--seed", "0",
        "--steps", str(args.steps), "--width", str(args.size), "--height", str(args.size),
        "--sampler", "dpmpp_2m_karras", "--guidance", "7.5", "--threads", str(args.threads),
        "--backend", "onnxruntime-cpu", "--quiet", "--out", out_dir,
    ]  # fmt: skip
    sides = {
        "sd-run": sd_run,
        "sd-run --no-graph-cache": [*sd_run, "--no-graph-cache"],
        "diffusers x1": [sys.executable, "-c", DIFFUSERS.format(generations=1, **fmt)],
        "Pipeline kept loaded x2": [sys.executable, "-c", PIPELINE.format(**fmt)],
        "diffusers x2": [sys.executable, "-c", DIFFUSERS.format(generations=2, **fmt)],
    }
    if args.sides:
        wanted = [side.strip() for side in args.sides.split(",")]
        unknown = [side for side in wanted if side not in sides]
        if unknown:
            parser.error(f"unknown side(s) {unknown}; choose from {list(sides)}")
        sides = {side: sides[side] for side in wanted}
    walls: dict[str, list[float]] = {side: [] for side in sides}
    for round_ in range(args.rounds):
        # Alternate the order: a machine that slows down over time hits every side alike.
        order = list(sides) if round_ % 2 == 0 else list(sides)[::-1]
        for side in order:
            result, wall, peak, stderr = run_measured(sides[side])
            if side.startswith("sd-run"):
                match = re.search(r"in ([\d.]+) s .*runtime overhead ([\d.]+) s", stderr)
                if match:
                    total, overhead = map(float, match.groups())
                    result = {
                        "generate_seconds": [total],
                        "outside_backend_share": overhead / total,
                    }
            walls[side].append(wall)
            line = {"round": round_, "side": side, "wall_seconds": round(wall, 1)}
            print(json.dumps({**line, "peak_rss_gib": peak, **result}), flush=True)
    medians = {side: round(statistics.median(w), 1) for side, w in walls.items()}
    print(json.dumps({"median_wall_seconds": medians}))


if __name__ == "__main__":
    main()
