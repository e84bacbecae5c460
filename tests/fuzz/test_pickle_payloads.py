"""The pickle-payload cases (pickle_payload_cases.py) run in a pytest of their own.

In the full suite, and in no subset tried, the zip-archive case segfaulted the test
process inside torch.load, after a few hundred other tests had run in it. Run apart, the
cases pass; a crash there now fails this test with its output instead of ending the run.
The cause is not found.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the payloads are torch files")

CASES = Path(__file__).resolve().parent / "pickle_payload_cases.py"


def test_pickle_payloads_are_refused_and_run_nothing() -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert " passed" in done.stdout and "failed" not in done.stdout, done.stdout[-2000:]
