"""sha256 of files, read in chunks to stay light: checkpoint provenance, the ONNX hashes in
manifests and TensorRT plan metadata all use these; and a digest of array values, by which
the exporter finds the LoRA-targeted weights in its graphs (numpy only: safe for the runtime,
which imports this module)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

_HASH_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB chunks (memory-light)."""
    digest = hashlib.sha256()
    _hash_into(digest, Path(path))
    return digest.hexdigest()


def files_sha256(root: Path, files: Iterable[Path]) -> str:
    """sha256 over several files under `root`: relative path, NUL, contents, in the given order."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(root).as_posix().encode() + b"\0")
        _hash_into(digest, f)
    return digest.hexdigest()


def _hash_into(digest: Any, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)


def array_digest(array: np.ndarray) -> str:
    """Hash of an array's values, shape and dtype, without copying a contiguous array (a
    full-size UNet's weights are GBs): equal digests mean equal weights, laid out alike."""
    a = np.ascontiguousarray(array)
    h = hashlib.blake2b(repr((a.shape, a.dtype.str)).encode(), digest_size=16)
    h.update(a.data.cast("B"))
    return h.hexdigest()
