"""`sd-export --lora-ready`: what run-time LoRA switching needs, kept beside each graph.

A LoRA changes Linear and Conv2d weights of the UNet and text encoder. In the exported
graph those weights are ONNX initializers, but not under their PyTorch names: the
TorchScript exporter folds a Linear's transpose into a new `onnx::MatMul_N` initializer
holding W^T, and an fp16 export holds W in half precision. So each target weight is found
by value (W or W^T, in the initializer's dtype) and recorded with how it is stored:

    <component>/lora_targets.json
      {"schema": 1, "component", "family", "context_dim", "text_width",
       "aliases": {flattened LoRA module name: target},      (kohya, diffusers, ldm names)
       "shapes":  {target: PyTorch weight shape},
       "targets": {target: {"initializer", "transpose", "dtype", "shape",
                            "file", "offset", "length"}},
       "unmapped": [targets found in no initializer, or in one shared with another],
       "unused": [targets of modules the graph never runs (SDXL CLIP-L's last layer)],
       "initializers": {name: {"dtype", "shape", "file", "offset", "length"}}}

The weights go to external data (`model.onnx_data`) so that the runtime reads the base
values of the touched initializers with a numpy memmap at (file, offset, length), never
parsing protobuf and never changing the files: a LoRA set becomes a new session (ONNX
Runtime) or a refit (TensorRT), and the base stays on disk as exported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sd_deploy.engine_dir.hashing import array_digest
from sd_deploy.engine_dir.lora import LORA_TARGETS_NAME
from sd_deploy.models import LoadedModels
from sd_deploy.models.lora import lora_modules, target_table

LORA_TARGETS_SCHEMA = 1
EXTERNAL_DATA_NAME = "model.onnx_data"
FLOATS = {np.dtype(np.float32), np.dtype(np.float16)}


def prepare_lora_ready(onnx_path: Path, models: LoadedModels, component: str) -> list[Path]:
    """Move the graph's weights to external data and write lora_targets.json beside it.

    Returns every file of the component written or rewritten (model.onnx, model.onnx_data,
    lora_targets.json), for the manifest's file list and hashes.
    """
    import onnx
    from onnx import numpy_helper

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=True)
    table = target_table(models)
    modules = lora_modules(models)[component]
    unused_modules: tuple[Any, ...] = getattr(  # torch modules
        getattr(models, component), "unused_modules", tuple
    )()
    dead = {id(m) for unused in unused_modules for m in unused.modules()}
    unused = sorted(target for target, module in modules.items() if id(module) in dead)
    weights = {
        target: module.weight.detach().float().cpu().numpy()
        for target, module in modules.items()
        if id(module) not in dead
    }
    dtypes = {
        np.dtype(onnx.helper.tensor_dtype_to_np_dtype(i.data_type)) for i in model.graph.initializer
    }
    wanted: dict[str, list[tuple[str, bool]]] = {}
    for target, w in weights.items():
        casts = [w if w.dtype == dtype else w.astype(dtype) for dtype in dtypes & FLOATS]
        if np.dtype(np.float16) in dtypes:
            # fp16 exports keep some layers in fp32 (precision policy): fp16-rounded values
            casts.append(w.astype(np.float16).astype(np.float32))
        for cast in casts:
            for view, transpose in [(cast, False)] + ([(cast.T, True)] if cast.ndim == 2 else []):
                hits = wanted.setdefault(array_digest(view), [])
                if (target, transpose) not in hits:
                    hits.append((target, transpose))
        del casts
    found: dict[str, list[tuple[str, bool]]] = {}
    float_types = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    for init in model.graph.initializer:
        if init.data_type not in float_types or len(init.dims) not in (2, 4):
            continue
        array = numpy_helper.to_array(init)
        for target, transpose in wanted.get(array_digest(array), []):
            if (init.name, transpose) not in found.get(target, []):
                found.setdefault(target, []).append((init.name, transpose))
    owners: dict[str, list[str]] = {}
    for target, hits in found.items():
        for name, _ in hits:
            if target not in owners.get(name, []):
                owners.setdefault(name, []).append(target)
    mapping: dict[str, tuple[str, bool]] = {}
    unmapped = []
    for target in weights:
        hits = found.get(target, [])
        if len(hits) == 1 and len(owners[hits[0][0]]) == 1:
            mapping[target] = hits[0]
        else:  # absent (folded away) or ambiguous (equal weights share an initializer)
            unmapped.append(target)

    # onnx appends to an existing external-data file: a >2 GB graph already has one
    # (finalize_onnx), whose contents are in memory now.
    (onnx_path.parent / EXTERNAL_DATA_NAME).unlink(missing_ok=True)
    onnx.save_model(
        model, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=EXTERNAL_DATA_NAME, size_threshold=0,
    )  # fmt: skip
    stored = onnx.load(str(onnx_path), load_external_data=False)
    records = {}
    for init in stored.graph.initializer:
        info = {e.key: e.value for e in init.external_data}
        records[init.name] = {
            "dtype": np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).name,
            "shape": list(init.dims),
            "file": info.get("location"),
            "offset": int(info.get("offset", 0)),
            "length": int(info["length"]) if "length" in info else None,
        }
    targets = {}
    for target, (name, transpose) in mapping.items():
        record = records[name]
        if record["file"] is None:
            unmapped.append(target)
            continue
        targets[target] = {"initializer": name, "transpose": transpose, **record}
    data = table.to_json()
    payload = {
        "schema": LORA_TARGETS_SCHEMA,
        "component": component,
        "family": data["family"],
        "context_dim": data["context_dim"],
        "text_width": data["text_width"],
        "aliases": data["aliases"].get(component, {}),
        "shapes": data["shapes"].get(component, {}),
        "targets": targets,
        "unmapped": sorted(unmapped),
        "unused": unused,
        # every weight by name, for a TensorRT refit that asks for more than the LoRA touched
        "initializers": {n: r for n, r in records.items() if r["file"] is not None},
    }
    targets_path = onnx_path.parent / LORA_TARGETS_NAME
    targets_path.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    return [onnx_path, onnx_path.parent / EXTERNAL_DATA_NAME, targets_path]
