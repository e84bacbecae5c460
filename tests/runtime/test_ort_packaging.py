"""The two ONNX Runtime builds (extras `ort` and `ort-gpu`) exclude each other cleanly."""

from __future__ import annotations

import configparser
from importlib import metadata
from pathlib import Path

import pytest

from sd_deploy.errors import UserError
from sd_deploy.runtime.backends import onnxruntime as ort_backend

REPO = Path(__file__).resolve().parents[2]


def _fake_distributions(monkeypatch, names):
    def distribution(name):
        if name in names:
            return object()
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", distribution)


def test_both_builds_installed_is_one_line_saying_how_to_switch(monkeypatch):
    _fake_distributions(monkeypatch, {"onnxruntime", "onnxruntime-gpu"})
    with pytest.raises(UserError) as info:
        ort_backend.import_onnxruntime()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("onnxruntime and onnxruntime-gpu are both installed")
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in message
    assert "'sd-deploy[ort-gpu]'" in message and "'sd-deploy[ort]'" in message


@pytest.mark.parametrize("names", [{"onnxruntime"}, {"onnxruntime-gpu"}])
def test_one_build_is_fine(monkeypatch, names):
    pytest.importorskip("onnxruntime")
    _fake_distributions(monkeypatch, names)
    assert ort_backend.import_onnxruntime().__name__ == "onnxruntime"


def test_extras_name_the_two_builds():
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    extras = config["options.extras_require"]
    assert "onnxruntime" in extras["ort"] and "onnxruntime-gpu" not in extras["ort"]
    assert "onnxruntime-gpu" in extras["ort-gpu"]
    pins = (REPO / "constraints.txt").read_text().split()
    assert any(p.startswith("onnxruntime-gpu==") for p in pins)
