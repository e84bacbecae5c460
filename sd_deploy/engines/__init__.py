"""ONNX graphs of an engine dir -> FP16 TensorRT plans (strongly typed), with metadata.

Importing this package needs neither tensorrt nor polygraphy: they are imported
inside `build_engines` only.
"""

from sd_deploy.engines.build import BuildResult, build_engines, parse_workspace

__all__ = ["BuildResult", "build_engines", "parse_workspace"]
