"""Load figure for the Triton serving path: images/s and p50/p90 latency at client
concurrency 1, 4 and 8 against a real tritonserver, next to sequential local generation
(Pipeline.generate, one image after another) in the same run on the same engine dir.

    python tools/measure_triton_load.py --stub-env DIR [--engine DIR] [--requests 16]
        [--rounds 3] [--steps N] [--json out.json]

Without --engine it exports the packaged default model (sd-export --out DIR) into a
temporary folder. Rounds interleave the configurations (local, c=1, c=4, c=8, then
again) so a noisy shared machine hits all of them alike; the table reports the median
over rounds and the min-max spread. The server and the local pipeline never exist at the
same time: each round runs the local pipeline in a child process (its own session, as
tritonserver has) and then starts the server, measures it and stops it (the order
alternating between rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def summary(latencies: list[float], wall: float, images: int) -> dict[str, float]:
    return {
        "images_per_s": images / wall,
        "p50_s": percentile(latencies, 50),
        "p90_s": percentile(latencies, 90),
        "wall_s": wall,
    }


def run_local(pipe, requests: int, steps: int | None) -> dict[str, float]:
    from sd_deploy.runtime import GenerationRequest

    latencies = []
    start = time.perf_counter()
    for i in range(requests):
        t = time.perf_counter()
        pipe.generate(GenerationRequest(prompt=f"load test {i}", seed=i, steps=steps))
        latencies.append(time.perf_counter() - t)
    return summary(latencies, time.perf_counter() - start, requests)


def run_clients(server, concurrency: int, requests: int, steps: int | None) -> dict[str, float]:
    """`concurrency` closed-loop clients share `requests` one-image requests."""
    from sd_deploy.serving.client import RemotePipeline

    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    errors: list[BaseException] = []

    def client() -> None:
        try:
            with RemotePipeline(server.http_url) as remote:
                remote.max_batch_size()
                while True:
                    with lock:
                        i = next(counter, None)
                    if i is None:
                        return
                    t = time.perf_counter()
                    remote.generate(prompt=f"load test {i}", seed=i, steps=steps)
                    with lock:
                        latencies.append(time.perf_counter() - t)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    before = server.statistics("sd")
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    after = server.statistics("sd", min_inferences=before["inference_count"] + requests)
    result = summary(latencies, wall, requests)
    executions = after["execution_count"] - before["execution_count"]
    result["executions"] = executions
    result["inferences"] = after["inference_count"] - before["inference_count"]
    # Time inside the model's execute, as Triton counts it per request (each request is
    # charged the whole execution it was batched into): the rest of a request's latency is
    # queueing plus HTTP and the stub's IPC.
    compute = after["inference_stats"]["compute_infer"]["ns"]
    compute -= before["inference_stats"]["compute_infer"]["ns"]
    queue = after["inference_stats"]["queue"]["ns"] - before["inference_stats"]["queue"]["ns"]
    result["compute_s_per_request"] = compute / 1e9 / requests
    result["queue_s_per_request"] = queue / 1e9 / requests
    result["mean_batch"] = requests / executions if executions else float("nan")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", type=Path, default=None)
    parser.add_argument("--stub-env", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=16, help="per configuration and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="[engine default]")
    parser.add_argument(
        "--max-batch", type=int, default=None, help="[the engine dir's batch range max]"
    )
    parser.add_argument("--backend", default="auto", help="runtime backend, both sides")
    parser.add_argument(
        "--threads", type=int, default=None, help="runtime CPU threads, both sides [backend's]"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--local-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from sd_deploy.runtime import BackendOptions, Pipeline

    if args.local_child:
        options = BackendOptions(threads=args.threads)
        with Pipeline(args.engine, backend=args.backend, options=options) as pipe:
            pipe.load_all()
            run_local(pipe, 2, args.steps)  # warm-up
            result = run_local(pipe, args.requests, args.steps)
            print(json.dumps({**result, "backend": pipe.backend_name}))
        return

    from sd_deploy.engine_dir import read_manifest
    from sd_deploy.serving import RepositoryConfig, write_model_repository
    from sd_deploy.serving.server import TritonServer

    work = Path(tempfile.mkdtemp(prefix="triton-load-"))
    engine = args.engine
    if engine is None:
        from sd_deploy.exporter import export_engine_dir
        from sd_deploy.models import load_models

        engine = work / "engines"
        export_engine_dir(load_models("default"), engine, progress=False)
    write_model_repository(
        engine,
        work / "repo",
        RepositoryConfig(
            max_batch=args.max_batch, kind="cpu", backend=args.backend, threads=args.threads
        ),
    )
    server = TritonServer(
        work / "repo",
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        stub_env=args.stub_env,
        log=work / "tritonserver.log",
    )
    configs = ["local", "c1", "c4", "c8"]
    rounds: dict[str, list[dict[str, float]]] = {c: [] for c in configs}
    load_before = os.getloadavg()
    backend_name = ""

    def local_side(r: int) -> None:
        # In a child process of its own session, as tritonserver is: with the kernel's
        # autogroup scheduling each session is a group with its own CPU share, and the two
        # sides should compete with the other tenants on the same terms.
        nonlocal backend_name
        command = [sys.executable, __file__, "--local-child", "--engine", str(engine)]
        command += ["--requests", str(args.requests), "--backend", args.backend]
        command += ["--steps", str(args.steps)] if args.steps else []
        command += ["--threads", str(args.threads)] if args.threads else []
        out = subprocess.run(
            command, capture_output=True, text=True, check=True, start_new_session=True
        ).stdout
        result = json.loads(out.strip().splitlines()[-1])
        backend_name = result.pop("backend")
        rounds["local"].append(result)
        print(f"round {r + 1} local " + json.dumps(result), flush=True)

    def server_side(r: int) -> None:
        with server:
            run_clients(server, 8, 16, args.steps)  # warm-up: first calls, every batch shape
            for config in configs[1:]:
                result = run_clients(server, int(config[1:]), args.requests, args.steps)
                rounds[config].append(result)
                print(f"round {r + 1} {config:5s} " + json.dumps(result), flush=True)

    # Each side alone (the other not even loaded: idle runtime threads would compete on
    # a small machine), their order alternating from round to round.
    for r in range(args.rounds):
        sides = (local_side, server_side) if r % 2 == 0 else (server_side, local_side)
        for side in sides:
            side(r)
    load_after = os.getloadavg()

    manifest = read_manifest(engine)
    steps = args.steps or manifest.scheduler.get("default_steps")
    report = {
        "engine": str(engine),
        "model": manifest.model.family,
        "size": f"{manifest.model.default_width}x{manifest.model.default_height}",
        "steps": steps,
        "requests_per_config": args.requests,
        "backend": backend_name,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "load_average_1_5_15_before": load_before,
        "load_average_1_5_15_after": load_after,
        "rounds": rounds,
    }
    lines = [
        "| configuration | images/s (median, min-max) | p50 latency s | p90 latency s | "
        f"executions per {args.requests} requests | server compute s per request |",
        "|---|---|---|---|---|---|",
    ]
    names = {
        "local": "local, sequential",
        "c1": "Triton, 1 client",
        "c4": "Triton, 4 clients",
        "c8": "Triton, 8 clients",
    }
    for config in configs:
        runs = rounds[config]
        ips = [x["images_per_s"] for x in runs]
        p50 = statistics.median(x["p50_s"] for x in runs)
        p90 = statistics.median(x["p90_s"] for x in runs)
        execs = [x.get("executions") for x in runs if "executions" in x]
        lines.append(
            f"| {names[config]} | {statistics.median(ips):.2f} ({min(ips):.2f}-{max(ips):.2f}) "
            f"| {p50:.3f} | {p90:.3f} | "
            + (f"{statistics.median(execs):.0f}" if execs else "-")
            + " | "
            + (
                f"{statistics.median(x['compute_s_per_request'] for x in runs):.3f}"
                if execs
                else "-"
            )
            + " |"
        )
    table = "\n".join(lines)
    report["table"] = table
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
