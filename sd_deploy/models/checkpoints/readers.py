"""Lazy, safe access to the tensors of one weights file (or one sharded set).

- The format is told from the file's first bytes; the extension only has to be one we know.
- `.safetensors` is memory-mapped; each tensor is read when its module parameter is filled.
- `.ckpt`/`.pt`/`.pth`/`.bin` go through `torch.load(weights_only=True)` (memory-mapped for
  zip archives): a pickle that needs more than tensors and plain containers is refused,
  because unpickling arbitrary objects can run code. `state_dict` nesting is unwrapped and
  non-tensor entries (`global_step` ...) are kept as extras.
"""

from __future__ import annotations

import io
import os
import re
import struct
from pathlib import Path
from typing import Any

import torch

from sd_deploy.errors import CheckpointError
from sd_deploy.models.checkpoints.messages import one_line

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# Re-map a memory-mapped file (safetensors or zip .ckpt) after this many bytes were read from it,
# so pages already copied into the modules stop counting towards resident memory.
_REMAP_BYTES = 256 << 20


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in t)


class Reader:
    """Lazy access to one checkpoint's tensors: names and shapes up front, data on demand."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]
    extras: dict[str, Any]  # non-tensor entries (global_step, epoch ...)

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _SafetensorsReader(Reader):
    """`safe_open`'s memory map, opened afresh every `_REMAP_BYTES` read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.extras = {}
        self._handle: Any = None
        self._read_since_open = 0
        handle = self._open()
        try:
            self.metadata = dict(handle.metadata() or {})
            self.shapes = {k: _shape(handle.get_slice(k).get_shape()) for k in handle.keys()}
        except Exception as e:  # any reader failure means a broken file
            self.close()
            raise CheckpointError(f"{path}: cannot read safetensors header: {one_line(e)}") from e

    def _open(self) -> Any:
        from safetensors import safe_open

        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as e:  # SafetensorError, OSError ...
            raise CheckpointError(
                f"{self.path} is not a valid safetensors file (truncated or corrupted?): "
                f"{one_line(e)}"
            ) from e
        self._read_since_open = 0
        return self._handle

    def get(self, key: str) -> torch.Tensor:
        if self._handle is None or self._read_since_open > _REMAP_BYTES:
            self.close()
            self._open()
        try:
            tensor = self._handle.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {key}: {one_line(e)}") from e
        self._read_since_open += tensor.numel() * tensor.element_size()
        return tensor

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.__exit__(None, None, None)


class _TorchReader(Reader):
    """`torch.load(weights_only=True)`; zip archives are memory-mapped, re-mapped as read."""

    def __init__(self, path: Path, zip_archive: bool) -> None:
        self.path = path
        self.metadata = {}
        self._mmap = zip_archive
        self._tensors, self.extras = self._load()
        if not self._tensors:
            raise CheckpointError(f"{path} is not a checkpoint: it holds no tensors")
        self.shapes = {k: _shape(v.shape) for k, v in self._tensors.items()}
        self._read_since_load = 0

    def _load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        import pickle

        path = self.path
        source: Any = path if self._mmap else BoundedFile(path)
        try:
            obj = torch.load(source, map_location="cpu", weights_only=True, mmap=self._mmap)
        except pickle.UnpicklingError as e:
            text = str(e)
            found = re.search(r"GLOBAL ([\w.]+)", text)
            if found or "global" in text.lower():
                what = f" ({found.group(1)})" if found else ""
                raise CheckpointError(
                    f"{path} needs Python objects beyond tensors to unpickle{what}, and "
                    "unpickling arbitrary objects can execute code: refusing to load it; "
                    "convert it to .safetensors with a tool you trust"
                ) from e
            raise CheckpointError(
                f"{path} is not a PyTorch checkpoint (corrupted or not a weights file): "
                f"{one_line(text.split('WeightsUnpickler error:')[-1])}"
            ) from e
        except MemoryError:
            raise
        except Exception as e:  # RuntimeError, EOFError, SafetensorError ...: a broken file
            raise CheckpointError(
                f"{path} cannot be read as a PyTorch checkpoint (truncated or corrupted?): "
                f"{one_line(e)}"
            ) from e
        finally:
            if source is not path:
                source.close()
        extras: dict[str, Any] = {}
        while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            extras.update({k: v for k, v in obj.items() if k != "state_dict"})
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(
                f"{path} is not a checkpoint: it holds a {type(obj).__name__}, "
                "not a dict of tensors"
            )
        extras.update({k: v for k, v in obj.items() if isinstance(v, int | float | str | bool)})
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, extras

    def get(self, key: str) -> torch.Tensor:
        if self._mmap and self._read_since_load > _REMAP_BYTES:
            # A fresh mapping; the old one (and its resident pages) goes with its last tensor.
            self._tensors, _ = self._load()
            self._read_since_load = 0
        tensor = self._tensors[key]
        self._read_since_load += tensor.numel() * tensor.element_size()
        return tensor

    def close(self) -> None:
        self._tensors = {}


class BoundedFile(io.FileIO):
    """A file whose read(n) asks for at most what is left in it: a legacy pickle of 15 bytes
    claiming a 4 GB string must not make Python allocate 4 GB before it finds the end."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "rb")
        self._size = os.fstat(self.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size >= 0:
            size = min(size, max(self._size - self.tell(), 0))
        return super().read(size)


class MultiReader(Reader):
    """Several files of one component (sharded diffusers weights) seen as one."""

    def __init__(self, path: Path, readers: list[Reader]) -> None:
        self.path = path
        self.readers = readers
        self.metadata = {}
        self.extras = {}
        self.shapes = {}
        self._owner: dict[str, Reader] = {}
        for reader in readers:
            for key, shape in reader.shapes.items():
                if key in self._owner:
                    raise CheckpointError(
                        f"{path}: tensor {key} is in both {self._owner[key].path.name} "
                        f"and {reader.path.name}"
                    )
                self._owner[key] = reader
                self.shapes[key] = shape

    def get(self, key: str) -> torch.Tensor:
        return self._owner[key].get(key)

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


def open_weights_file(path: Path) -> Reader:
    """Open a single weights file, telling safetensors from PyTorch by its first bytes."""
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise CheckpointError(
            f"{path}: unknown checkpoint type {path.suffix or '(no extension)'!r}; expected a "
            f"{', '.join(SINGLE_FILE_SUFFIXES)} file or a diffusers folder"
        )
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {one_line(e)}") from e
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint")
    if head[:4] == b"PK\x03\x04":
        return _TorchReader(path, zip_archive=True)
    if len(head) >= 9 and head[8:9] == b"{":
        header_len = struct.unpack("<Q", head[:8])[0]
        if header_len > size - 8:
            raise CheckpointError(
                f"{path} is not a valid safetensors file (truncated or corrupted?): its header "
                f"claims {header_len} bytes but the file has {size}"
            )
        return _SafetensorsReader(path)
    if head[:1] == b"\x80":  # a pickle (legacy, non-zip torch.save format)
        return _TorchReader(path, zip_archive=False)
    raise CheckpointError(
        f"{path} is not a checkpoint: neither safetensors nor a PyTorch archive or pickle "
        f"(starts with {head[:12]!r})"
    )
