"""One exported weight plus the low-rank updates of the LoRAs on it, computed only when a
backend asks, in the layout that backend keeps the weight in.

Why lazy: ONNX Runtime's cached optimized graph keeps convolution filters in MLAS's
blocked layout, and computing base + up @ down straight into that layout
(`ort_patch_map.patched_filter`) skips a transposing pass over every filter and a second
copy of it. A TensorRT refit takes the stored layout (`array`).

Every array made here is page-aligned: ONNX Runtime runs weights given through
`add_initializer` where they lie, and numpy's own large arrays start 16 bytes past a page
boundary, which made the SD 1.5 UNet's steps 13% slower (2.36 vs 2.09 s, interleaved).
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from sd_deploy.engine_dir.lora import LoraError, LoraLayer, overflow_message

ALIGNMENT = mmap.PAGESIZE
T = TypeVar("T")
R = TypeVar("R")


def aligned_empty(shape: Sequence[int], dtype: np.dtype | type) -> np.ndarray:
    """An uninitialized C-contiguous array in its own anonymous mapping: page-aligned, and
    in small pages (numpy asks for transparent huge pages for large arrays; on this VM
    first touching 3.4 GB of them took 2.5-22 s, of small pages 1.8-2.3 s)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    if count == 0:
        return np.empty(tuple(shape), dtype)
    size = count * dtype.itemsize
    private = getattr(mmap, "MAP_PRIVATE", None)  # POSIX; Windows' anonymous maps are private
    pages = mmap.mmap(-1, size) if private is None else mmap.mmap(-1, size, flags=private)
    return np.frombuffer(pages, dtype, count).reshape(tuple(shape))


def in_parallel(fn: Callable[[T], R], items: Iterable[T], workers: int) -> list[R]:
    """`fn` over `items`, `workers` at a time (numpy releases the GIL in matmuls and adds)."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(fn, items))


def stored_arrays(patches: Mapping[str, WeightPatch], workers: int) -> dict[str, np.ndarray]:
    """name -> base + its patch in the stored layout, `workers` at a time."""
    return dict(
        zip(patches, in_parallel(WeightPatch.array, patches.values(), workers), strict=True)
    )


@dataclass(frozen=True)
class WeightPatch:
    """base + up @ down, for one initializer. The ranks of every LoRA on it sit side by side
    in `up` and `down` (a sum of low-rank products is one product of the concatenation)."""

    base: np.ndarray  # the exported initializer as stored (a read-only memmap)
    up: np.ndarray  # [out, rank] float32, each LoRA's scale applied
    down: np.ndarray  # [rank, in * kh * kw] float32
    transpose: bool  # a Linear exported as MatMul: stored [in, out]
    risky: tuple[str, ...]  # keys of the LoRA layers whose up @ down may overflow float32

    @classmethod
    def of(
        cls, base: np.ndarray, transpose: bool, layers: Sequence[tuple[LoraLayer, float]]
    ) -> WeightPatch:
        """The patch of `layers` ((LoRA layer, user scale), ...) on `base`."""
        factors = [layer.factors(scale) for layer, scale in layers]
        up = np.concatenate([f[0] for f in factors], axis=1)
        down = np.concatenate([f[1] for f in factors], axis=0)
        risky = tuple(layer.key for (layer, _), f in zip(layers, factors, strict=True) if f[2])
        return cls(base, up, down, transpose, risky)

    def array(self, base: np.ndarray | None = None) -> np.ndarray:
        """base + up @ down in the stored layout and dtype (`base`: the same values read from
        elsewhere, e.g. pages a loaded session already holds)."""
        delta = aligned_empty(self.base.shape, np.float32)
        left, right = (self.down.T, self.up.T) if self.transpose else (self.up, self.down)
        with np.errstate(over="ignore", invalid="ignore"):  # `finish` checks risky products
            np.matmul(left, right, out=delta.reshape(left.shape[0], -1))
        return self.finish(delta, self.base if base is None else base)

    def finish(self, delta: np.ndarray, base: np.ndarray) -> np.ndarray:
        """`delta` (float32, any layout) + `base` (the same values in that layout), in the
        initializer's dtype: in place when that is float32."""
        if self.risky and not np.isfinite(delta).all():
            raise LoraError(overflow_message(self.risky[0]))
        np.add(delta, base.reshape(delta.shape), out=delta)
        if self.base.dtype == np.float32:
            return delta
        result = aligned_empty(delta.shape, self.base.dtype)
        result[...] = delta
        return result
