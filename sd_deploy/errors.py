"""User-facing errors.

A `UserError` is something the user can fix (a bad path, size, flag or file); the CLI
prints its message on one line and exits non-zero. Anything else is a bug and keeps
its traceback.
"""


def first_line(exc: BaseException) -> str:
    """A library exception as one line: its first line, or its type when it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class UserError(Exception):
    """An error caused by user input; its message is shown as one line."""


class CheckpointError(UserError):
    """A checkpoint or model folder cannot be read or does not match the architecture."""


class EngineDirError(UserError):
    """An engine directory is missing, incomplete, or of an unknown schema."""


class RequestError(UserError):
    """A generation request asks for something the engines cannot do."""


class ExportError(UserError):
    """Export cannot proceed (bad ranges, existing output, failed validation)."""


class BuildError(UserError):
    """A TensorRT engine cannot be built or loaded on this machine."""


class NonFiniteOutputError(UserError):
    """A component produced NaN or Inf; names the component."""
