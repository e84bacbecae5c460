"""Handing back mapped weight pages: real mappings of real files, their residency read back
from /proc/self/smaps, and the data read through them unchanged afterwards."""

from __future__ import annotations

import mmap
import sys
import time

import numpy as np
import pytest

from sd_deploy.runtime.backends import mapped_pages
from sd_deploy.runtime.backends.mapped_pages import (
    PageReleaser,
    mappings_under,
    release_mapped_pages,
    resident_bytes_under,
)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/self/maps (Linux)"
)
SIZE = 8 << 20


@pytest.fixture
def weights(tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    path = folder / "weights.bin"
    path.write_bytes(np.random.default_rng(0).bytes(SIZE))
    return folder, path


def touch(view: mmap.mmap) -> int:
    """Read every page (makes them resident); a checksum of what was read."""
    return int(np.frombuffer(view, np.uint8).sum(dtype=np.uint64))


def test_a_shared_mapping_is_released_and_reads_back_the_same(weights):
    folder, path = weights
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
        before = touch(view)
        assert resident_bytes_under(folder) >= SIZE * 0.9
        [mapping] = mappings_under(folder)
        assert mapping.shared and mapping.end - mapping.start >= SIZE
        assert release_mapped_pages(folder) >= SIZE
        assert resident_bytes_under(folder) < SIZE * 0.1
        assert touch(view) == before


def test_a_private_mapping_keeps_the_pages_it_wrote(weights):
    """MADV_PAGEOUT (not DONTNEED) for private mappings: written pages must survive."""
    folder, path = weights
    with path.open("r+b") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY) as view:
        view[:4] = b"sdxl"
        view[SIZE // 2 : SIZE // 2 + 4] = b"lora"
        touch(view)
        [mapping] = mappings_under(folder)
        assert not mapping.shared
        release_mapped_pages(folder)
        assert view[:4] == b"sdxl" and view[SIZE // 2 : SIZE // 2 + 4] == b"lora"
    assert path.read_bytes()[:4] != b"sdxl"  # a private copy: the file itself is untouched


def test_only_files_under_the_folder_are_touched(weights, tmp_path):
    folder, _ = weights
    other = tmp_path / "unet-other.bin"  # shares the folder's name as a prefix, is not in it
    other.write_bytes(b"\1" * SIZE)
    with other.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
        touch(view)
        assert mappings_under(folder) == []
        assert release_mapped_pages(folder) == 0
        assert resident_bytes_under(other.parent) >= SIZE * 0.9


def test_a_refused_advice_is_not_asked_again(weights, monkeypatch):
    """An older kernel (no MADV_PAGEOUT) answers EINVAL: nothing is released, once asked."""
    folder, path = weights
    calls = []
    advice = mapped_pages._Advice(lambda start, length, how: calls.append(how) or 22)
    with path.open("r+b") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY) as view:
        touch(view)
        assert release_mapped_pages(folder, advice) == 0
        assert release_mapped_pages(folder, advice) == 0
    assert calls == [mapped_pages.MADV_PAGEOUT]


def test_without_proc_nothing_is_found(tmp_path):
    assert mappings_under(tmp_path, maps=tmp_path / "no-maps") == []
    assert resident_bytes_under(tmp_path, smaps=tmp_path / "no-smaps") == 0


def test_the_releaser_thread_releases_while_it_runs_and_stops(weights):
    folder, path = weights
    with PageReleaser(folder, interval=0.01) as releaser:
        with path.open("rb") as file:
            view = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        touch(view)
        deadline = time.monotonic() + 10
        while resident_bytes_under(folder) > SIZE * 0.1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert resident_bytes_under(folder) < SIZE * 0.1
        thread = releaser._thread
        assert thread is not None and thread.is_alive()
    assert not thread.is_alive()
    touch(view)
    time.sleep(0.05)
    assert resident_bytes_under(folder) >= SIZE * 0.9  # stopped: nothing releases now
    view.close()


def test_the_releaser_leaves_mappings_made_before_it_started(tmp_path):
    """An ONNX Runtime session computing from the folder's weights in place keeps its pages;
    what is mapped while the releaser runs (the plugin's load) goes back."""
    earlier, later = tmp_path / "unet" / "onnx", tmp_path / "unet" / "openvino_cache"
    for folder in (earlier, later):
        folder.mkdir(parents=True)
        (folder / "weights.bin").write_bytes(np.random.default_rng(1).bytes(SIZE))
    with (earlier / "weights.bin").open("rb") as file:
        kept = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    touch(kept)
    with PageReleaser(tmp_path / "unet", interval=0.01):
        with (later / "weights.bin").open("rb") as file:
            blob = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        touch(blob)
    assert resident_bytes_under(earlier) >= SIZE * 0.9
    assert resident_bytes_under(later) < SIZE * 0.1
    kept.close()
    blob.close()
