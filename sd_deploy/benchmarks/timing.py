"""Clocks, summary statistics and memory readings for sd-bench.

Wall-clock time with `time.perf_counter`; on a GPU the PyTorch work is synchronised before
the clock is read (`torch.cuda.synchronize`), and the engine backends return host arrays, so
their calls have finished when they return. Host memory comes from /proc/self/status:
VmHWM (peak resident set) can be reset per measurement by writing "5" to
/proc/self/clear_refs (Linux >= 4.0), which gives a peak per backend rather than one for
the whole process.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sd_deploy.engine_dir.manifest import ComponentSpec
from sd_deploy.runtime.backends.base import Backend, ComponentSession


def summarize(values: Iterable[float]) -> dict[str, float | int]:
    """median, p90, min, max, mean and count of `values` (seconds)."""
    data = np.asarray(list(values), np.float64)
    if data.size == 0:
        return {"n": 0}
    return {
        "median": float(np.median(data)),
        "p90": float(np.percentile(data, 90)),
        "min": float(data.min()),
        "max": float(data.max()),
        "mean": float(data.mean()),
        "n": int(data.size),
    }


def cuda_synchronize() -> None:
    """Wait for queued GPU work when PyTorch has a GPU; nothing otherwise."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Stopwatch:
    """`with Stopwatch() as sw: ...` then `sw.seconds`; synchronises the GPU on both edges."""

    def __init__(self, synchronize: bool = True) -> None:
        self.synchronize = synchronize
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> Stopwatch:
        if self.synchronize:
            cuda_synchronize()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.synchronize:
            cuda_synchronize()
        self.seconds = time.perf_counter() - self._start


class CallLog:
    """Durations of every component call, by component name, since the last `clear`."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = defaultdict(list)

    def add(self, name: str, seconds: float) -> None:
        self.calls[name].append(seconds)

    def clear(self) -> None:
        self.calls = defaultdict(list)

    def snapshot(self) -> dict[str, list[float]]:
        return {name: list(values) for name, values in self.calls.items()}


class TimedSession(ComponentSession):
    def __init__(self, inner: ComponentSession, log: CallLog) -> None:
        super().__init__(inner.spec)
        self.inner = inner
        self.log = log

    def run(
        self, feeds: Mapping[str, np.ndarray], release_scratch: bool = False
    ) -> dict[str, np.ndarray]:
        with Stopwatch() as sw:
            outputs = self.inner.run(feeds, release_scratch)
        self.log.add(self.spec.name, sw.seconds)
        return outputs

    def close(self) -> None:
        self.inner.close()


class TimedBackend(Backend):
    """Wraps a backend so each component call's wall time lands in `log` (per call, not summed)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.log = CallLog()

    def describe(self) -> str:
        return self.inner.describe()

    def compute_precision(self) -> str:
        return self.inner.compute_precision()

    def open(self, engine_dir: Path, spec: ComponentSpec) -> ComponentSession:
        return TimedSession(self.inner.open(engine_dir, spec), self.log)


# ------------------------------------------------------------------------------------ memory


def status_kib(field: str) -> int | None:
    """A kB field of /proc/self/status (VmRSS, RssAnon, ...), or None where it is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def host_rss_mib() -> float | None:
    """Resident set size of this process now (MiB), or None where /proc is missing."""
    kib = status_kib("VmRSS")
    return None if kib is None else kib / 1024.0


def host_peak_rss_mib() -> float | None:
    """Peak resident set size since start or the last `reset_peak_rss` (MiB)."""
    kib = status_kib("VmHWM")
    return None if kib is None else kib / 1024.0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


class MemoryWatch:
    """Host (and, with PyTorch on a GPU, device) memory of one measured phase.

    host_peak_mib: the process's peak RSS during the phase; host_delta_mib: that peak minus
    the RSS when the phase began, i.e. what the phase added on top of what was already
    resident (with a resettable VmHWM; otherwise the whole process's peak so far).
    gpu_peak_mib: torch.cuda.max_memory_allocated (PyTorch's allocator only);
    gpu_used_delta_mib: device memory in use (all allocators, cudaMemGetInfo) at the end
    minus at the start, which is how ONNX Runtime / TensorRT memory shows up.
    """

    def __init__(self) -> None:
        self.resettable = False
        self.start_rss: float | None = None
        self._gpu_start: int | None = None

    def __enter__(self) -> MemoryWatch:
        self.resettable = reset_peak_rss()
        self.start_rss = host_rss_mib()
        torch = _cuda_torch()
        if torch is not None:
            torch.cuda.reset_peak_memory_stats()
            free, total = torch.cuda.mem_get_info()
            self._gpu_start = total - free
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def read(self) -> dict[str, Any]:
        peak = host_peak_rss_mib()
        result: dict[str, Any] = {
            "host_peak_mib": peak,
            "host_delta_mib": None
            if peak is None or self.start_rss is None
            else max(peak - self.start_rss, 0.0),
            "host_start_mib": self.start_rss,
            "peak_is_per_phase": self.resettable,
        }
        torch = _cuda_torch()
        if torch is not None:
            free, total = torch.cuda.mem_get_info()
            result["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            if self._gpu_start is not None:
                result["gpu_used_delta_mib"] = (total - free - self._gpu_start) / 2**20
        return result


def _cuda_torch() -> Any:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch
    return None
