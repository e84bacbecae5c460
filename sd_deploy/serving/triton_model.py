"""The Triton Python-backend pipeline model (imported by a generated repository's model.py).

One `Pipeline` per model instance, loaded once in `initialize`. `execute` receives the
requests Triton's dynamic batcher gathered; every row of every request becomes one
`GenerationRequest`, checked alone (a bad one gets its own error response, the others
still run), and the valid ones go to `Pipeline.generate_many`, which runs requests
that agree on size, steps, sampler and guidance as ONE batched generation.

Errors: a `UserError` becomes an error response carrying its one-line message,
prefixed by its `ErrorCode` name ("INVALID_ARGUMENT: width must be ..."), so clients
branch on the code, never on the text; the instance keeps serving. A client that
cancels (Triton marks the request cancelled) stops the generation at the next step
when every request in it was cancelled; otherwise the others finish.

Runs only inside the Python backend stub (it imports triton_python_backend_utils).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sd_deploy.errors import (
    EngineDirError,
    ErrorCode,
    GenerationCancelled,
    RequestError,
    UserError,
    first_line,
)
from sd_deploy.serving.repository import INPUTS

# The optional inputs by how they are read, from the repository's one table of them.
NUMBER_TYPES = {"TYPE_INT64": int, "TYPE_INT32": int, "TYPE_FP32": float}
OPTIONAL_TEXT = tuple(n for n, kind, required in INPUTS if kind == "TYPE_STRING" and not required)
OPTIONAL_NUMBERS = {n: NUMBER_TYPES[kind] for n, kind, _ in INPUTS if kind in NUMBER_TYPES}
OPTIONAL_FLAGS = tuple(n for n, kind, _ in INPUTS if kind == "TYPE_BOOL")


def error_message(exc: BaseException) -> str:
    """ "CODE_NAME: one line" for a UserError; bugs keep their type in the line."""
    if isinstance(exc, UserError):
        return f"{ErrorCode(exc.code).name}: {first_line(exc)}"
    return f"INTERNAL: {type(exc).__name__}: {first_line(exc)}"


def decode_text(value: Any, name: str, max_chars: int) -> str:
    """One BYTES element -> str; non-UTF-8 and over-long text are request errors."""
    if isinstance(value, str):
        text = value
    elif not isinstance(value, bytes):  # a number tensor where text belongs: bytes(10**9) ...
        raise RequestError(f"{name} must be a BYTES (text) tensor, got {type(value).__name__}")
    else:
        try:
            text = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(
                f"{name} is not UTF-8 text (byte {exc.start} is {bytes(value)[exc.start]:#04x})"
            ) from None
    if len(text) > max_chars:
        raise RequestError(
            f"{name} has {len(text)} characters; this server accepts at most {max_chars}"
        )
    return text


def rows_of(
    arrays: dict[str, np.ndarray], batched: bool, max_rows: int | None = None
) -> list[dict[str, Any]]:
    """Input tensors -> one dict of scalars per batch row (a row is one image); at least one
    row and at most `max_rows` (the model's max_batch_size)."""
    rows: int | None = None
    for name, array in arrays.items():
        if batched and array.ndim == 0:
            raise RequestError(f"{name} must have shape [batch, 1], got []")
        count = array.shape[0] if batched else 1
        if array.size != count:
            raise RequestError(f"{name} must have shape [batch, 1], got {list(array.shape)}")
        if rows is None:
            rows = count
        elif count != rows:
            raise RequestError(f"{name} has {count} rows but prompt has {rows}")
    if not rows:
        raise RequestError("the request has no rows (prompt has shape [0, 1])")
    if max_rows is not None and rows > max_rows:
        raise RequestError(f"the request has {rows} rows; this model takes at most {max_rows}")
    flat = {name: array.reshape(-1) for name, array in arrays.items()}
    return [{name: values[i] for name, values in flat.items()} for i in range(rows or 0)]


class PipelineModel:
    """The part of the model that does not need Triton: inputs -> results (unit-testable)."""

    def __init__(
        self,
        engine_dir: str | Path,
        backend: str = "auto",
        threads: int | None = None,
        precision: str = "auto",
        max_prompt_chars: int = 4096,
        batched: bool = True,
        max_rows: int | None = None,
    ) -> None:
        from sd_deploy.runtime import BackendOptions, Pipeline

        self.pipeline = Pipeline(
            engine_dir,
            backend=backend,
            options=BackendOptions(threads=threads, precision=precision),
        )
        self.pipeline.load_all()
        self.max_prompt_chars = max_prompt_chars
        self.batched = batched
        self.max_rows = max_rows

    def parse(self, row: dict[str, Any]) -> Any:
        """One row of inputs -> a validated GenerationRequest (RequestError if impossible)."""
        from sd_deploy.runtime import GenerationRequest

        if "prompt" not in row:
            raise RequestError("prompt is required")
        fields: dict[str, Any] = {
            "prompt": decode_text(row["prompt"], "prompt", self.max_prompt_chars)
        }
        for name in OPTIONAL_TEXT:
            if name in row:
                fields[name] = decode_text(row[name], name, self.max_prompt_chars)
        for name, kind in OPTIONAL_NUMBERS.items():
            if name in row:
                value = row[name]
                if isinstance(value, bool | np.bool_) or not isinstance(
                    value, int | float | np.integer | np.floating
                ):
                    raise RequestError(f"{name} must be a number, got {type(value).__name__}")
                if isinstance(value, float | np.floating) and not np.isfinite(value):
                    raise RequestError(f"{name} must be a finite number, got {value}")
                if kind is int and not float(value).is_integer():  # never truncated quietly
                    raise RequestError(f"{name} must be an integer, got {value}")
                fields[name] = kind(value)
        for name in OPTIONAL_FLAGS:
            if name in row:
                if not isinstance(row[name], bool | np.bool_):
                    raise RequestError(f"{name} must be a boolean, got {type(row[name]).__name__}")
                fields[name] = bool(row[name])
        if fields.get("sampler") == "":
            del fields["sampler"]
        request = GenerationRequest(**fields)
        self.pipeline.validate(request)
        return request

    def parse_rows(self, rows: list[dict[str, Any]]) -> list[Any]:
        """A request's rows -> GenerationRequests. Their images go back as one [rows, H, W, 3]
        tensor, so every row must ask for the same size."""
        requests = [self.parse(row) for row in rows]
        sizes = sorted({(r.width, r.height) for r in map(self.pipeline.validate, requests)})
        if len(sizes) > 1:
            shown = ", ".join(f"{w}x{h}" for w, h in sizes[:3])
            raise RequestError(f"the rows of one request must ask for one size, got {shown}")
        return requests

    def run(
        self,
        requests: Sequence[list[Any] | BaseException],
        progress: Callable[[int, int], bool | None] | None = None,
    ) -> list[list[tuple[np.ndarray, str]] | BaseException]:
        """Per Triton request: its parsed rows (or the error that refused it) -> its images
        and infotexts (or an error). All valid rows run in one generate_many call."""
        flat = [row for rows in requests if not isinstance(rows, BaseException) for row in rows]
        results: list[Any] = []
        failure: BaseException | None = None
        if flat:
            try:
                results = self.pipeline.generate_many(flat, progress=progress)
            except (UserError, GenerationCancelled) as exc:
                failure = exc
        out: list[list[tuple[np.ndarray, str]] | BaseException] = []
        position = 0
        for rows in requests:
            if isinstance(rows, BaseException):
                out.append(rows)
                continue
            if failure is not None:
                out.append(failure)
                continue
            mine = results[position : position + len(rows)]
            position += len(rows)
            out.append([(r.images[0], r.parameters[0].infotext()) for r in mine])
        return out


class TritonPythonModel:
    """The class the Python backend instantiates once per model instance."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        check_stub_numpy(pb_utils)
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        if args.get("model_instance_kind") == "GPU":
            # One instance per GPU: this stub process sees only its own device.
            os.environ["CUDA_VISIBLE_DEVICES"] = str(args.get("model_instance_device_id", "0"))
        engine_dir = Path(params["engine_dir"])
        try:
            check_engine_dir(engine_dir, params.get("manifest_sha256", ""))
            self.model = PipelineModel(
                engine_dir,
                backend=params.get("backend", "auto"),
                threads=int(params.get("threads", "0")) or None,
                precision=params.get("precision", "auto"),
                max_prompt_chars=int(params.get("max_prompt_chars", "4096")),
                batched=int(config.get("max_batch_size", 0)) > 0,
                max_rows=int(config.get("max_batch_size", 0)) or 1,
            )
        except UserError as exc:  # the reason Triton shows in its log and the model status
            raise pb_utils.TritonModelException(error_message(exc)) from None
        pb_utils.Logger.log_info(
            f"sd-deploy: {engine_dir} on {self.model.pipeline.backend_name} "
            f"({self.model.pipeline.backend_reason})"
        )

    def _inputs(self, request: Any) -> dict[str, np.ndarray]:
        arrays = {}
        for name, _, _ in INPUTS:
            tensor = self.pb.get_input_tensor_by_name(request, name)
            if tensor is not None:
                arrays[name] = tensor.as_numpy()
        return arrays

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = self.pb
        parsed: list[list[Any] | BaseException] = []
        for request in requests:
            try:
                arrays = self._inputs(request)
                if "prompt" not in arrays:
                    raise RequestError("prompt is required")
                rows = rows_of(arrays, self.model.batched, self.model.max_rows)
                parsed.append(self.model.parse_rows(rows))
            except UserError as exc:
                parsed.append(exc)

        def progress(step: int, steps: int) -> bool:
            # Every request of this execution cancelled by its client: stop sampling.
            return not all(r.is_cancelled() for r in requests)

        results = self.model.run(parsed, progress=progress)

        responses = []
        for request, result in zip(requests, results, strict=True):
            if not isinstance(result, BaseException) and request.is_cancelled():
                result = GenerationCancelled("the client cancelled the request")
            if isinstance(result, BaseException):
                responses.append(pb.InferenceResponse(error=triton_error(pb, result)))
                continue
            images = np.stack([image for image, _ in result])
            texts = np.array([[text.encode()] for _, text in result], dtype=np.object_)
            if not self.model.batched:
                images, texts = images[0], texts[0]
            responses.append(
                pb.InferenceResponse(
                    output_tensors=[pb.Tensor("image", images), pb.Tensor("parameters", texts)]
                )
            )
        return responses

    def finalize(self) -> None:
        model = getattr(self, "model", None)
        if model is not None:
            model.pipeline.close()


def triton_error(pb: Any, exc: BaseException) -> Any:
    """The Triton error for `exc`: its one-line message and the closest Triton status."""
    codes = {
        ErrorCode.INVALID_ARGUMENT: "INVALID_ARG",
        ErrorCode.CANCELLED: "CANCELLED",
        ErrorCode.ENGINE_DIR: "UNAVAILABLE",
        ErrorCode.BACKEND: "UNAVAILABLE",
    }
    code = getattr(exc, "code", None) if isinstance(exc, UserError) else None
    status = getattr(pb.TritonError, codes.get(code, "INTERNAL"), None)  # type: ignore[arg-type]
    message = error_message(exc)
    return pb.TritonError(message, status) if status is not None else pb.TritonError(message)


def check_engine_dir(engine_dir: Path, manifest_sha256: str) -> None:
    """Refuse a missing engine dir, or one re-exported since the repository was made."""
    from sd_deploy.engine_dir import MANIFEST_NAME
    from sd_deploy.engine_dir.hashing import sha256_file

    manifest = engine_dir / MANIFEST_NAME
    if not manifest.is_file():
        raise EngineDirError(
            f"engine dir {engine_dir} (named by config.pbtxt) is missing or has no {MANIFEST_NAME}"
        )
    if manifest_sha256 and sha256_file(manifest) != manifest_sha256:
        raise EngineDirError(
            f"engine dir {engine_dir} changed since this repository was made "
            "(stale: regenerate it with sd-triton export --force)"
        )


def check_stub_numpy(pb_utils: Any) -> None:
    """The stub of Triton <= 24.10 is built with a pybind11 that predates NumPy 2: under
    NumPy 2 it garbles every tensor (BYTES inputs arrive as their first byte repeated,
    outputs come back empty). Refuse to load rather than answer garbage. A stub built
    for NumPy 2 can skip this with SD_TRITON_STUB_NUMPY2=1 in the server's environment."""
    if int(np.__version__.split(".")[0]) >= 2 and os.environ.get("SD_TRITON_STUB_NUMPY2") != "1":
        raise RuntimeError(
            f"BACKEND: the Python backend stub runs NumPy {np.__version__}, which this "
            "Triton stub (built for NumPy 1) garbles; run the stubs in a NumPy 1 env "
            "(sd-triton stub-env DIR, then sd-triton serve --stub-env DIR)"
        )
