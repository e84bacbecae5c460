"""Hand back the pages of weight files a library has mapped but will not read again.

Why: OpenVINO's CPU plugin maps a component's weights (its compiled-model cache blob, or
the graph's weight file) and repacks them into its own buffers during the load and the
first call. The mapping stays, and every page it touched stays resident: for the SD 1.5
UNet 2.4 GB of a blob it never reads again beside 1.6 GB of packed weights (measured:
benchmarks/results/openvino-cpu/README.md, "Mapped weights handed back").

`release` drops this process's resident pages of given mappings in ways that cannot lose
data:
- MADV_DONTNEED on a shared mapping (how OpenVINO maps both) whose owner is known to keep
  it mapped: the pages stay in the kernel's page cache, so a page touched again, or the
  next run's load, is a cheap minor fault. Not otherwise: on an address range that was
  unmapped and reused since it was listed, it would zero the new memory.
- MADV_PAGEOUT (Linux 5.4+) on everything else: it reclaims clean file pages (read back
  from the file if touched again; `read_back` asks for that ahead) and keeps pages written
  to, in memory or in swap, whatever the range holds by then.
`PageReleaser` calls it every `interval` seconds on a thread while a load and first call
run, so the source pages go as soon as they are copied instead of all being resident at
once. Elsewhere (no /proc/self/maps, no madvise, an older kernel) nothing is released.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger("sd_deploy")

MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
MADV_PAGEOUT = getattr(mmap, "MADV_PAGEOUT", 21)  # both the same on every Linux architecture
MAPS = Path("/proc/self/maps")


class Mapping(NamedTuple):
    start: int
    end: int
    shared: bool
    path: str


Madvise = Callable[[int, int, int], int]  # (start, length, advice) -> errno, 0 when done
Advise = Callable[[Mapping, bool], bool]  # (mapping, owned) -> released
Owned = Callable[[Mapping], bool]


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


def _lines(path: Path) -> list[list[str]]:
    try:
        return [line.split(maxsplit=5) for line in path.read_text().splitlines()]
    except OSError:
        return []


def _file_mapping(fields: list[str], prefix: str) -> Mapping | None:
    """The mapping a maps/smaps header line describes, if it maps a file under `prefix`."""
    if len(fields) == 6 and fields[5].startswith(prefix) and "-" in fields[0]:
        start, end = (int(x, 16) for x in fields[0].split("-"))
        return Mapping(start, end, fields[1].endswith("s"), fields[5])
    return None


def _prefix(root: Path) -> str:
    return os.fspath(Path(root).resolve()) + os.sep


def mappings_under(root: Path, maps: Path = MAPS) -> list[Mapping]:
    """This process's mappings of files under `root`."""
    prefix = _prefix(root)
    return [m for fields in _lines(maps) if (m := _file_mapping(fields, prefix))]


def resident_bytes_under(root: Path, smaps: Path = Path("/proc/self/smaps")) -> int:
    """Bytes of this process's mappings of files under `root` that are resident now."""
    prefix = _prefix(root)
    total, counting = 0, False
    for fields in _lines(smaps):
        if fields and not fields[0].endswith(":"):  # a mapping's header, not a "Key:" line
            counting = _file_mapping(fields, prefix) is not None
        elif counting and fields[:1] == ["Rss:"]:
            total += int(fields[1]) * 1024
    return total


class _Advice:
    """madvise, once looked up; an advice the kernel refuses is not asked again."""

    def __init__(self, madvise: Madvise | None) -> None:
        self.madvise = madvise
        self.refused: set[int] = set()

    def __call__(self, mapping: Mapping, owned: bool) -> bool:
        advice = MADV_DONTNEED if owned and mapping.shared else MADV_PAGEOUT
        if self.madvise is None or advice in self.refused:
            return False
        error = self.madvise(mapping.start, mapping.end - mapping.start, advice)
        if error in (0, errno.ENOMEM):  # ENOMEM: the mapping went away meanwhile
            return error == 0
        log.debug("madvise(%d) refused (errno %d): mapped pages stay resident", advice, error)
        self.refused.add(advice)
        return False


_advice = _Advice(_libc_madvise())


def release(mappings: Iterable[Mapping], owned: Owned, advise: Advise | None = None) -> int:
    """Drop this process's resident pages of these mappings; returns the bytes of mappings
    released (0 where the kernel cannot be asked). `owned(m)`: the caller knows what keeps
    `m` mapped, so it is still the mapping it was when listed, and a shared one may take
    MADV_DONTNEED; otherwise its address range may have been unmapped and reused for other
    memory since it was listed, and only MADV_PAGEOUT, which loses nothing whatever the
    range now holds, is used."""
    advise = advise or _advice
    return sum(m.end - m.start for m in mappings if advise(m, owned(m)))


def owned_none(mapping: Mapping) -> bool:
    return False


def owned_all(mapping: Mapping) -> bool:
    return True


def read_back(mappings: Iterable[Mapping]) -> None:
    """Ask the kernel to read these mappings' files into its page cache in the background
    (what MADV_PAGEOUT evicted), so the library's next reads of them are not disk reads."""
    for path in sorted({m.path for m in mappings}):
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_WILLNEED)
        except (OSError, AttributeError):
            pass
        finally:
            os.close(descriptor)


class PageReleaser:
    """Releases the mappings `listing()` gives every `interval` s on a daemon thread, from
    start() until stop() (also a context manager).

    `owner`, when given, is the object whose life keeps those mappings mapped (OpenVINO's
    compiled model): the thread holds it, so they are all owned in release()'s sense;
    without one, `owned` says which are."""

    def __init__(
        self,
        listing: Callable[[], Iterable[Mapping]],
        owner: object = None,
        owned: Owned = owned_none,
        interval: float = 0.05,
    ) -> None:
        self.listing = listing
        self.interval = interval
        self._owner = owner
        self._owned = owned_all if owner is not None else owned
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PageReleaser:
        if self._thread is None and MAPS.exists():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="page-releaser", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        release(self.listing(), self._owned)
        while not self._stop.wait(self.interval):
            release(self.listing(), self._owned)

    def stop(self) -> None:
        """Stop the thread, after one last release."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            release(self.listing(), self._owned)
        self._owner = None

    def __enter__(self) -> PageReleaser:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = [
    "Mapping",
    "PageReleaser",
    "mappings_under",
    "read_back",
    "release",
    "resident_bytes_under",
]
