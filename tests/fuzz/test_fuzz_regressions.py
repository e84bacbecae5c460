"""Every input a fuzz run found a bug with, kept under regressions/<target>/, now passes the
oracle: the reader succeeds or raises its one-line user error (tools/fuzz/engine.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the checkpoint and LoRA targets need the export extra")

from tools.fuzz.targets import TARGETS

REGRESSIONS = Path(__file__).resolve().parent / "regressions"
CASES = sorted(p for p in REGRESSIONS.glob("*/*") if p.is_file())


def test_every_regression_names_a_target() -> None:
    assert CASES, "no regression inputs"
    assert {p.parent.name for p in CASES} <= set(TARGETS)


REPLAY = """
import sys, tempfile
from pathlib import Path
from tools.fuzz import engine
from tools.fuzz.targets import TARGETS
bad = 0
with engine.quieted():
    for path in map(Path, sys.argv[1:]):
        target = TARGETS[path.parent.name]
        engine.warm_up(target)  # imports and caches are not the input's time
        finding = engine.check(target, path.read_bytes(), Path(tempfile.mkdtemp()))
        if finding is not None:
            bad += 1
            print(path.name, finding.kind, finding.summary, finding.where, finding.detail)
sys.exit(1 if bad else 0)
"""


@pytest.mark.parametrize("target", sorted({p.parent.name for p in CASES}))
def test_regression_inputs_pass_the_oracle(target: str) -> None:
    """One child interpreter per target: hostile inputs through torch's unpickler and the
    others must not leave pytest's own heap to the tests after them (the suite once
    segfaulted later in garbage collection)."""
    cases = [str(p) for p in CASES if p.parent.name == target]
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-c", REPLAY, *cases]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


# Inputs whose bug was an allocation: replayed in one subprocess whose address space is capped
# (3 GiB above what it holds after the imports), where the allocation is a MemoryError.
MEMORY_CASES = [p for p in CASES if "claims" in p.name]
CAPPED_REPLAY = """
import importlib, sys, tempfile
from pathlib import Path
from tools.fuzz import engine
from tools.fuzz.targets import TARGETS
cases = [Path(p) for p in sys.argv[1:]]
for name in {p.parent.name for p in cases}:
    for module in TARGETS[name].modules:
        importlib.import_module(module)
engine.quiet()
engine.limit_memory()
bad = 0
for path in cases:
    work = Path(tempfile.mkdtemp())
    found = engine.check(TARGETS[path.parent.name], path.read_bytes(), work)
    if found is not None:
        bad += 1
        print(path, found.kind, found.summary, found.where, found.detail)
sys.exit(1 if bad else 0)
"""


def test_memory_regressions_under_an_address_space_cap() -> None:
    assert MEMORY_CASES
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-c", CAPPED_REPLAY, *map(str, MEMORY_CASES)]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_bounded_file_reads_no_more_than_the_file_holds(tmp_path: Path) -> None:
    """What the legacy-pickle readers (checkpoints, .pt LoRAs) go through: asking for 1 TB of
    a 5-byte file allocates 5 bytes (a plain FileIO tries to allocate the terabyte)."""
    from sd_deploy.models.checkpoints.readers import BoundedFile

    path = tmp_path / "small.pt"
    path.write_bytes(b"hello")
    with BoundedFile(path) as f:
        assert f.read(1) == b"h"
        assert f.read(1 << 40) == b"ello"
        assert f.read(1 << 40) == b""
