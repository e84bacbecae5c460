"""torch -> ONNX for one component, fp32 or fp16, with external data past 2 GB.

Exporter: the TorchScript-based `torch.onnx.export(dynamo=False)`. It traces the
module in one forward pass, so the full SD 1.5 UNet exports in about half a minute
within a few GB over the model, gives plain opset-17 graphs (Conv, MatMul, Softmax,
LayerNormalization, Resize) that ONNX Runtime and TensorRT's parser both take,
and handles our dynamic axes through `dynamic_axes`. See docs/exporter.md for the
comparison with the dynamo exporter.

FP16: the module itself is converted (`.half()`), so the graph carries exactly the
precision policy of the PyTorch modules: norm statistics, the VAE's attention and
(with upcast_attention) the UNet's attention stay in fp32 as Cast islands.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from sd_deploy.exporter.components import ComponentGraph
from sd_deploy.models.unet import GroupNorm32, LayerNorm32

EXTERNAL_DATA_NAME = "model.onnx_data"
# protobuf refuses messages over 2 GiB; stay clear of it.
EXTERNAL_DATA_THRESHOLD = 2_000_000_000


def upcast_norms(module: nn.Module) -> nn.Module:
    """Swap plain LayerNorm/GroupNorm (e.g. inside transformers' CLIP) for fp32-statistics ones."""
    for name, child in module.named_children():
        if isinstance(child, nn.LayerNorm) and not isinstance(child, LayerNorm32):
            new: nn.Module = LayerNorm32(child.normalized_shape, child.eps)
        elif isinstance(child, nn.GroupNorm) and not isinstance(child, GroupNorm32):
            new = GroupNorm32(child.num_groups, child.num_channels, child.eps)
        else:
            upcast_norms(child)
            continue
        new.load_state_dict(child.state_dict())
        setattr(module, name, new.to(child.weight.dtype))
    return module


def half_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` with fp16 floating tensors, made tensor by tensor: the fp32 module
    is never copied whole first (a full-size SDXL UNet would need 10.3 GB more for that)."""
    memo: dict[int, object] = {}
    for param in module.parameters():
        memo[id(param)] = nn.Parameter(
            param.detach().half() if param.is_floating_point() else param.detach().clone(),
            requires_grad=False,
        )
    for buffer in module.buffers():
        memo[id(buffer)] = (
            buffer.detach().half() if buffer.is_floating_point() else buffer.detach().clone()
        )
    return copy.deepcopy(module, memo)


def export_module(module: nn.Module, fp16: bool) -> nn.Module:
    """The module to trace: a half-precision copy for fp16, the module itself for fp32."""
    if not fp16:
        return module
    return upcast_norms(half_copy(module)).half().eval()


def export_onnx(
    module: nn.Module,
    graph: ComponentGraph,
    example: dict[str, torch.Tensor],
    path: Path,
    opset: int,
) -> None:
    """Trace `module` on `example` and write an ONNX file with dynamic axes at `path`.

    Tensors of a >2 GB model land as many files beside `path`; `finalize_onnx` packs them.
    """
    dynamic_axes: dict[str, dict[int, str]] = {}
    for name, shape in [(i.name, i.shape) for i in graph.inputs] + list(graph.outputs):
        axes = {i: d for i, d in enumerate(shape) if isinstance(d, str)}
        if axes:
            dynamic_axes[name] = axes
    args = tuple(example[i.name] for i in graph.inputs)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # deprecation and tracer chatter, not actionable here
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=[i.name for i in graph.inputs],
            output_names=[name for name, _ in graph.outputs],
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def finalize_onnx(raw_path: Path, final_path: Path, weights_out_in: bool = True) -> list[Path]:
    """Re-save the traced graph as model.onnx (+ one model.onnx_data if over 2 GB).

    `raw_path`'s folder is scratch: each traced tensor file is deleted once packed, so a
    >2 GB graph never takes twice its size on disk (a full-size SD 1.5 UNet: 3.4 GB, not 6.8).
    `weights_out_in`: store MatMul weights as PyTorch holds them (`store_weights_out_in`).
    Returns every file written, for the manifest.
    """
    import onnx

    model = onnx.load(str(raw_path), load_external_data=False)
    transposed = store_weights_out_in(model) if weights_out_in else set()
    if _initializer_bytes(model, raw_path.parent) > EXTERNAL_DATA_THRESHOLD:
        # Streamed tensor by tensor: a full-size SDXL UNet's weights are never all in memory.
        _pack_external_data(
            model, raw_path.parent, final_path.parent / EXTERNAL_DATA_NAME, transposed
        )
        onnx.save_model(model, str(final_path))
        return [final_path, final_path.parent / EXTERNAL_DATA_NAME]
    onnx.load_external_data_for_model(model, str(raw_path.parent))
    _transpose_embedded(model, transposed)
    onnx.save_model(model, str(final_path))
    return [final_path]


def store_weights_out_in(model) -> set[str]:  # model: onnx.ModelProto
    """Declare each MatMul weight [in, out] (how the tracer folds a Linear's W^T) as [out, in]
    (PyTorch's W) behind a Transpose node; returns the initializers whose data must be
    transposed to match, which the caller does as it writes them.

    Why: OpenVINO's CPU plugin folds a [in, out] weight's transpose into a copy of its own in
    the compute precision and keeps it beside the packed copy it computes from: the SD 1.5
    UNet's 0.53 GiB of bf16 weights twice. Behind a Transpose it packs straight from the
    stored (mapped, handed back) weights. ONNX Runtime and TensorRT fold the Transpose when
    they load or build the graph (measured: ONNX Runtime's memory and speed unchanged).
    Only a weight used by nothing but one MatMul's second input is rewritten."""
    import onnx

    graph = model.graph
    if any(a.type in (a.GRAPH, a.GRAPHS) for node in graph.node for a in node.attribute):
        return set()  # control flow: uses inside subgraphs are not counted here
    uses = Counter(name for node in graph.node for name in node.input)
    uses.update(output.name for output in graph.output)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    matrices = {t.name: t for t in graph.initializer if len(t.dims) == 2 and t.data_type in floats}
    nodes, transposed = [], set()
    for node in graph.node:
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else ""
        if weight in matrices and uses[weight] == 1:
            tensor = matrices[weight]
            tensor.dims[:] = tensor.dims[::-1]
            transposed.add(weight)
            stored = f"{weight}_out_in"
            nodes.append(onnx.helper.make_node("Transpose", [weight], [stored], perm=[1, 0]))
            node.input[1] = stored
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return transposed


def _transpose_embedded(model, names: set[str]) -> None:  # model: onnx.ModelProto
    """Transpose the data of the embedded initializers in `names` (dims already swapped);
    external ones are transposed as they are packed."""
    from onnx import TensorProto, numpy_helper

    for tensor in model.graph.initializer:
        if tensor.name in names and tensor.data_location != TensorProto.EXTERNAL:
            rows, cols = tensor.dims
            data = numpy_helper.to_array(tensor).reshape(cols, rows)
            tensor.CopyFrom(numpy_helper.from_array(data.T.copy(), tensor.name))


def _external_info(tensor) -> dict[str, str]:  # tensor: onnx.TensorProto
    return {entry.key: entry.value for entry in tensor.external_data}


def _copy_tensor(info: dict[str, str], base: Path, out) -> int:  # out: a binary file
    """Copy an external tensor's bytes to `out` in chunks; returns how many."""
    copied = 0
    with (base / info["location"]).open("rb") as src:
        src.seek(int(info.get("offset", 0)))
        left = int(info["length"]) if info.get("length") else None
        while left is None or left > 0:
            chunk = src.read(_COPY_CHUNK if left is None else min(left, _COPY_CHUNK))
            if not chunk:
                break
            out.write(chunk)
            copied += len(chunk)
            if left is not None:
                left -= len(chunk)
    return copied


def _initializer_bytes(model, base: Path) -> int:  # model: onnx.ModelProto
    """Bytes of the initializers, embedded or in external files, without reading the files."""
    import onnx

    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = _external_info(tensor)
            length = info.get("length")
            total += int(length) if length else (base / info["location"]).stat().st_size
        else:
            total += len(tensor.raw_data)
    return total


_ALIGN = 4096  # offsets on page boundaries, so the data file can be memory-mapped per tensor
_COPY_CHUNK = 64 << 20


def _pack_external_data(model, base: Path, data_path: Path, transposed: set[str]) -> None:
    """Move every initializer of 1 KiB or more into one external data file, one at a time,
    deleting each source file under `base` that held that tensor alone once it is copied;
    the 2-D ones named in `transposed` are written transposed (their dims already are)."""
    import numpy as np
    import onnx

    external_data = onnx.TensorProto.EXTERNAL
    locations = Counter(
        _external_info(t)["location"] for t in model.graph.initializer
        if t.data_location == external_data
    )  # fmt: skip
    _transpose_embedded(model, transposed)
    offset = 0
    with data_path.open("wb") as out:
        for tensor in model.graph.initializer:
            external = tensor.data_location == external_data
            if not external and len(tensor.raw_data) < 1024:
                continue
            out.write(b"\0" * (-offset % _ALIGN))
            offset += -offset % _ALIGN
            start = offset
            if external:
                info = _external_info(tensor)
                if tensor.name in transposed:  # one weight in memory: <= 52 MB (SDXL)
                    rows, cols = tensor.dims
                    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
                    raw = io.BytesIO()
                    _copy_tensor(info, base, raw)
                    data = np.frombuffer(raw.getbuffer(), dtype).reshape(cols, rows)
                    out.write(data.T.tobytes())
                    offset += data.nbytes
                else:
                    offset += _copy_tensor(info, base, out)
                if locations[info["location"]] == 1:  # torch writes a file per tensor
                    (base / info["location"]).unlink()
            else:
                out.write(tensor.raw_data)
                offset += len(tensor.raw_data)
                tensor.ClearField("raw_data")
            del tensor.external_data[:]
            for key, value in (
                ("location", data_path.name),
                ("offset", str(start)),
                ("length", str(offset - start)),
            ):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
