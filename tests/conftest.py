"""Shared fixtures: the tiny preset's models and engine dirs, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_models():
    from sd_deploy.models import build_random, get_preset

    return build_random(get_preset("tiny"), seed=0)


def _export(tmp_path_factory, models, fp16: bool) -> Path:
    from sd_deploy.exporter import export_engine_dir

    out = tmp_path_factory.mktemp("engines") / ("tiny-fp16" if fp16 else "tiny-fp32")
    export_engine_dir(models, out, fp16=fp16, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_engine_fp32(tmp_path_factory, tiny_models) -> Path:
    """All four components of `tiny`, fp32, validated. Treat as read-only."""
    return _export(tmp_path_factory, tiny_models, fp16=False)


@pytest.fixture(scope="session")
def tiny_engine_fp16(tmp_path_factory, tiny_models) -> Path:
    """All four components of `tiny`, fp16, validated. Treat as read-only."""
    return _export(tmp_path_factory, tiny_models, fp16=True)


@pytest.fixture(scope="session")
def default_engine(tmp_path_factory) -> Path:
    """The packaged default model exported as `sd-export --out DIR` does. Read-only."""
    from sd_deploy.exporter import export_engine_dir
    from sd_deploy.models import load_models

    out = tmp_path_factory.mktemp("default-engines") / "engines"
    export_engine_dir(load_models("default"), out, progress=False)
    return out
