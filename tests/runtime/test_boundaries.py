"""The runtime stays numpy-only, and --help imports no backend (DESIGN.md boundaries)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = (
    "torch",
    "onnx",
    "transformers",
    "diffusers",
    "onnxruntime",
    "tensorrt",
    "openvino",
    "nncf",
)


def modules_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return {m.split(".")[0] for m in json.loads(out.stdout.strip().splitlines()[-1])}


def test_runtime_imports_no_heavy_library():
    loaded = modules_after(
        "import sd_deploy.runtime, sd_deploy.runtime.pipeline, sd_deploy.runtime.schedulers,"
        " sd_deploy.runtime.tokenizer, sd_deploy.runtime.backends,"
        " sd_deploy.runtime.backends.onnxruntime, sd_deploy.runtime.backends.tensorrt,"
        " sd_deploy.runtime.images, sd_deploy.engine_dir.manifest"
    )
    assert "numpy" in loaded  # the probe really imported the runtime
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_cli_help_imports_no_backend():
    loaded = modules_after(
        "from click.testing import CliRunner\n"
        "from sd_deploy.cli import run_command, export_command, build_command, bench_command,"
        " quantize_command\n"
        "for c in (run_command, export_command, build_command, bench_command, quantize_command):\n"
        "    r = CliRunner().invoke(c, ['--help'])\n"
        "    assert r.exit_code == 0 and 'Usage' in r.output, r.output"
    )
    assert "click" in loaded
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
