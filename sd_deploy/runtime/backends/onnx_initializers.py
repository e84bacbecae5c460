"""The initializers of an ONNX graph whose weights are external: names, types, shapes and
where their bytes lie, read from the protobuf directly.

Why not the `onnx` package: the runtime must not need it (a serving install has numpy and
ONNX Runtime only), and only five fields of three messages matter here. Inline tensors
(`raw_data`) are skipped: the weights this is for are the large ones, always external.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# TensorProto.DataType -> numpy, for the float types numpy has.
DTYPES: dict[int, type[np.floating]] = {1: np.float32, 10: np.float16, 11: np.float64}
# Field numbers (onnx.proto3): ModelProto.graph, GraphProto.initializer, TensorProto.*
MODEL_GRAPH, GRAPH_INITIALIZER = 7, 5
TENSOR_DIMS, TENSOR_TYPE, TENSOR_NAME, TENSOR_EXTERNAL = 1, 2, 8, 13


@dataclass(frozen=True)
class ExternalTensor:
    name: str
    data_type: int
    shape: tuple[int, ...]
    file: str
    offset: int
    length: int

    def read(self, folder: Path) -> np.ndarray:
        """Its values, memory-mapped read-only from the external file in `folder`."""
        dtype = np.dtype(DTYPES[self.data_type])
        raw = np.memmap(Path(folder) / self.file, mode="r", offset=self.offset, shape=self.length)
        return raw.view(dtype).reshape(self.shape)


def _varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or malformed protobuf")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes | memoryview):
    """(field number, wire type, value) of one message: ints for varints, memoryviews for
    length-delimited fields; fixed-width fields are skipped."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, wire, value
        elif wire == 2:
            size, pos = _varint(data, pos)
            yield number, wire, data[pos : pos + size]
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _tensor(data: memoryview) -> ExternalTensor | None:
    """One TensorProto's record; None if it is inline or not a weight type. A field of an
    unexpected wire type is skipped, as protobuf readers do with unknown fields."""
    name, data_type, dims, external = "", 0, [], {}
    for number, wire, value in _fields(data):
        if number == TENSOR_NAME and wire == 2:
            name = bytes(value).decode()
        elif number == TENSOR_TYPE and wire == 0:
            data_type = value
        elif number == TENSOR_DIMS and wire == 0:
            dims.append(value)
        elif number == TENSOR_DIMS and wire == 2:  # packed
            pos = 0
            while pos < len(value):
                dim, pos = _varint(value, pos)
                dims.append(dim)
        elif number == TENSOR_EXTERNAL and wire == 2:
            entry = {n: bytes(v).decode() for n, kind, v in _fields(value) if kind == 2}
            external[entry.get(1, "")] = entry.get(2, "")
    if "location" not in external or "length" not in external or data_type not in DTYPES:
        return None
    offset = int(external.get("offset", 0))
    return ExternalTensor(
        name, data_type, tuple(dims), external["location"], offset, int(external["length"])
    )


def external_initializers(path: Path) -> dict[str, ExternalTensor]:
    """name -> ExternalTensor for every external initializer of the graph at `path`."""
    data = memoryview(Path(path).read_bytes())
    found: dict[str, ExternalTensor] = {}
    for number, wire, graph in _fields(data):
        if number != MODEL_GRAPH or wire != 2:
            continue
        for field, kind, value in _fields(graph):
            if field == GRAPH_INITIALIZER and kind == 2:
                tensor = _tensor(value)
                if tensor is not None:
                    found[tensor.name] = tensor
    return found
