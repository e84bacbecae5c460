"""torch -> ONNX per component, fp32 or fp16, validated against PyTorch, into an engine dir."""

from sd_deploy.exporter.export import DEFAULT_OPSET, export_engine_dir, resolve_components

__all__ = ["DEFAULT_OPSET", "export_engine_dir", "resolve_components"]
