"""Fixtures for the C ABI tests: libsd_deploy built with CMake, the default model's engines."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from capi_support import CAPI, cmake_configure, missing_toolchain, run


@pytest.fixture(scope="session")
def capi_build(tmp_path_factory) -> Path:
    """capi/ configured against this venv's Python and built; the build dir."""
    reason = missing_toolchain()
    if reason:
        pytest.skip(f"C ABI not built: {reason}")
    build = tmp_path_factory.mktemp("capi-build")
    configured = cmake_configure(CAPI, build, f"-DPython_EXECUTABLE={sys.executable}")
    if configured.returncode != 0 and "Could NOT find Python" in configured.stderr:
        pytest.skip(f"C ABI not built: CMake finds no embeddable Python: {configured.stderr}")
    assert configured.returncode == 0, configured.stdout + configured.stderr
    built = run(["cmake", "--build", str(build), "--parallel", "2"])
    assert built.returncode == 0, built.stdout + built.stderr
    return build


@pytest.fixture(scope="session")
def default_engine_dir(tmp_path_factory) -> Path:
    """`sd-export --out DIR` of the packaged default model (fp32, ONNX). Read-only."""
    out = tmp_path_factory.mktemp("capi-engines") / "default"
    export = [sys.executable, "-c", "from sd_deploy.cli import export_command; export_command()"]
    done = run([*export, "--out", str(out)])
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@pytest.fixture(scope="session")
def clean_env() -> dict[str, str]:
    """The environment for the C programs: no SD_DEPLOY_PYTHON override from outside."""
    env = dict(os.environ)
    env.pop("SD_DEPLOY_PYTHON", None)
    return env
