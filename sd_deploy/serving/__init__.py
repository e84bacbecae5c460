"""Serve engine dirs with NVIDIA Triton Inference Server.

    repository   an engine dir -> a Triton model repository (one Python-backend model)
    triton_model the model that repository runs: Pipeline.generate_many per execution
    server       start/stop a real tritonserver from the nvidia-pytriton wheel
    client       generate on such a server (sd-run --server)

Uses only sd_deploy.runtime's public API plus engine_dir and errors. Nothing here
imports tritonclient or the server at import time: the `serve` extra is optional.
"""

from sd_deploy.serving.repository import RepositoryConfig, write_model_repository

__all__ = ["RepositoryConfig", "write_model_repository"]
