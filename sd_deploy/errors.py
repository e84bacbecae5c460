"""User-facing errors, each with a stable numeric code.

A `UserError` is something the user can fix (a bad path, size, flag or file); the CLI
prints its message on one line and exits non-zero. Anything else is a bug and keeps
its traceback. Every class carries an `ErrorCode` so that wrappers (the C ABI's
`sd_status`, Triton error responses, HTTP status mapping) branch on a number, never on
message text; docs/runtime-api.md tables them.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Stable codes; the C ABI's sd_status uses the same numbers."""

    OK = 0
    INVALID_ARGUMENT = 1  # a request or flag the engines cannot do
    ENGINE_DIR = 2  # missing, incomplete or unknown-schema engine dir
    BACKEND = 3  # backend missing, stale TensorRT plan, load failure
    NONFINITE = 4  # NaN/Inf in a component's output
    CANCELLED = 5  # the caller asked to stop
    BUFFER_TOO_SMALL = 6  # C ABI only: caller's buffer < sd_output_bytes()
    PYTHON = 7  # C ABI only: the interpreter or sd_deploy cannot be initialised
    CHECKPOINT = 8  # a checkpoint, model folder or LoRA file cannot be read
    EXPORT = 9  # export cannot proceed


def first_line(exc: BaseException) -> str:
    """A library exception as one line: its first line, or its type when it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class UserError(Exception):
    """An error caused by user input; its message is shown as one line."""

    code: ErrorCode = ErrorCode.INVALID_ARGUMENT


class CheckpointError(UserError):
    """A checkpoint or model folder cannot be read or does not match the architecture."""

    code = ErrorCode.CHECKPOINT


class EngineDirError(UserError):
    """An engine directory is missing, incomplete, or of an unknown schema."""

    code = ErrorCode.ENGINE_DIR


class RequestError(UserError):
    """A generation request asks for something the engines cannot do."""

    code = ErrorCode.INVALID_ARGUMENT


class ExportError(UserError):
    """Export cannot proceed (bad ranges, existing output, failed validation)."""

    code = ErrorCode.EXPORT


class BuildError(UserError):
    """A TensorRT engine (or another backend) cannot be built or loaded on this machine."""

    code = ErrorCode.BACKEND


class NonFiniteOutputError(UserError):
    """A component produced NaN or Inf; names the component."""

    code = ErrorCode.NONFINITE


class GenerationCancelled(UserError):
    """The progress callback returned False (or the cancel event was set): stopped between
    two steps; nothing is returned."""

    code = ErrorCode.CANCELLED
