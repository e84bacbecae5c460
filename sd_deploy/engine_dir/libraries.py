"""Optional libraries that build or run an engine dir's files, imported when needed.

tensorrt, polygraphy and cuda-python are optional (the `trt` extra) and heavy, so
sd_deploy imports them inside the functions that use them, through `import_optional`.
It lives here, beside the contract, because both sides use it: `sd_deploy.engines`
(the builder) and `sd_deploy.runtime.backends` (the TensorRT backend) may import
engine_dir but not each other.

Two different failures are told apart, measured with the real TensorRT 11 wheels:
the package is absent ("... is not installed (pip install ...)"), or it is there but
cannot load: `tensorrt-cu13` without NVIDIA's libraries raises
`ImportError: libnvonnxparser.so.11: cannot open shared object file` -- an ImportError,
not an OSError, so a bare `except ImportError` would call it "not installed".
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from sd_deploy.errors import BuildError, first_line

TRT_INSTALL_HINT = "pip install 'sd-deploy[trt]' on a machine with an NVIDIA GPU"


def import_optional(module: str, label: str | None = None, hint: str = TRT_INSTALL_HINT) -> Any:
    """`module`, imported; else a one-line BuildError naming `label` and how to install it.

    "<label> is not installed (<hint>)" when the package is absent; "<label> cannot be
    loaded: <reason> (<hint>)" when it is installed but its import fails (missing shared
    libraries, a driver mismatch).
    """
    label = label or module
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module == missing or module.startswith(missing + ".")):
            raise BuildError(f"{label} is not installed ({hint})") from None
        raise BuildError(f"{label} cannot be loaded: {first_line(exc)} ({hint})") from None
    except (ImportError, OSError) as exc:
        raise BuildError(f"{label} cannot be loaded: {first_line(exc)} ({hint})") from None


def installed(module: str) -> bool:
    """Whether `module` can be found, without importing it (False for a broken parent)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
