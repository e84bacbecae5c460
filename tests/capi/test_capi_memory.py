"""Memory checks of libsd_deploy's own code: AddressSanitizer + UBSan (CI), valgrind (on
request), and Python-object leaks through the interpreter's own accounting.

Why not the raw tools' verdicts: the embedded interpreter is never finalised (sd_deploy.h),
so at exit everything Python, numpy and ONNX Runtime hold is "leaked", and CPython and
ONNX Runtime trip valgrind on their own (see capi/tests/valgrind-python.supp). So each check
counts what the library and its C test program did: memory errors anywhere in an
ASan-instrumented frame (only our code is instrumented), and leaks whose allocation was
made by our code.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import sysconfig
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from capi_support import CAPI, DEFAULT_CASES, cmake_configure, missing_toolchain, run

OUR_SOURCES = ("capi/src/", "capi/tests/")


def our_frame(location: str) -> bool:
    return any(part in location for part in OUR_SOURCES)


def leaks_made_by_our_code(report: str) -> list[str]:
    """LeakSanitizer blocks whose allocation was called from our sources (frame #1)."""
    blocks = re.split(r"\n(?=(?:Direct|Indirect) leak of)", report)
    ours = []
    for block in blocks[1:]:
        frames = re.findall(r"#(\d+) 0x[0-9a-f]+ in \S+ (\S+)", block)
        caller = next((loc for n, loc in frames if n == "1"), "")
        if our_frame(caller):
            ours.append(block[:2000])
    return ours


@pytest.fixture(scope="module")
def asan_build(tmp_path_factory) -> Path:
    reason = missing_toolchain()
    if reason:
        pytest.skip(f"C ABI not built: {reason}")
    flags = "-fsanitize=address,undefined"
    probe = run(["cc", flags, "-x", "c", "-", "-o", os.devnull], input="int main(void){}")
    if probe.returncode != 0:
        pytest.skip(f"the C compiler cannot build with {flags}: {probe.stderr}")
    build = tmp_path_factory.mktemp("capi-asan")
    configured = cmake_configure(
        CAPI, build, f"-DPython_EXECUTABLE={sys.executable}", "-DSD_DEPLOY_SANITIZE=ON"
    )
    assert configured.returncode == 0, configured.stdout + configured.stderr
    built = run(["cmake", "--build", str(build), "--target", "sd_capi_test"])
    assert built.returncode == 0, built.stdout + built.stderr
    return build


def test_c_test_under_address_sanitizer_finds_nothing_in_our_code(
    asan_build, default_engine_dir, clean_env, tmp_path
):
    env = dict(clean_env)
    env["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=0:halt_on_error=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    # 4 steps: enough for the cancel-at-step-2 case, fast under the sanitizers. ONNX
    # Runtime: OpenVINO's TBB is dlopen()ed with RTLD_DEEPBIND, which ASan refuses.
    program = [str(asan_build / "sd_capi_test"), "--steps", "4", "--backend", "onnxruntime-cpu"]
    done = run(
        [*program, str(default_engine_dir), str(tmp_path)],
        env=env,
        timeout=600,
    )
    report = done.stderr
    assert "ERROR: AddressSanitizer" not in report, report[-8000:]
    assert "runtime error:" not in report, report[-8000:]  # UBSan
    assert not leaks_made_by_our_code(report), "\n\n".join(leaks_made_by_our_code(report))
    expected = [word for case in DEFAULT_CASES for word in ("ok", case)]
    assert done.stdout.split() == expected, done.stdout + report[-4000:]
    # LeakSanitizer's exit status is nonzero for the interpreter's memory; nothing else is
    assert done.returncode in (0, 1, 23), done.returncode


def test_leak_filter_sees_a_leak_from_our_code():
    """The check above can fail: a leak allocated by the library is counted."""
    report = (
        "==1==ERROR: LeakSanitizer: detected memory leaks\n\n"
        "Direct leak of 64 byte(s) in 1 object(s) allocated from:\n"
        "    #0 0x7f in __interceptor_malloc asan_malloc_linux.cpp:69\n"
        "    #1 0x7f in keep_parameters /work/main/capi/src/sd_deploy.c:420\n"
        "\nDirect leak of 32 byte(s) in 1 object(s) allocated from:\n"
        "    #0 0x7f in __interceptor_malloc asan_malloc_linux.cpp:69\n"
        "    #1 0x7f in _PyObject_Malloc Objects/obmalloc.c:2003\n"
        "    #2 0x7f in sd_generate /work/main/capi/src/sd_deploy.c:500\n"
    )
    assert len(leaks_made_by_our_code(report)) == 1


# --------------------------------------------------------------------------- valgrind


def valgrind_errors_in_our_code(xml_file: Path) -> list[str]:
    """Unsuppressed valgrind errors (and definite leaks) with a frame in our sources."""
    found = []
    for error in ET.parse(xml_file).getroot().iter("error"):
        frames = [
            f"{frame.findtext('fn')} {frame.findtext('dir')}/{frame.findtext('file')}"
            for frame in error.find("stack").iter("frame")
        ]
        kind = error.findtext("kind")
        if kind.startswith("Leak_"):
            # only the allocation our code made: the frame after the allocator
            relevant = frames[1:2]
        else:
            relevant = frames
        if any(our_frame(f) for f in relevant):
            found.append(f"{kind}: " + " <- ".join(frames[:8]))
    return found


@pytest.mark.skipif(
    os.environ.get("SD_DEPLOY_VALGRIND") != "1",
    reason="valgrind takes 7 CPU minutes (9-20 min wall on a shared 2-core machine): ONNX "
    "Runtime under emulation; run it with SD_DEPLOY_VALGRIND=1 pytest tests/capi -k valgrind",
)
def test_c_test_under_valgrind_finds_nothing_in_our_code(
    capi_build, default_engine_dir, clean_env, tmp_path
):
    if not shutil.which("valgrind"):
        pytest.skip("valgrind is not installed")
    # valgrind's CPU lacks AVX-512, so ONNX Runtime's cached optimized graph of this
    # machine does not run under it: give it an engine dir without the cache.
    engines = tmp_path / "engines"
    shutil.copytree(default_engine_dir, engines, ignore=shutil.ignore_patterns("ort_*cache*"))
    out = tmp_path / "out"
    out.mkdir()
    xml_file = tmp_path / "valgrind.xml"
    done = run(
        [str(CAPI / "tests" / "run_valgrind.sh"), str(xml_file), str(capi_build / "sd_capi_test")]
        + ["--steps", "4", "--backend", "onnxruntime-cpu", str(engines), str(out)]
        + ["txt2img", "errors", "threads"],
        env=clean_env,
        timeout=1800,
    )
    assert done.stdout.split() == ["ok", "txt2img", "ok", "errors", "ok", "threads"], (
        done.stdout + done.stderr[-4000:]
    )
    assert not valgrind_errors_in_our_code(xml_file), valgrind_errors_in_our_code(xml_file)


# ------------------------------------------------------------- Python objects, in-process


LEAK_CHECK = """
import gc, sys
import numpy as np
sys.path.insert(0, sys.argv[3])
import sd_capi_ctypes
from sd_deploy.runtime import GenerationRequest, Pipeline

build, engine = sys.argv[1], sys.argv[2]
lib = sd_capi_ctypes.load(build)
pipe = sd_capi_ctypes.CPipeline(lib, engine)
try:
    out = np.zeros((1, 64, 64, 3), np.uint8)
    good = pipe.request("a red circle on a white background", seed=4, steps=2)
    bad = pipe.request("a red circle on a white background", width=500)

    def calls():
        assert pipe.generate_into(good, out) == 0, pipe.last_error()
        assert pipe.generate_into(bad, out) == 1
        assert lib.sd_output_bytes(pipe.handle, good) == out.nbytes

    for _ in range(3):  # warm: caches, first loads, lazy imports
        calls()
    gc.collect()
    before = len(gc.get_objects())
    for _ in range(20):
        calls()
    gc.collect()
    grown = len(gc.get_objects()) - before
    assert grown < 20, f"{grown} more Python objects after 20 rounds of calls"
    with Pipeline(engine) as python_pipe:
        want = python_pipe.generate(
            GenerationRequest(prompt="a red circle on a white background", seed=4, steps=2)
        )
    assert out.tobytes() == want.images.tobytes()
finally:
    pipe.close()
"""


def test_no_python_objects_leak_over_many_calls(capi_build, default_engine_dir):
    """Inside a running interpreter (the library reuses it): calls that succeed and calls
    that fail leave no Python objects behind, and images equal Pipeline.generate's.

    In a child interpreter of its own, not pytest's: the library then shares that
    interpreter's heap, and whatever it did would otherwise surface in unrelated tests."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        pytest.skip("this python links libpython statically: the library would load a second one")
    done = run(
        [
            sys.executable,
            "-c",
            LEAK_CHECK,
            str(capi_build),
            str(default_engine_dir),
            str(CAPI / "python"),
        ]
    )
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
