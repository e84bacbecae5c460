"""Per-call overhead of the C ABI (libsd_deploy's sd_generate) over Python's Pipeline.generate.

Both run in this one process, on the same engine dir and backend, alternately (the order
flips every round) so that both see the same machine state; the library reuses this
interpreter, exactly the code path a C host runs after its first call. Every round checks
that both made the same bytes.

    python tools/measure_capi_overhead.py --build build/capi --engine-dir engines/ --rounds 15

Prints median and spread (min, quartiles, max) of each side's wall time per call, of the
paired difference C - Python per round, of the C path's own time inside each call (its
wall time minus the Pipeline.generate it ran, timed inside the same call: immune to the
machine's load, which the side-by-side numbers are not), and of sd_output_bytes alone
(building and validating a request in the embedded runtime).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "capi" / "python"))
import sd_capi_ctypes  # noqa: E402

PROMPT = "a red star on a white background"


def spread(values: list[float]) -> dict[str, float]:
    """Milliseconds: median, min, quartiles, max."""
    ms = sorted(v * 1000 for v in values)
    q1, _, q3 = statistics.quantiles(ms, n=4) if len(ms) > 1 else (ms[0], ms[0], ms[0])
    return {
        "median": statistics.median(ms),
        "min": ms[0],
        "q1": q1,
        "q3": q3,
        "max": ms[-1],
    }


def line(name: str, s: dict[str, float]) -> str:
    return (
        f"{name:<28} median {s['median']:9.2f} ms   min {s['min']:9.2f}   "
        f"q1 {s['q1']:9.2f}   q3 {s['q3']:9.2f}   max {s['max']:9.2f}"
    )


@click.command()
@click.option("--build", "build_dir", type=click.Path(path_type=Path), required=True)
@click.option("--engine-dir", type=click.Path(path_type=Path), required=True)
@click.option("--rounds", type=int, default=15, show_default=True)
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--backend", default="auto", show_default=True)
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
def main(
    build_dir: Path, engine_dir: Path, rounds: int, steps: int, backend: str, json_out: Path | None
):
    from sd_deploy.runtime import GenerationRequest, Pipeline

    inner: list[float] = []  # wall time of each Pipeline.generate, whoever called it
    generate = Pipeline.generate

    def timed_generate(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        try:
            return generate(self, *args, **kwargs)
        finally:
            inner.append(time.perf_counter() - start)

    Pipeline.generate = timed_generate  # type: ignore[method-assign]
    lib = sd_capi_ctypes.load(build_dir)
    c_pipe = sd_capi_ctypes.CPipeline(lib, engine_dir, backend)
    py_pipe = Pipeline(engine_dir, backend=backend)
    out = np.zeros((1, 64, 64, 3), np.uint8)

    def run_python(seed: int) -> tuple[float, bytes]:
        start = time.perf_counter()
        result = py_pipe.generate(GenerationRequest(prompt=PROMPT, seed=seed, steps=steps))
        return time.perf_counter() - start, result.images.tobytes()

    c_own: list[float] = []

    def run_c(seed: int) -> tuple[float, bytes]:
        req = c_pipe.request(PROMPT, seed=seed, steps=steps)
        start = time.perf_counter()
        status = c_pipe.generate_into(req, out)
        elapsed = time.perf_counter() - start
        assert status == 0, c_pipe.last_error()
        c_own.append(elapsed - inner[-1])
        return elapsed, out.tobytes()

    for seed in range(2):  # warm: loads, graph caches, lazy imports
        run_python(seed)
        run_c(seed)
    c_own.clear()
    py_times, c_times = [], []
    for r in range(rounds):
        seed = 100 + r
        if r % 2 == 0:
            tp, bp = run_python(seed)
            tc, bc = run_c(seed)
        else:
            tc, bc = run_c(seed)
            tp, bp = run_python(seed)
        assert bp == bc, f"round {r}: C and Python images differ"
        py_times.append(tp)
        c_times.append(tc)
    fixed = []
    req = c_pipe.request(PROMPT, seed=1, steps=steps)
    for _ in range(200):
        start = time.perf_counter()
        lib.sd_output_bytes(c_pipe.handle, req)
        fixed.append(time.perf_counter() - start)

    report = {
        "engine_dir": str(engine_dir),
        "backend": py_pipe.backend_name,
        "steps": steps,
        "rounds": rounds,
        "python_generate": spread(py_times),
        "c_sd_generate": spread(c_times),
        "c_minus_python": spread([c - p for c, p in zip(c_times, py_times, strict=True)]),
        "c_own_time_per_call": spread(c_own),
        "c_fixed_validate_call": spread(fixed),
    }
    print(f"{rounds} interleaved rounds, {steps} steps, backend {report['backend']}")
    print(line("Python Pipeline.generate", report["python_generate"]))
    print(line("C sd_generate", report["c_sd_generate"]))
    print(line("C - Python (paired)", report["c_minus_python"]))
    print(line("C own time inside a call", report["c_own_time_per_call"]))
    print(line("C fixed: sd_output_bytes", report["c_fixed_validate_call"]))
    med = report["python_generate"]["median"]
    diff = report["c_minus_python"]["median"]
    own = report["c_own_time_per_call"]["median"]
    print(f"side by side: C - Python median {diff:+.2f} ms per call ({100 * diff / med:+.2f}%)")
    print(f"C path's own work: median {own:.3f} ms per call ({100 * own / med:.3f}% of generate)")
    if json_out:
        json_out.write_text(json.dumps(report, indent=2) + "\n")
    c_pipe.close()
    py_pipe.close()


if __name__ == "__main__":
    main()
