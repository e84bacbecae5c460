"""One UNet graph on OpenVINO's CPU plugin in one of its cache modes: compile or import,
then two 256 px batch-2 calls; run it under tools/peak_rss.py for its memory.

    python tools/peak_rss.py -- python tools/ov_unet_memory.py \\
        /work/sd15-engines/unet/int8/model.xml --cache /tmp/ov-cache [--weightless]

Prints the compile (or import) time, whether the compiled model came from the cache, the
two calls' times, and the process's anonymous RSS after each (what the plugin allocated
when). Run twice with the same --cache: the first fills it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from sd_deploy.benchmarks.timing import status_kib


def anon_gib() -> float:
    """This process's anonymous resident memory, GiB."""
    return (status_kib("RssAnon") or 0) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("graph", help="model.xml or model.onnx of a UNet")
    parser.add_argument("--cache", default=None, help="CACHE_DIR; none: compile every time")
    parser.add_argument("--weightless", action="store_true", help="ENABLE_WEIGHTLESS cache")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "f32"])
    args = parser.parse_args()
    import openvino as ov

    config: dict = {
        "INFERENCE_PRECISION_HINT": args.precision,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": 2,
    }
    if args.cache:
        config["CACHE_DIR"] = args.cache
    if args.weightless:
        config["ENABLE_WEIGHTLESS"] = True
    start = time.perf_counter()
    compiled = ov.Core().compile_model(args.graph, "CPU", config)
    loaded = time.perf_counter() - start
    anon = [round(anon_gib(), 2)]
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((2, 4, 32, 32)).astype(np.float32),
        "timestep": np.full((2,), 500, np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 768)).astype(np.float32),
    }
    request = compiled.create_infer_request()
    calls = []
    for _ in range(2):
        start = time.perf_counter()
        request.infer(feeds)
        calls.append(round(time.perf_counter() - start, 2))
        anon.append(round(anon_gib(), 2))
    cached = compiled.get_property("LOADED_FROM_CACHE")
    print(
        f"compile/import {loaded:.2f} s, from cache {cached}, calls {calls} s, "
        f"anonymous RSS after each {anon} GiB"
    )


if __name__ == "__main__":
    main()
