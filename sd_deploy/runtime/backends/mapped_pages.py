"""Hand back the pages of weight files a library has mapped but will not read again.

Why: OpenVINO's CPU plugin maps a component's weights (its compiled-model cache blob, or
the graph's weight file) and repacks them into its own buffers during the load and the
first call. The mapping stays, and every page it touched stays resident: for the SD 1.5
UNet 2.4 GB of a blob it never reads again beside 1.6 GB of packed weights (measured:
benchmarks/results/openvino-cpu/README.md, "Mapped weights handed back").

`release_mapped_pages` drops the resident pages of every mapping of a file under a folder
from this process, in ways that never change data, so it is safe to call at any time:
- shared mappings (how OpenVINO maps both): MADV_DONTNEED. The pages stay in the kernel's
  page cache, so a page touched again, or the next run's load, is a cheap minor fault.
- private mappings: MADV_PAGEOUT (Linux 5.4+), which reclaims clean pages (read back from
  the file if touched again) and keeps pages the process wrote to (in memory, or in swap
  where there is swap). MADV_DONTNEED would discard those writes.
`PageReleaser` calls it every `interval` seconds on a thread while a load and first call
run, on the mappings made since it started, so the source pages go as soon as they are
copied instead of all being resident at once. Elsewhere (no /proc/self/maps, no madvise,
an older kernel) both do nothing.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger("sd_deploy")

MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
MADV_PAGEOUT = getattr(mmap, "MADV_PAGEOUT", 21)  # both the same on every Linux architecture
MAPS = Path("/proc/self/maps")

Madvise = Callable[[int, int, int], int]


class Mapping(NamedTuple):
    start: int
    end: int
    shared: bool
    path: str


def _libc_madvise() -> Madvise | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int

    def madvise(start: int, length: int, advice: int) -> int:
        return 0 if function(start, length, advice) == 0 else ctypes.get_errno()

    return madvise


def mappings_under(root: Path, maps: Path = MAPS) -> list[Mapping]:
    """This process's mappings of files under `root`."""
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return []
    prefix = os.fspath(Path(root).resolve()) + os.sep
    found = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(prefix):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            found.append(Mapping(start, end, fields[1].endswith("s"), fields[5]))
    return found


def resident_bytes_under(root: Path, smaps: Path = Path("/proc/self/smaps")) -> int:
    """Bytes of this process's mappings of files under `root` that are resident now."""
    try:
        lines = smaps.read_text().splitlines()
    except OSError:
        return 0
    prefix = os.fspath(Path(root).resolve()) + os.sep
    total, counting = 0, False
    for line in lines:
        fields = line.split(maxsplit=5)
        if fields and "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header
            counting = len(fields) == 6 and fields[5].startswith(prefix)
        elif counting and fields[:1] == ["Rss:"]:
            total += int(fields[1]) * 1024
    return total


class _Advice:
    """madvise, once looked up; an advice the kernel refuses is not asked again."""

    def __init__(self, madvise: Madvise | None) -> None:
        self.madvise = madvise
        self.refused: set[int] = set()

    def __call__(self, mapping: Mapping) -> bool:
        advice = MADV_DONTNEED if mapping.shared else MADV_PAGEOUT
        if self.madvise is None or advice in self.refused:
            return False
        error = self.madvise(mapping.start, mapping.end - mapping.start, advice)
        if error in (0, 12):  # ENOMEM: the mapping went away meanwhile
            return error == 0
        log.debug("madvise(%d) refused (errno %d): mapped pages stay resident", advice, error)
        self.refused.add(advice)
        return False


_advice = _Advice(_libc_madvise())


def release_mapped_pages(
    root: Path,
    advise: Callable[[Mapping], bool] | None = None,
    keep: frozenset[Mapping] = frozenset(),
) -> int:
    """Drop this process's resident pages of mapped files under `root` but those in `keep`
    (see the module docstring); returns the bytes of mappings released (0 where the kernel
    cannot be asked)."""
    advise = advise or _advice
    return sum(m.end - m.start for m in mappings_under(root) if m not in keep and advise(m))


class PageReleaser:
    """Releases mapped pages under `root` every `interval` s on a daemon thread, from
    start() until stop() (also usable as a context manager). Mappings that existed at
    start() are left alone: they belong to someone else in the process (an ONNX Runtime
    session computing from the same folder's weights in place, a session loaded earlier)."""

    def __init__(self, root: Path, interval: float = 0.05) -> None:
        self.root = Path(root)
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._keep: frozenset[Mapping] = frozenset()

    def start(self) -> PageReleaser:
        if self._thread is None and MAPS.exists():
            self._keep = frozenset(mappings_under(self.root))
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="page-releaser", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            release_mapped_pages(self.root, keep=self._keep)

    def stop(self) -> None:
        """Stop the thread, after one last release."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            release_mapped_pages(self.root, keep=self._keep)

    def __enter__(self) -> PageReleaser:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = [
    "Mapping",
    "PageReleaser",
    "mappings_under",
    "release_mapped_pages",
    "resident_bytes_under",
]
