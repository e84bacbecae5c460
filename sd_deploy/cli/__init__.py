"""Command-line entry points: sd-export, sd-build, sd-quantize, sd-run, sd-bench, sd-triton.

Thin by design: parse, call the library, report. One module per command. Heavy libraries
(torch, onnx, onnxruntime, tensorrt) are imported inside the commands so `--help` is
instant. A `UserError` becomes one line on stderr and exit status 1; anything else is a
bug and keeps its traceback.
"""

from sd_deploy.cli.bench import bench_command
from sd_deploy.cli.build import build_command
from sd_deploy.cli.export import export_command
from sd_deploy.cli.quantize import quantize_command
from sd_deploy.cli.run import run_command
from sd_deploy.cli.triton import triton_group

__all__ = [
    "bench_command",
    "build_command",
    "export_command",
    "quantize_command",
    "run_command",
    "triton_group",
]
