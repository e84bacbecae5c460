"""ctypes declarations of sd_deploy.h, for tests and measurements that call libsd_deploy
from a Python process (the library then reuses the running interpreter).

Not an API for users (they have sd_deploy.runtime itself); it exists so that a test can
call the C ABI and Python's Pipeline.generate alternately in one process, on the same
machine state, and check for leaks with the interpreter's own accounting.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

PROGRESS_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


class SdRequest(ctypes.Structure):
    _fields_ = [
        ("prompt", ctypes.c_char_p),
        ("negative_prompt", ctypes.c_char_p),
        ("sampler", ctypes.c_char_p),
        ("width", ctypes.c_int32),
        ("height", ctypes.c_int32),
        ("steps", ctypes.c_int32),
        ("batch", ctypes.c_int32),
        ("guidance", ctypes.c_float),
        ("seed", ctypes.c_int64),
        ("init_rgb", ctypes.POINTER(ctypes.c_uint8)),
        ("init_width", ctypes.c_int32),
        ("init_height", ctypes.c_int32),
        ("strength", ctypes.c_float),
        ("progress", PROGRESS_FN),
        ("progress_user", ctypes.c_void_p),
        ("clip_skip", ctypes.c_int32),
        ("emphasis", ctypes.c_int32),
    ]


def load(build_dir: str | Path) -> ctypes.CDLL:
    """libsd_deploy from a CMake build dir, with its functions' signatures declared."""
    lib = ctypes.CDLL(str(Path(build_dir) / "libsd_deploy.so"))
    i32p = ctypes.POINTER(ctypes.c_int32)
    lib.sd_request_init.argtypes = [ctypes.POINTER(SdRequest)]
    lib.sd_request_init.restype = None
    lib.sd_pipeline_create.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.POINTER(ctypes.c_void_p),
    ]
    lib.sd_pipeline_create.restype = ctypes.c_int
    lib.sd_output_bytes.argtypes = [ctypes.c_void_p, ctypes.POINTER(SdRequest)]
    lib.sd_output_bytes.restype = ctypes.c_size_t
    lib.sd_generate.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(SdRequest),
        ctypes.POINTER(ctypes.c_uint8),
        ctypes.c_size_t,
        i32p,
        i32p,
        i32p,
    ]
    lib.sd_generate.restype = ctypes.c_int
    for name in ("sd_last_parameters", "sd_pipeline_backend"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
        getattr(lib, name).restype = ctypes.c_char_p
    lib.sd_last_error.argtypes = []
    lib.sd_last_error.restype = ctypes.c_char_p
    lib.sd_pipeline_free.argtypes = [ctypes.c_void_p]
    lib.sd_pipeline_free.restype = None
    return lib


class CPipeline:
    """An sd_pipeline* with the few calls the tests make."""

    def __init__(self, lib: ctypes.CDLL, engine_dir: str | Path, backend: str | None = None):
        self.lib = lib
        self.handle = ctypes.c_void_p()
        name = backend.encode() if backend else None
        status = lib.sd_pipeline_create(str(engine_dir).encode(), name, ctypes.byref(self.handle))
        if status != 0:
            raise RuntimeError(f"sd_pipeline_create: {status} {self.last_error()}")

    def last_error(self) -> str:
        return self.lib.sd_last_error().decode()

    def request(self, prompt: str, **fields: float) -> SdRequest:
        req = SdRequest()
        self.lib.sd_request_init(ctypes.byref(req))
        req.prompt = prompt.encode()
        for name, value in fields.items():
            setattr(req, name, value)
        return req

    def generate_into(self, req: SdRequest, out: np.ndarray) -> int:
        """sd_generate into `out` (a uint8 array); the status."""
        return self.lib.sd_generate(
            self.handle,
            ctypes.byref(req),
            out.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
            out.nbytes,
            None,
            None,
            None,
        )

    def parameters(self) -> str:
        return self.lib.sd_last_parameters(self.handle).decode()

    def close(self) -> None:
        if self.handle:
            self.lib.sd_pipeline_free(self.handle)
            self.handle = ctypes.c_void_p()
