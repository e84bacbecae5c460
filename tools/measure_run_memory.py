"""Peak RSS and time of generations: sd-run on ONNX Runtime vs diffusers, each in its own process.

    python tools/measure_run_memory.py ENGINE_DIR [--size 256] [--steps 10]

The engine dir must come from seeded random weights (provenance "preset:NAME:random-seed-S")
so the diffusers side can be built from the same preset. Each side runs in its own
interpreter with one intra-op thread, loads, then generates twice (the first run pays
one-off costs), and reports ru_maxrss (the whole process's peak), load and generation
seconds, and for sd-run the share of time spent outside backend calls.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SD_RUN = """
import json, resource, time, numpy as np
from sd_deploy.runtime.pipeline import GenerationRequest, Pipeline
from sd_deploy.runtime.backends.onnxruntime import OnnxRuntimeBackend
pipe = Pipeline({engine!r}, backend=OnnxRuntimeBackend("cpu", threads=1))
runs = []
for _ in range(2):
    r = pipe.generate(GenerationRequest(prompt="a photo of a cat", seed=0, steps={steps},
                      height={size}, width={size}, sampler="dpmpp_2m_karras", guidance=7.5))
    runs.append(r.timings)
print(json.dumps({{"side": "sd-run onnxruntime-cpu", "load_seconds": runs[0]["load"],
    "generate_seconds": [t["total"] for t in runs],
    "outside_backend_share": runs[-1]["outside_backend"] / runs[-1]["total"],
    "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
"""

DIFFUSERS = """
import json, resource, time, torch
torch.set_num_threads(1)
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer
from sd_deploy.benchmarks.diffusers_backend import convert_to_diffusers, make_diffusers_scheduler
from sd_deploy.models import build_random, get_preset
from sd_deploy.runtime.manifest import read_manifest
from sd_deploy.runtime.tokenizer import write_clip_tokenizer_files
import tempfile, pathlib
start = time.perf_counter()
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
del models.unet, models.vae
load = time.perf_counter() - start
runs = []
for _ in range(2):
    g = time.perf_counter()
    pipe("a photo of a cat", num_inference_steps={steps}, height={size}, width={size},
         guidance_scale=7.5, generator=torch.Generator().manual_seed(0))
    runs.append(time.perf_counter() - g)
print(json.dumps({{"side": "diffusers StableDiffusionPipeline", "load_seconds": load,
    "generate_seconds": runs,
    "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    env = {"OMP_NUM_THREADS": "1"}
    for code in (SD_RUN, DIFFUSERS):
        script = code.format(engine=args.engine_dir, size=args.size, steps=args.steps)
        out = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
        )
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            raise SystemExit(out.returncode)
        print(json.dumps(json.loads(out.stdout.strip().splitlines()[-1])))


if __name__ == "__main__":
    main()
