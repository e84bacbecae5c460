"""Where an OpenVINO component's time goes: per-op-type totals of its CPU profile.

    python tools/ov_profile.py GRAPH [--size 256] [--precision bf16] [--calls 4] [--top 0]

GRAPH is a component's model.onnx or model.xml (unet: batch 2, the cond + uncond call of
one sampling step; vae_decoder: batch 1), compiled as the runtime compiles it (LATENCY
hint, 2 threads) with PERF_COUNT on. Prints each call's time, then the last call's
profile summed by (op type, kernel): seconds, share and node count, then the --top slowest
nodes. Why: to see how much of a step is matrix work (Convolution, FullyConnected, the
attention Subgraphs) and how much is layout and elementwise overhead around it.
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np


def feeds(compiled, size: int) -> dict:
    """Inputs by name for the graph's own inputs: a UNet's or a VAE decoder's."""
    rng = np.random.default_rng(0)
    latent = size // 8
    out = {}
    for port in compiled.inputs:
        names = port.get_names()
        if "sample" in names:
            out[port] = rng.standard_normal((2, 4, latent, latent), np.float32)
        elif "timestep" in names:
            out[port] = np.full((2,), 500, np.float32)
        elif "encoder_hidden_states" in names:
            width = port.get_partial_shape()[2].get_length()
            out[port] = rng.standard_normal((2, 77, width), np.float32)
        elif "latent" in names:
            out[port] = rng.standard_normal((1, 4, latent, latent), np.float32)
        else:
            raise SystemExit(f"no input made for {sorted(names)}: a UNet or VAE decoder graph?")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("graph")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "f32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=4, help="the last one is profiled")
    parser.add_argument("--top", type=int, default=0, help="also list the N slowest nodes")
    args = parser.parse_args()
    import openvino as ov

    config = {
        "INFERENCE_PRECISION_HINT": args.precision,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": args.threads,
        "PERF_COUNT": True,
    }
    start = time.perf_counter()
    compiled = ov.Core().compile_model(args.graph, "CPU", config)
    print(f"compile {time.perf_counter() - start:.1f} s")
    request, inputs = compiled.create_infer_request(), feeds(compiled, args.size)
    for _ in range(args.calls):
        start = time.perf_counter()
        request.infer(inputs)
        print(f"call {time.perf_counter() - start:.3f} s")
    executed = [p for p in request.profiling_info if p.status == p.Status.EXECUTED]
    seconds: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for p in executed:
        seconds[(p.node_type, p.exec_type)] += p.real_time.total_seconds()
        count[(p.node_type, p.exec_type)] += 1
    total = sum(seconds.values())
    print(f"profiled total {total:.3f} s")
    for (node_type, kernel), value in seconds.most_common():
        if value >= 0.001 * total:
            nodes = count[(node_type, kernel)]
            print(f"{value:8.4f} s {value / total:6.1%} {nodes:4d}  {node_type} {kernel}")
    for p in sorted(executed, key=lambda p: -p.real_time.total_seconds())[: args.top]:
        ms = p.real_time.total_seconds() * 1e3
        print(f"{ms:8.2f} ms  {p.node_type} {p.exec_type}  {p.node_name}")


if __name__ == "__main__":
    main()
