"""One first run-time LoRA switch in a fresh process, for comparing two checkouts.

    for i in 1 2 3; do for tree in /tmp/old /work/main; do
      PYTHONPATH=$tree python tools/first_lora_switch.py --work /tmp/lora-measure --label $tree
    done; done

On the `--work` dir of tools/measure_lora_switch.py (base/ exported with --lora-ready,
style.safetensors): loads the base pipeline on ONNX Runtime CPU, draws a 1-step image
(base sessions and graph cache loaded), times the switch (select + the patched
text_encoder and unet sessions), then a first and two more 3-step LoRA images and one
base image. Prints one JSON line with the peak RSS before and after.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def peak_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return round(time.perf_counter() - start, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    from sd_deploy.engine_dir.lora import LoraSpec
    from sd_deploy.runtime import GenerationRequest, Pipeline

    lora = args.work / "style.safetensors"
    pipe = Pipeline(args.work / "base", backend="onnxruntime-cpu")
    plain = {"prompt": "a cat", "seed": 1, "width": 256, "height": 256}
    pipe.generate(GenerationRequest(**plain, steps=1))
    before = peak_gib()

    def switch() -> None:
        pipe.lora.select([LoraSpec(lora, 1.0)])
        pipe._session("text_encoder")  # noqa: SLF001 - the switch itself, without sampling
        pipe._session("unet")  # noqa: SLF001

    switch_s = timed(switch)
    styled = GenerationRequest(**plain, steps=3, loras=[(lora, 1.0)])
    images = [timed(lambda: pipe.generate(styled)) for _ in range(3)]
    base_s = timed(lambda: pipe.generate(GenerationRequest(**plain, steps=3)))
    report = {
        "label": args.label,
        "switch_s": switch_s,
        "lora_3step_image_s": images,
        "base_3step_image_s": base_s,
        "peak_rss_before_gib": before,
        "peak_rss_gib": peak_gib(),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
