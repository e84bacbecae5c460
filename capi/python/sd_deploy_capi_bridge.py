"""What libsd_deploy runs inside its embedded interpreter: C arguments to the public API.

Compiled into the C library as source (capi/CMakeLists.txt embeds this file), so an
installed library needs nothing beside the sd-deploy package itself. It uses only the
public API: sd_deploy.runtime's Pipeline, GenerationRequest and UserError, whose `code` (an
sd_deploy.errors.ErrorCode) every sd_deploy error carries. It keeps no state: the C side owns
each Pipeline object and passes it back in.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

import numpy as np

from sd_deploy.runtime import BackendOptions, GenerationRequest, Pipeline, UserError

# The ErrorCode values sd_deploy.h has an sd_status for (the same numbers). A UserError
# with another code is still the caller's to fix: SD_ERR_INVALID_ARGUMENT. Any other
# exception is a bug: SD_ERR_PYTHON.
INVALID_ARGUMENT = 1
PYTHON_ERROR = 7
C_STATUSES = {1, 2, 3, 4, 5, 8}


def claim_stdout() -> None:
    """The library started this interpreter: keep Python's prints off the host's stdout."""
    sys.stdout = sys.stderr


def open_pipeline(
    engine_dir: str, backend: str | None, precision: str | None, threads: int, graph_cache: int
) -> Pipeline:
    """sd_pipeline_options (NULL, 0: the default) as a Pipeline."""
    options = BackendOptions(
        threads=threads or None, graph_cache=bool(graph_cache), precision=precision or "auto"
    )
    return Pipeline(engine_dir, backend=backend or "auto", options=options)


def backend_name(pipe: Pipeline) -> str:
    return str(pipe.backend_name)


def as_decimal(value: float) -> float:
    """A C float as the decimal its writer meant: 0.6f is 0.6000000238 as a double, and
    the Python caller comparing against C writes 0.6 (the shortest float32 repr)."""
    return float(str(np.float32(value)))


def make_request(
    prompt: str,
    negative_prompt: str | None,
    sampler: str | None,
    width: int,
    height: int,
    steps: int,
    batch: int,
    guidance: float,
    seed: int,
    init_rgb: bytes | None,
    init_width: int,
    init_height: int,
    strength: float,
    clip_skip: int,
    emphasis: int,
) -> GenerationRequest:
    """sd_request's conventions (0, negative or NULL: the default) as a GenerationRequest."""
    init_image = None
    if init_rgb is not None:
        init_image = np.frombuffer(init_rgb, np.uint8).reshape(init_height, init_width, 3)
    return GenerationRequest(
        prompt=prompt,
        negative_prompt=negative_prompt or "",
        width=width or None,
        height=height or None,
        steps=steps or None,
        guidance=None if guidance < 0 else as_decimal(guidance),
        sampler=sampler,
        seed=None if seed < 0 else seed,
        batch=batch or 1,
        init_image=init_image,
        strength=as_decimal(strength),
        clip_skip=clip_skip or None,
        emphasis=bool(emphasis),
    )


def output_shape(pipe: Pipeline, request: GenerationRequest) -> tuple[int, int, int]:
    """(batch, height, width) the request makes; raises what Pipeline.validate raises."""
    resolved = pipe.validate(request)
    return resolved.batch, resolved.height, resolved.width


def generate(
    pipe: Pipeline,
    request: GenerationRequest,
    progress: Callable[[int, int], bool | None] | None,
) -> tuple[np.ndarray, list[str]]:
    """The images as one C-contiguous uint8 array, and each image's A1111 infotext."""
    result = pipe.generate(request, progress=progress)
    images = np.ascontiguousarray(result.images, dtype=np.uint8)
    return images, [p.infotext() for p in result.parameters]


def describe_error(exc: BaseException) -> tuple[int, str]:
    """(sd_status, one-line message) for an exception the calls above raised.

    The status is the error's `code` (sd_deploy.errors.ErrorCode), never read from its
    text. An exception that is no sd_deploy error is a bug: its traceback goes to stderr
    and the status is SD_ERR_PYTHON."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, UserError):
        code = getattr(exc, "code", INVALID_ARGUMENT)
        return (int(code) if code in C_STATUSES else INVALID_ARGUMENT), line
    traceback.print_exception(exc, file=sys.stderr)
    return PYTHON_ERROR, f"{type(exc).__name__}: {line}"
