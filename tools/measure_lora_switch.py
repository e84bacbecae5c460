"""Run-time LoRA switching vs re-exporting, on the full-size SD 1.5 architecture.

    python tools/measure_lora_switch.py --work /tmp/lora-measure [--rank 32]

1. A rank-32 LoRA (kohya format, alpha = rank) over every Linear and Conv2d of the UNet
   (every attention projection, feed-forward, resnet / sampler / skip conv, time
   embedding) and every text-encoder linear, seeded, from the module shapes only.
2. `sd-export --model sd15 --random-weights` at 256 px (batch 1), twice, timed as
   processes: the base with --lora-ready, and with the LoRA merged (--lora FILE) -- the
   re-export a LoRA change costs without run-time switching.
3. On the base engine dir with ONNX Runtime CPU: load the base sessions (graph cache
   warm), then time a switch to the LoRA (read + match + patch in numpy + new unet and
   text_encoder sessions), a switch back (base sessions, kept), and a switch to the cached
   set again; resident memory before and after (the extra cost of one kept LoRA set);
   and one 2-step 256 px image each way against the merged export (PSNR).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def write_lora_file(path: Path, rank: int, preset: str) -> dict:
    """The LoRA from meta-device modules (shapes only, no 4 GB of weights)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))
    from lora_files import write_lora

    from sd_deploy.models import LoadedModels, get_preset
    from sd_deploy.models.text_encoder import TextEncoder
    from sd_deploy.models.unet import UNetModel
    from sd_deploy.models.vae import AutoencoderKL

    config = get_preset(preset)
    with torch.device("meta"):
        models = LoadedModels(
            UNetModel(config.unet), AutoencoderKL(config.vae), TextEncoder(config.text_encoder),
            config, "meta",
        )  # fmt: skip
    write_lora(path, models, "kohya", rank=rank, alpha=float(rank), every=True, magnitude=0.02)
    from sd_deploy.engine_dir.lora import read_lora

    lora = read_lora(path)
    return {
        "file_mb": round(path.stat().st_size / 2**20, 1),
        "layers": len(lora.layers),
        "unet_layers": sum(1 for x in lora.layers if x.component == "unet"),
        "conv_layers": sum(1 for x in lora.layers if x.down.ndim == 4),
    }


def timed_export(out: Path, preset: str, size: int, *extra: str) -> float:
    # this interpreter's sd_deploy (PYTHONPATH honoured), not whichever the console script finds
    cmd = [
        sys.executable, "-c", "from sd_deploy.cli import export_command; export_command()",
        "--model", preset, "--random-weights", "--height", str(size), "--width",
        str(size), "--batch", "1", "--out", str(out), *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--preset", default="sd15", help="tiny for a quick check")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    lora_path = work / "style.safetensors"
    report: dict = {
        "preset": args.preset,
        "size": args.size,
        "rank": args.rank,
        "lora": write_lora_file(lora_path, args.rank, args.preset),
    }

    base, merged = work / "base", work / "merged"
    if not (base / "manifest.json").is_file():
        report["export_lora_ready_s"] = round(
            timed_export(base, args.preset, args.size, "--lora-ready"), 1
        )
    if not (merged / "manifest.json").is_file():
        report["reexport_merged_s"] = round(
            timed_export(merged, args.preset, args.size, "--lora", f"{lora_path}:1"), 1
        )

    from sd_deploy.engine_dir.lora import LoraSpec
    from sd_deploy.runtime import BackendOptions, GenerationRequest, Pipeline

    options = BackendOptions(threads=args.threads)
    size = args.size
    request = GenerationRequest(prompt="a photo of a cat", seed=1, steps=2, width=size, height=size)
    pipe = Pipeline(base, backend="onnxruntime-cpu", options=options)
    pipe.generate(request)  # base sessions loaded (and the graph cache written) once
    start = time.perf_counter()
    pipe.generate(request)
    one_image = time.perf_counter() - start
    base_images = pipe.generate(request).images
    before = rss_gib()

    specs = [LoraSpec(lora_path, 1.0)]
    start = time.perf_counter()
    pipe.lora.select(specs)
    read_s = time.perf_counter() - start
    pipe._session("text_encoder")  # noqa: SLF001 - the switch itself, without sampling
    pipe._session("unet")  # noqa: SLF001
    switch_s = time.perf_counter() - start
    after = rss_gib()
    switched = pipe.lora.cache.get(pipe.lora.key, dict)
    patched = {name: switched[name] for name in ("unet", "text_encoder")}
    patched_bytes = sum(
        a.nbytes for s in patched.values() if s.keep_alive for a in s.keep_alive[0].values()
    )
    styled = pipe.generate(GenerationRequest(**{**vars(request), "loras": [(lora_path, 1.0)]}))

    start = time.perf_counter()
    back = pipe.generate(request).images
    back_s = time.perf_counter() - start - one_image
    start = time.perf_counter()
    pipe.generate(GenerationRequest(**{**vars(request), "loras": [(lora_path, 1.0)]}))
    cached_s = time.perf_counter() - start - one_image
    pipe.close()

    with Pipeline(merged, backend="onnxruntime-cpu", options=options) as other:
        want = other.generate(request).images
    from sd_deploy.metrics import psnr

    report.update(
        {
            "machine_cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "one_2step_image_s": round(one_image, 2),
            "switch_s": round(switch_s, 2),
            "switch_read_match_s": round(read_s, 2),
            "switch_patch_numpy_s": round(sum(s.timings["patch_s"] for s in patched.values()), 2),
            "switch_sessions_s": round(sum(s.timings["session_s"] for s in patched.values()), 2),
            "from_graph_cache": {name: s.from_graph_cache for name, s in patched.items()},
            "switch_back_to_base_s": round(max(back_s, 0.0), 2),
            "switch_to_cached_set_s": round(max(cached_s, 0.0), 2),
            "rss_before_gib": round(before, 2),
            "rss_after_gib": round(after, 2),
            "extra_rss_per_lora_set_gib": round(after - before, 2),
            "patched_initializers_kept_gib": round(patched_bytes / 2**30, 2),
            "psnr_switched_vs_merged_db": round(psnr(styled.images / 255.0, want / 255.0), 2),
            "base_back_bit_exact": bool(np.array_equal(back, base_images)),
        }
    )
    if "reexport_merged_s" in report:
        report["switch_over_reexport"] = round(switch_s / report["reexport_merged_s"], 4)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
