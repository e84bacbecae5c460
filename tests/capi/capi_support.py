"""Helpers shared by the C ABI tests and their fixtures (no fixtures here)."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

CAPI = Path(__file__).resolve().parents[2] / "capi"
# sd_capi_test's default cases, in the order it runs and reports them ("ok NAME" each)
DEFAULT_CASES = ("txt2img", "img2img", "batch2", "defaults", "options", "errors", "threads", "gil")


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a command, capture its output as text; never raises on failure."""
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def cmake_configure(source: Path, build: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=RelWithDebInfo"]
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    return run([*args, *extra])


def missing_toolchain() -> str | None:
    """Why the C ABI cannot be built here, or None."""
    if not shutil.which("cmake"):
        return "cmake is not installed"
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        return "no C compiler (cc, gcc or clang)"
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        return "no C++ compiler (c++, g++ or clang++)"
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") and not sysconfig.get_config_var("LIBPL"):
        return "this Python has no library to embed"
    return None
