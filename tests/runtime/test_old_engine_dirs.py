"""Engine dirs written before the engine_dir/ package and the public API still load and run.

The old engine dir is made by the old code: commit a68ecf7, the last one before the
contract moved into sd_deploy/engine_dir/, is taken out of this repository's own history
with `git archive` and exports the tiny preset (seed 0). Fields added since (clip skip,
context length, LoRA targets) are optional with defaults, so schema_version stays 1 and
such a dir must draw exactly what the same graphs drew then.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from sd_deploy.engine_dir import SCHEMA_VERSION, read_manifest
from sd_deploy.runtime import GenerationRequest, Pipeline

REPO = Path(__file__).resolve().parents[2]
BEFORE = "a68ecf7"  # last commit before sd_deploy/engine_dir/

EXPORT_AND_DRAW = """
import json, sys
import numpy as np
from sd_deploy.models import build_random, get_preset
from sd_deploy.exporter import export_engine_dir
from sd_deploy.runtime.pipeline import GenerationRequest, Pipeline
out = sys.argv[1]
export_engine_dir(build_random(get_preset("tiny"), seed=0), out, progress=False)
pipe = Pipeline(out, backend="onnxruntime-cpu")
result = pipe.generate(GenerationRequest(prompt="a red circle", seed=3, steps=3, batch=2))
np.save(out + ".npy", result.images)
"""


@pytest.fixture(scope="module")
def old_engine(tmp_path_factory) -> tuple[Path, np.ndarray]:
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", BEFORE, "sd_deploy"], capture_output=True
    )
    if archive.returncode != 0:
        pytest.skip(f"commit {BEFORE} is not in this clone's history (shallow clone?)")
    root = tmp_path_factory.mktemp("before")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(root, filter="data")
    out = root / "engines"
    done = subprocess.run(
        [sys.executable, "-c", EXPORT_AND_DRAW, str(out)],
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out, np.load(f"{out}.npy")


def test_an_engine_dir_from_before_the_move_loads_and_draws_the_same(old_engine):
    engine, then = old_engine
    manifest = read_manifest(engine)
    assert manifest.schema_version == SCHEMA_VERSION == 1
    request = GenerationRequest(prompt="a red circle", seed=3, steps=3, batch=2)
    now = Pipeline(engine, backend="onnxruntime-cpu").generate(request)
    np.testing.assert_array_equal(now.images, then)


def test_img2img_on_an_old_engine_dir(old_engine):
    engine, _ = old_engine
    init = np.full((64, 64, 3), 200, np.uint8)
    request = GenerationRequest(prompt="a star", seed=1, steps=3, init_image=init, strength=0.5)
    result = Pipeline(engine, backend="onnxruntime-cpu").generate(request)
    assert result.images.shape == (1, 64, 64, 3) and result.parameters[0].strength == 0.5
