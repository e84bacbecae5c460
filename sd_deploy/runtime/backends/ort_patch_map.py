"""Patched (run-time LoRA) sessions from ONNX Runtime's optimized-graph cache.

Why: optimizing the full-size SD 1.5 UNet at ORT_ENABLE_ALL takes 7-9 s on this CPU (the
NCHWc rewrite), loading its cached optimized graph 1-2.5 s (measured side by side). A LoRA
switch made a new session from the source graph, so it paid the optimization every time.

The cached graph can take the patched weights instead, if each one can be put where the
optimizer moved it: MatMul / Gemm weights keep their names and bytes; convolution weights
become new initializers holding MLAS's blocked filter layout (OIHW{B}i{B}o, or OIHW{B}o
for a first convolution on few channels, channels zero-padded to the block; B = 16 with
AVX-512, 8 with AVX2). Which is which is found by value, once per cache entry: each base
weight, as stored or in each of those layouts, is matched against the cached graph's
initializers of its size (a sampled fingerprint, then every value). The result is kept in
the entry as `patch_map.json`. A weight not found (another optimizer rewrite, another
CPU's layout) or found twice (identical layers) sends that component back to the source
graph: slower, never wrong. The patched filters are then computed straight into their
blocked layout (`patched_filter`), from the cached graph's own base bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from sd_deploy.engine_dir.atomic import write_atomic
from sd_deploy.runtime.backends.onnx_initializers import ExternalTensor, external_initializers
from sd_deploy.runtime.weight_patch import WeightPatch, aligned_empty, in_parallel

PATCH_MAP_NAME = "patch_map.json"
SCHEMA = 1
BLOCKS = (16, 8)  # MLAS's NCHWc block sizes: AVX-512, AVX2
AS_STORED = "as-stored"


def parse_layout(layout: str) -> tuple[int, bool]:
    """(block size, whether input channels are blocked too) of "OIHW16i16o", "OIHW8o", ..."""
    match = re.fullmatch(r"OIHW(\d+)(i\d+)?o", layout)
    if match is None:
        raise ValueError(f"unknown filter layout {layout!r}")
    return int(match[1]), bool(match[2])


def to_layout(weight: np.ndarray, layout: str) -> np.ndarray:
    """A [O, I, H, W] filter in `layout` ("OIHW16i16o", "OIHW8o", ...), flat; as-stored: as is."""
    if layout == AS_STORED:
        return np.ascontiguousarray(weight).ravel()
    block, inputs_blocked = parse_layout(layout)
    out, fan_in, height, width = weight.shape
    padded_out = -(-out // block) * block
    padded_in = -(-fan_in // block) * block if inputs_blocked else fan_in
    full = weight
    if (padded_out, padded_in) != (out, fan_in):  # zero-padded channels (MLAS's blocks)
        full = np.zeros((padded_out, padded_in, height, width), weight.dtype)
        full[:out, :fan_in] = weight
    if inputs_blocked:  # OIHW{B}i{B}o: input channels blocked too
        tiles = full.reshape(padded_out // block, block, padded_in // block, block, height, width)
        return np.ascontiguousarray(tiles.transpose(0, 2, 4, 5, 3, 1)).ravel()
    tiles = full.reshape(padded_out // block, block, fan_in, height, width)  # OIHW{B}o
    return np.ascontiguousarray(tiles.transpose(0, 2, 3, 4, 1)).ravel()


def patched_filter(patch: WeightPatch, layout: str, cached: np.ndarray) -> np.ndarray:
    """base + up @ down of a [O, I, H, W] filter, computed straight into blocked `layout`
    (`cached`: the base as the cached graph holds it), flat.

    Output block b of OIHW{B}i{B}o is [I/B, H, W, B in, B out]: `down` rearranged to rows
    [I/B * H * W * B in, rank] times up's rows of that block, [rank, B out]. One batched
    matmul writes every block where it belongs; padded channels get zero factors, as MLAS
    zero-pads the filter. OIHW{B}o (a first convolution) is the same with I unblocked."""
    block, inputs_blocked = parse_layout(layout)
    out, fan_in, height, width = patch.base.shape
    rank = patch.up.shape[1]
    out_blocks = -(-out // block)
    up = np.zeros((out_blocks * block, rank), np.float32)
    up[:out] = patch.up
    up_blocks = up.reshape(out_blocks, block, rank).transpose(0, 2, 1)
    down = patch.down.reshape(rank, fan_in, height, width)
    if inputs_blocked:
        in_blocks = -(-fan_in // block)
        if in_blocks * block != fan_in:
            down = np.pad(down, ((0, 0), (0, in_blocks * block - fan_in), (0, 0), (0, 0)))
        rows = down.reshape(rank, in_blocks, block, height, width).transpose(1, 3, 4, 2, 0)
    else:
        rows = down.transpose(1, 2, 3, 0)
    rows = rows.reshape(-1, rank)
    delta = aligned_empty((out_blocks, rows.shape[0], block), np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # `finish` checks risky products
        np.matmul(rows, up_blocks, out=delta)
    return patch.finish(delta, cached).ravel()


def layouts(ndim: int) -> list[str]:
    blocked = [f"OIHW{b}i{b}o" for b in BLOCKS] + [f"OIHW{b}o" for b in BLOCKS]
    return [AS_STORED] + (blocked if ndim == 4 else [])


class PatchMap:
    """Where each source initializer's values sit in one cached optimized graph."""

    def __init__(self, places: dict[str, list], graph: Path) -> None:
        self.places = places  # source name -> [cached name, layout, cached shape]
        self.graph = Path(graph)
        self.tensors = external_initializers(self.graph)

    def covers(self, names: Iterable[str]) -> bool:
        return all(name in self.places for name in names)

    def valid(self) -> bool:
        """Every place names an initializer of the graph, of the recorded shape (a saved map
        is checked before it is trusted)."""
        return all(
            place[0] in self.tensors and list(self.tensors[place[0]].shape) == place[2]
            for place in self.places.values()
        )

    def materialize(
        self, patches: Mapping[str, WeightPatch], workers: int
    ) -> dict[str, np.ndarray]:
        """Cached-graph initializer name -> base + its patch, in its layout and shape. The
        base values are read from the cached graph (conv filters already blocked there, and
        its pages are those the loaded base session maps)."""

        def one(name: str) -> tuple[str, np.ndarray]:
            cached, layout, shape = self.places[name]
            base = self.tensors[cached].read(self.graph.parent)
            if layout == AS_STORED:
                return cached, patches[name].array(base).reshape(shape)
            return cached, patched_filter(patches[name], layout, base).reshape(shape)

        return dict(in_parallel(one, patches, workers))

    @classmethod
    def load_or_build(
        cls,
        entry: Path,
        source_graph: Path,
        wanted: Iterable[str],
        base: Callable[[str], np.ndarray | None],
    ) -> PatchMap:
        """The entry's map, extended by the `wanted` names not in it yet (and saved); a
        saved map that does not fit the entry's graph is built anew."""
        path = Path(entry) / PATCH_MAP_NAME
        patch_map = cls({}, Path(entry) / "model.onnx")
        tried: set[str] = set()
        try:
            saved = json.loads(path.read_text())
            if saved.get("schema") == SCHEMA:
                patch_map.places, tried = dict(saved["places"]), set(saved["tried"])
                if not patch_map.valid():
                    patch_map.places, tried = {}, set()
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
            patch_map.places, tried = {}, set()
        todo = [n for n in wanted if n not in tried]
        if todo:
            patch_map.places.update(find_places(patch_map.graph, source_graph, todo, base))
            tried.update(todo)
            payload = {"schema": SCHEMA, "places": patch_map.places, "tried": sorted(tried)}
            try:
                write_atomic(path, json.dumps(payload, indent=0).encode())
            except OSError:
                pass  # a read-only engine dir: found again next time
        return patch_map


def fingerprint(flat: np.ndarray) -> bytes:
    """A cheap key for picking an array out of same-size candidates: its first 1024 values
    and 4096 evenly strided ones (on a memory-mapped candidate that reads a few pages).
    Hashing every value instead took 11.7 s of a 13.7 s map build for the SD 1.5 UNet; a
    hit is confirmed by comparing every value."""
    step = max(1, flat.size // 4096)
    return flat[:1024].tobytes() + flat[::step][:4096].tobytes()


def find_places(
    cached_graph: Path,
    source_graph: Path,
    names: Iterable[str],
    base: Callable[[str], np.ndarray | None],
) -> dict[str, list]:
    """source name -> [cached name, layout, cached shape] for each of `names` found by value.

    A weight whose values appear in more than one cached initializer (two identical layers,
    e.g. zero-initialized ones) is left out: patching the wrong twin would be silent."""
    cached = external_initializers(cached_graph)
    source = external_initializers(source_graph)
    folder = Path(cached_graph).parent
    # the optimizer's new initializers, by element count, then fingerprint (lazily per count)
    new = [t for n, t in cached.items() if n not in source]
    by_count: dict[int, list[ExternalTensor]] = {}
    for tensor in new:
        by_count.setdefault(int(np.prod(tensor.shape)), []).append(tensor)
    keyed: dict[int, dict[bytes, list[ExternalTensor]]] = {}
    found: dict[str, list] = {}
    for name in names:
        values = base(name)
        if values is None:
            continue
        same = cached.get(name)
        if same is not None and same.shape == values.shape:
            if np.array_equal(same.read(folder), values):
                found[name] = [name, AS_STORED, list(same.shape)]
            continue  # kept under its name with other values: a rewrite we cannot follow
        for layout in layouts(values.ndim)[1:]:
            flat = to_layout(np.asarray(values), layout)
            candidates = by_count.get(flat.size, [])
            if not candidates:
                continue
            if flat.size not in keyed:
                keyed[flat.size] = {}
                for tensor in candidates:
                    key = fingerprint(tensor.read(folder).ravel())
                    keyed[flat.size].setdefault(key, []).append(tensor)
            hits = [
                t
                for t in keyed[flat.size].get(fingerprint(flat), [])
                if np.array_equal(t.read(folder).ravel(), flat)
            ]
            if len(hits) == 1:
                found[name] = [hits[0].name, layout, list(hits[0].shape)]
            if hits:
                break  # found, or found twice (ambiguous: left to the source path)
    return found
