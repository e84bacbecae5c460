"""read_manifest refuses every broken engine dir with one line, and round-trips."""

from __future__ import annotations

import json
import shutil

import pytest

from sd_deploy.engine_dir.manifest import Manifest, read_manifest
from sd_deploy.errors import EngineDirError


@pytest.fixture()
def engine_copy(tmp_path, tiny_engine_fp32):
    dst = tmp_path / "engines"
    shutil.copytree(tiny_engine_fp32, dst)
    return dst


def edit_manifest(root, change):
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_round_trip(tiny_engine_fp32):
    m = read_manifest(tiny_engine_fp32)
    assert Manifest.from_json(m.to_json()).to_json() == m.to_json()
    assert json.loads((tiny_engine_fp32 / "manifest.json").read_text()) == m.to_json()


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda r: shutil.rmtree(r), "does not exist"),
        (lambda r: (r / "manifest.json").unlink(), "has no manifest.json"),
        (lambda r: (r / "manifest.json").write_text("{not json"), "not readable JSON"),
        (lambda r: (r / "manifest.json").write_text("[]"), "no schema_version"),
        (lambda r: edit_manifest(r, lambda d: d.update(schema_version=2)), "schema_version 2"),
        (lambda r: edit_manifest(r, lambda d: d.pop("model")), "malformed"),
        (lambda r: edit_manifest(r, lambda d: d["components"].pop("unet")), "lacks component"),
        (lambda r: (r / "unet" / "model.onnx").unlink(), "unet/model.onnx"),
        (lambda r: (r / "tokenizer" / "merges.txt").unlink(), "tokenizer/merges.txt"),
    ],
)
def test_broken_engine_dirs(engine_copy, breakage, message):
    breakage(engine_copy)
    with pytest.raises(EngineDirError) as info:
        read_manifest(engine_copy)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_file_instead_of_dir(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(EngineDirError, match="not a directory"):
        read_manifest(tmp_path / "f")
