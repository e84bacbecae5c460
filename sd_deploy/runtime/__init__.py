"""The numpy runtime: engine dir in, images out, no torch. This is its public API.

    from sd_deploy.runtime import GenerationRequest, Pipeline

    pipe = Pipeline("engines/", backend="auto")
    result = pipe.generate(GenerationRequest(prompt="a blue star", seed=3))

docs/runtime-api.md documents every name below; wrappers (the C ABI, the Triton model)
use only these.
"""

from sd_deploy.errors import (
    BuildError,
    EngineDirError,
    ErrorCode,
    GenerationCancelled,
    NonFiniteOutputError,
    RequestError,
    UserError,
)
from sd_deploy.runtime.backends import BACKEND_NAMES, check_precision
from sd_deploy.runtime.images import load_init_image, output_paths, save_png
from sd_deploy.runtime.pipeline import Pipeline
from sd_deploy.runtime.request import (
    BackendOptions,
    GenerationRequest,
    GenerationResult,
    ImageParameters,
    ProgressCallback,
    ResolvedRequest,
)
from sd_deploy.runtime.schedulers import SAMPLERS

__all__ = [
    "BACKEND_NAMES",
    "SAMPLERS",
    "BackendOptions",
    "BuildError",
    "EngineDirError",
    "ErrorCode",
    "GenerationCancelled",
    "GenerationRequest",
    "GenerationResult",
    "ImageParameters",
    "NonFiniteOutputError",
    "Pipeline",
    "ProgressCallback",
    "RequestError",
    "ResolvedRequest",
    "UserError",
    "check_precision",
    "load_init_image",
    "output_paths",
    "save_png",
]
