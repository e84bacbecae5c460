"""Peak memory of loading a full-size fp16 checkpoint into fp32 modules.

Makes a full-size single file with seeded random weights (fp16, SD 1.5 by default) in a
temporary folder, then loads it with `load_models(path)` in a fresh interpreter and
prints that process's peak RSS (`resource.getrusage(...).ru_maxrss`) next to the size of
the fp32 modules. Target: peak RSS <= about 1.5x the fp32 model size.

    python tools/measure_load_memory.py [--family sd15] [--format safetensors|ckpt]

Needs ~10 GB of free memory while making the file (the seeded fp32 model plus its fp16
copy) and ~2-4 GB of disk. Not a test: it takes a minute or two on a small machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def make(path: Path, family: str) -> None:
    import torch

    from sd_deploy.models import build_random, get_preset
    from sd_deploy.models.checkpoints import ldm_state_dict, save_checkpoint

    models = build_random(get_preset(family), seed=0)
    if path.suffix == ".safetensors":
        save_checkpoint(models, path, dtype=torch.float16)
    else:
        torch.save({"state_dict": ldm_state_dict(models, torch.float16)}, path)


def load(path: Path) -> None:
    import torch  # noqa: F401 - imported before the baseline is taken
    import transformers.models.clip.modeling_clip  # noqa: F401

    from sd_deploy.models import load_models

    baseline = _peak_rss_bytes()
    start = time.perf_counter()
    models = load_models(path)
    seconds = time.perf_counter() - start
    peak = _peak_rss_bytes()
    model_bytes = sum(
        t.numel() * t.element_size()
        for m in (models.unet, models.vae, models.text_encoder)
        for t in m.state_dict().values()
    )
    print(
        json.dumps(
            {
                "family": models.config.family,
                "file_bytes": path.stat().st_size,
                "fp32_model_bytes": model_bytes,
                "baseline_rss_bytes": baseline,
                "peak_rss_bytes": peak,
                "load_seconds": round(seconds, 1),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd15", help="preset to make (default sd15)")
    parser.add_argument("--format", choices=["safetensors", "ckpt"], default="safetensors")
    parser.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--load", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        return make(args.make, args.family)
    if args.load:
        return load(args.load)

    gib = 1024**3
    with tempfile.TemporaryDirectory(prefix="sd-deploy-mem-") as tmp:
        path = Path(tmp) / f"{args.family}-fp16.{args.format}"
        print(f"making {path.name} (seeded random weights, fp16) ...", flush=True)
        script = [sys.executable, __file__, "--family", args.family]
        subprocess.run([*script, "--make", str(path)], check=True)
        print("loading it with load_models() in a fresh process ...", flush=True)
        result = subprocess.run(
            [*script, "--load", str(path)], check=True, capture_output=True, text=True
        )
        report = json.loads(result.stdout.strip().splitlines()[-1])
    model = report["fp32_model_bytes"]
    peak = report["peak_rss_bytes"]
    rows = [
        (f"file ({args.format}, fp16)", f"{report['file_bytes'] / gib:6.2f} GiB"),
        ("fp32 modules", f"{model / gib:6.2f} GiB"),
        ("RSS after imports", f"{report['baseline_rss_bytes'] / gib:6.2f} GiB"),
        ("peak RSS of the load", f"{peak / gib:6.2f} GiB ({peak / model:.2f}x the fp32 model)"),
        ("load time (incl. sha256)", f"{report['load_seconds']:6.1f} s"),
        ("target <= 1.5x", "met" if peak <= 1.5 * model else "NOT met"),
    ]
    for label, value in rows:
        print(f"{label + ':':<28}{value}")


if __name__ == "__main__":
    main()
