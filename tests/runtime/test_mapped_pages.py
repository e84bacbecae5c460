"""Handing back mapped weight pages: real mappings of real files, their residency read back
from /proc/self/smaps, and the data read through them unchanged afterwards."""

from __future__ import annotations

import gc
import mmap
import sys
import time
import weakref

import numpy as np
import pytest

from sd_deploy.runtime.backends import mapped_pages
from sd_deploy.runtime.backends.mapped_pages import (
    MADV_DONTNEED,
    MADV_PAGEOUT,
    PageReleaser,
    mappings_under,
    owned_all,
    owned_none,
    release,
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


def recording_advice(calls: list, answer: int = 0) -> mapped_pages._Advice:
    return mapped_pages._Advice(lambda start, length, how: calls.append(how) or answer)


@pytest.mark.parametrize("owned", [owned_all, owned_none], ids=["owned", "not-owned"])
def test_a_shared_mapping_is_released_and_reads_back_the_same(weights, owned):
    folder, path = weights
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
        before = touch(view)
        assert resident_bytes_under(folder) >= SIZE * 0.9
        [mapping] = mappings_under(folder)
        assert mapping.shared and mapping.end - mapping.start >= SIZE
        assert release([mapping], owned) >= SIZE
        assert resident_bytes_under(folder) < SIZE * 0.1
        assert touch(view) == before


def test_only_owned_shared_mappings_take_dontneed(weights, tmp_path):
    """A range listed earlier may since hold other memory unless its owner is known: then
    only MADV_PAGEOUT, which loses nothing whatever the range holds."""
    folder, path = weights
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ):
        with path.open("r+b") as copy_file:
            private = mmap.mmap(copy_file.fileno(), 0, access=mmap.ACCESS_COPY)
        mappings = mappings_under(folder)
        assert sorted(m.shared for m in mappings) == [False, True]
        calls: list[int] = []
        release(mappings, owned_all, recording_advice(calls))
        assert sorted(calls) == sorted([MADV_DONTNEED, MADV_PAGEOUT])
        calls.clear()
        release(mappings, owned_none, recording_advice(calls))
        assert calls == [MADV_PAGEOUT, MADV_PAGEOUT]
        private.close()


def test_a_private_mapping_keeps_the_pages_it_wrote(weights):
    """MADV_PAGEOUT (not DONTNEED) for private mappings, owned or not: writes must survive."""
    folder, path = weights
    with path.open("r+b") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY) as view:
        view[:4] = b"sdxl"
        view[SIZE // 2 : SIZE // 2 + 4] = b"lora"
        touch(view)
        [mapping] = mappings_under(folder)
        assert not mapping.shared
        release([mapping], owned_all)
        assert view[:4] == b"sdxl" and view[SIZE // 2 : SIZE // 2 + 4] == b"lora"
    assert path.read_bytes()[:4] != b"sdxl"  # a private copy: the file itself is untouched


def test_only_files_under_the_folder_are_listed(weights, tmp_path):
    folder, _ = weights
    other = tmp_path / "unet-other.bin"  # shares the folder's name as a prefix, is not in it
    other.write_bytes(b"\1" * SIZE)
    with other.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
        touch(view)
        assert mappings_under(folder) == []
        assert resident_bytes_under(other.parent) >= SIZE * 0.9


def test_a_refused_advice_is_not_asked_again(weights):
    """An older kernel (no MADV_PAGEOUT) answers EINVAL: nothing is released, once asked."""
    folder, path = weights
    calls: list[int] = []
    advice = recording_advice(calls, answer=22)
    with path.open("r+b") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY) as view:
        touch(view)
        mappings = mappings_under(folder)
        assert release(mappings, owned_all, advice) == 0
        assert release(mappings, owned_all, advice) == 0
    assert calls == [MADV_PAGEOUT]


def test_without_proc_nothing_is_found(tmp_path):
    assert mappings_under(tmp_path, maps=tmp_path / "no-maps") == []
    assert resident_bytes_under(tmp_path, smaps=tmp_path / "no-smaps") == 0


class Owner:
    """Stands for the compiled model whose life keeps the mapping mapped."""


def test_the_releaser_holds_its_owner_while_it_releases_and_lets_go_after(weights):
    folder, path = weights
    owner = Owner()
    alive = weakref.ref(owner)
    with path.open("rb") as file:
        view = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    mappings = mappings_under(folder)
    releaser = PageReleaser(lambda: mappings, owner=owner, interval=0.01).start()
    del owner
    touch(view)
    deadline = time.monotonic() + 10
    while resident_bytes_under(folder) > SIZE * 0.1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert resident_bytes_under(folder) < SIZE * 0.1
    gc.collect()
    assert alive() is not None  # held while the thread may still release its pages
    releaser.stop()
    gc.collect()
    assert alive() is None
    touch(view)
    time.sleep(0.05)
    assert resident_bytes_under(folder) >= SIZE * 0.9  # stopped: nothing releases now
    view.close()
