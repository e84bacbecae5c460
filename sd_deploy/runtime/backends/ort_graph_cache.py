"""ONNX Runtime's optimized CPU graph, kept beside the engine so later loads skip optimizing.

At ORT_ENABLE_ALL, ONNX Runtime rewrites convolutions into the CPU's blocked (NCHWc)
layout on every load, most of the SD 1.5 UNet's load time, paid again by every `sd-run`.
ONNX Runtime can write the optimized graph out; reloaded with optimizations off it loads
several times faster and runs as fast (benchmarks/results/sd15-cpu/README.md has the
figures). The rewritten layout suits only this CPU and this
ONNX Runtime version (ONNX Runtime warns so when saving), so the cache key holds both,
with the component's graph hash and its files' sizes and times.

Layout: <component>/ort_cpu_cache/<key>/model.onnx (+ model.onnx_data). An entry is
written in a hidden sibling and renamed into place (`engine_dir.atomic.staged_dir`), so
readers see a whole entry or none; a new entry replaces the component's older ones. It
costs about the graph's size on disk (3.4 GB for the fp32 SD 1.5 UNet);
`sd-run --no-graph-cache` does without.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import platform
import shutil
from pathlib import Path

from sd_deploy.engine_dir.atomic import staged_dir
from sd_deploy.engine_dir.layout import ORT_CACHE_DIR
from sd_deploy.engine_dir.manifest import ComponentSpec

# Session settings that make ONNX Runtime write the optimized graph with its weights
# in one external file next to it (graphs over 2 GB cannot be a single protobuf).
SAVE_EXTERNAL_DATA = {
    "session.optimized_model_external_initializers_file_name": "model.onnx_data",
    "session.optimized_model_external_initializers_min_size_in_bytes": "1024",
}
# Free disk asked for beyond the graph's own size before writing an entry.
SPACE_MARGIN = 1.1


@functools.cache
def cpu_signature() -> str:
    """CPU model and instruction-set flags: what the optimized layout depends on (read once
    per process, not once per component)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = ("model name", "flags", "Features", "CPU part")
    seen: dict[str, str] = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in wanted and key not in seen:
            seen[key] = value.strip()
    return f"{platform.machine()} " + json.dumps(seen, sort_keys=True)


class GraphCache:
    """One component's cache entry for one CPU and ONNX Runtime version."""

    def __init__(self, engine_dir: Path, spec: ComponentSpec, ort_version: str) -> None:
        self.engine_dir = Path(engine_dir)
        self.spec = spec
        self.root = self.engine_dir / spec.name / ORT_CACHE_DIR
        self.entry = self.root / self.key(ort_version)
        self.graph = self.entry / "model.onnx"

    def key(self, ort_version: str) -> str:
        stamps = []
        for rel in self.spec.files:
            stat = (self.engine_dir / rel).stat()
            stamps.append([rel, stat.st_size, stat.st_mtime_ns])
        identity = {
            "onnxruntime": ort_version,
            "cpu": cpu_signature(),
            "graph": self.spec.onnx_sha256,
            "files": stamps,
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]

    def source_bytes(self) -> int:
        return sum((self.engine_dir / rel).stat().st_size for rel in self.spec.files)

    def check_space(self) -> None:
        """OSError when the engine dir is not writable or lacks room for an entry."""
        need = int(self.source_bytes() * SPACE_MARGIN)
        self.root.mkdir(exist_ok=True)
        free = shutil.disk_usage(self.root).free
        if free < need:
            raise OSError(f"{free / 2**30:.1f} GiB free in {self.root}, {need / 2**30:.1f} needed")

    def staged(self) -> contextlib.AbstractContextManager[Path]:
        """A hidden folder to write the entry in, renamed into place when the block ends
        well; if another process committed the same entry first, its copy wins."""
        return staged_dir(self.entry, replace=False)

    def prune(self) -> None:
        """Drop the component's older entries (other CPUs, ONNX Runtime versions, graphs)."""
        for other in self.root.iterdir():
            # Hidden names are entries other processes are still writing.
            if other != self.entry and not other.name.startswith("."):
                shutil.rmtree(other, ignore_errors=True)

    def discard(self) -> None:
        """Remove this entry (it failed to load); the next load writes it again."""
        shutil.rmtree(self.entry, ignore_errors=True)
