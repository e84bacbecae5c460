"""CI smoke run of every fuzz target: its seeds, then a fixed number of seeded mutants, through
the oracle (success or a one-line UserError; no other exception, no time-out, no payload).

The long, coverage-guided runs are `python -m tools.fuzz TARGET --seconds N` (tools/fuzz).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the checkpoint and LoRA targets need the export extra")

from tools.fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parents[2]

# Mutants per target: a few seconds each on a CI core (slower targets get fewer).
ITERATIONS = {
    "safetensors": 30,
    "ckpt": 60,
    "sniff": 200,
    "diffusers": 15,
    "manifest": 40,
    "tokenizer": 80,
    "plan": 200,
    "int8": 200,
    "prompts": 150,
    "infotext": 150,
    "lora": 80,
    "triton": 80,
}


SMOKE = """
import sys
from tools.fuzz import engine
from tools.fuzz.targets import TARGETS
name, iterations = sys.argv[1], int(sys.argv[2])
with engine.quieted():
    stats = engine.fuzz_random(TARGETS[name], iterations=iterations, seed=1)
found = [f"{f.kind}: {f.summary} at {f.where}\\n{f.detail}" for f in stats.findings.values()]
print("\\n".join(found))
sys.exit(1 if found else 0)
"""


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_target_smoke(name: str) -> None:
    """Each target in a child interpreter: thousands of hostile inputs through torch, ONNX
    Runtime and OpenVINO must not leave the test process's heap to the next tests, and a
    crash of the target (a finding too) fails this test instead of the whole run."""
    iterations = str(ITERATIONS.get(name, 50))
    done = subprocess.run(
        [sys.executable, "-c", SMOKE, name, iterations],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (
        f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    )


def test_oracle_flags_what_it_should() -> None:
    """oracle_cases.py in a pytest of its own (its docstring says why)."""
    cases = Path(__file__).resolve().parent / "oracle_cases.py"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-4000:] + done.stderr
