"""sd-export's library side: graphs, validation, manifest, atomicity and refusals."""

from __future__ import annotations

import errno
import json
import os
import stat

import numpy as np
import onnx
import pytest

from sd_deploy.engine_dir import shapes
from sd_deploy.engine_dir.layout import COMPONENTS as ALL_COMPONENTS
from sd_deploy.engine_dir.layout import SECOND_TEXT_ENCODER
from sd_deploy.engine_dir.manifest import read_manifest
from sd_deploy.errors import ExportError, UserError
from sd_deploy.exporter import export as export_module
from sd_deploy.exporter import export_engine_dir, onnx_export

# An SD 1.x / 2.x engine dir's components: every one but SDXL's second text tower.
COMPONENTS = tuple(c for c in ALL_COMPONENTS if c != SECOND_TEXT_ENCODER)

ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT32: "int32",
}


def graph_io(path):
    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        out = []
        for v in values:
            dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            out.append((v.name, ONNX_DTYPES[v.type.tensor_type.elem_type], dims))
        return out

    return describe(model.graph.input), describe(model.graph.output)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_every_component_exports_validates_and_is_described(
    precision, tiny_engine_fp32, tiny_engine_fp16
):
    root = tiny_engine_fp32 if precision == "fp32" else tiny_engine_fp16
    manifest = read_manifest(root, require=COMPONENTS)
    assert manifest.model.family == "tiny"
    assert (root / "tokenizer" / "vocab.json").is_file()
    for name in COMPONENTS:
        spec = manifest.components[name]
        assert spec.precision == precision
        v = spec.validation
        assert v["validated"] and len(v["cases"]) == 2
        assert v["max_rel_l2"] <= {"fp32": 1e-4, "fp16": 1e-2}[precision]
        # fp16 is genuinely lossy: an fp16 graph matching fp32 to 1e-6 would mean it is not fp16.
        if precision == "fp16":
            assert v["max_rel_l2"] > 1e-5
        inputs, outputs = graph_io(root / spec.onnx)
        assert [(n, d) for n, d, _ in inputs] == [(t.name, t.dtype) for t in spec.inputs]
        assert [(n, d) for n, d, _ in outputs] == [(t.name, t.dtype) for t in spec.outputs]
        for (_, _, dims), t in zip(inputs, spec.inputs, strict=True):
            # Symbolic axes in the manifest are dynamic in the graph.
            assert [isinstance(d, str) for d in dims] == [isinstance(d, str) for d in t.shape]
        lo = spec.profile_shapes[spec.inputs[0].name]["min"]
        hi = spec.profile_shapes[spec.inputs[0].name]["max"]
        assert all(a <= b for a, b in zip(lo, hi, strict=True))


def test_io_contract_names_and_dtypes(tiny_engine_fp16):
    m = read_manifest(tiny_engine_fp16, require=COMPONENTS)
    io = {
        n: ([(t.name, t.dtype) for t in c.inputs], [t.name for t in c.outputs])
        for n, c in m.components.items()
    }
    # clip_skip: A1111's Clip skip chosen at run time (SD 1.x graphs; SD 2.x has none)
    assert io["text_encoder"] == (
        [("input_ids", "int32"), ("clip_skip", "int32")],
        ["text_embeddings"],
    )
    assert io["unet"] == (
        [("sample", "float16"), ("timestep", "float32"), ("encoder_hidden_states", "float16")],
        ["model_output"],
    )
    assert io["vae_decoder"] == ([("latent", "float16")], ["images"])
    assert io["vae_encoder"] == ([("images", "float16")], ["latent_mean", "latent_std"])
    unet = m.components["unet"]
    # guidance doubles the UNet batch; the minimum is one unguided image
    assert unet.profile_shapes["sample"]["max"][0] == 2 * unet.shape_ranges.batch.max
    assert unet.profile_shapes["sample"]["min"][0] == unet.shape_ranges.batch.min


def test_fp16_graph_keeps_norm_statistics_in_fp32(tiny_engine_fp16):
    model = onnx.load(str(tiny_engine_fp16 / "unet" / "model.onnx"))
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    norms = [
        n for n in model.graph.node if n.op_type in ("InstanceNormalization", "LayerNormalization")
    ]
    assert norms
    for node in norms:
        assert types[node.input[0]] == onnx.TensorProto.FLOAT, node.name
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert all(types[n.input[1]] == onnx.TensorProto.FLOAT16 for n in convs)


def test_external_data_is_one_file_and_validates(tmp_path, tiny_models, monkeypatch):
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    m = export_engine_dir(tiny_models, tmp_path / "e", components=["vae_decoder"], progress=False)
    spec = m.components["vae_decoder"]
    assert spec.files == ["vae_decoder/model.onnx", "vae_decoder/model.onnx_data"]
    assert sorted(p.name for p in (tmp_path / "e" / "vae_decoder").iterdir()) == [
        "model.onnx",
        "model.onnx_data",
    ]
    assert spec.validation["max_rel_l2"] <= 1e-4


def test_every_file_written_honours_the_umask(tmp_path, tiny_models, monkeypatch):
    """A service running as another user must be able to read an engine dir: no 0600 files
    (safetensors, tempfile and external-data writers create them) whatever the umask."""
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)  # model.onnx_data too
    old = os.umask(0o027)
    try:
        export_engine_dir(tiny_models, tmp_path / "e", components=["vae_decoder"], progress=False)
    finally:
        os.umask(old)
    modes = {
        p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
        for p in (tmp_path / "e").rglob("*")
    }
    assert "e/vae_decoder/model.onnx_data" in modes and "e/manifest.json" in modes
    wrong = {
        name: oct(mode)
        for name, mode in modes.items()
        if mode != (0o750 if (tmp_path / name).is_dir() else 0o640)
    }
    assert not wrong
    assert stat.S_IMODE((tmp_path / "e").stat().st_mode) == 0o750


def test_update_keeps_other_components_of_the_same_model(tmp_path, tiny_models):
    out = tmp_path / "e"
    export_engine_dir(tiny_models, out, components=["unet"], progress=False)
    before = (out / "unet" / "model.onnx").read_bytes()
    m = export_engine_dir(tiny_models, out, components=["vae_decoder"], fp16=True, progress=False)
    assert set(m.components) == {"unet", "vae_decoder"}
    assert m.components["unet"].precision == "fp32"
    assert (out / "unet" / "model.onnx").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_other_model_is_refused_without_force(tmp_path, tiny_models):
    from sd_deploy.models import build_random, get_preset

    out = tmp_path / "e"
    export_engine_dir(tiny_models, out, components=["vae_decoder"], progress=False)
    other = build_random(get_preset("tiny"), seed=1)
    with pytest.raises(ExportError, match="another model.*--force"):
        export_engine_dir(other, out, components=["vae_decoder"], progress=False)
    assert read_manifest(out, require=()).provenance["source"] == tiny_models.source
    m = export_engine_dir(other, out, components=["vae_decoder"], force=True, progress=False)
    assert m.provenance["source"] == other.source


def test_non_engine_folder_is_never_replaced(tmp_path, tiny_models):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    for force in (False, True):
        with pytest.raises(ExportError, match="not an engine dir"):
            export_engine_dir(
                tiny_models, out, components=["vae_decoder"], force=force, progress=False
            )
    assert (out / "holiday.jpg").read_bytes() == b"precious"


def test_interrupted_export_leaves_no_engine_dir(tmp_path, tiny_models, monkeypatch):
    real = export_module.export_component
    calls = []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(export_module, "export_component", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        export_engine_dir(tiny_models, tmp_path / "e", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_failed_validation_exports_nothing(tmp_path, tiny_models, monkeypatch):
    from sd_deploy.exporter import validate

    monkeypatch.setitem(validate.TOLERANCE, "fp16", 1e-9)
    with pytest.raises(ExportError, match=r"differs from PyTorch.*--no-validate"):
        export_engine_dir(
            tiny_models, tmp_path / "e", components=["unet"], fp16=True, progress=False
        )
    assert list(tmp_path.iterdir()) == []
    m = export_engine_dir(
        tiny_models, tmp_path / "e", components=["unet"], fp16=True, validate=False, progress=False
    )
    assert m.components["unet"].validation == {"validated": False, "reason": "--no-validate"}
    assert (
        json.loads((tmp_path / "e" / "manifest.json").read_text())["provenance"]["validated"]
        is False
    )


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, tiny_models, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_module, "finalize_onnx", full)
    with pytest.raises(ExportError, match="disk full") as info:
        export_engine_dir(tiny_models, tmp_path / "e", components=["vae_decoder"], progress=False)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"height": "60:64:128"}, "not a multiple of 8"),
        ({"width": "64:32:128"}, "inverted"),
        ({"batch": "0:1:2"}, "positive"),
        ({"height": "a:b:c"}, "integers"),
        ({"batch": "1:2"}, "MIN:OPT:MAX"),
    ],
)
def test_bad_ranges(flags, message):
    base = shapes.default_ranges(64)
    with pytest.raises(UserError, match=message):
        shapes.override(base, flags.get("batch"), flags.get("height"), flags.get("width"))


def test_unknown_component(tiny_models, tmp_path):
    with pytest.raises(ExportError, match="unknown component 'vae'.*text_encoder"):
        export_engine_dir(tiny_models, tmp_path / "e", components=["vae"], progress=False)


def test_validation_inputs_are_seeded_and_realistic():
    from sd_deploy.exporter.components import sample_inputs

    class G:
        inputs = (type("I", (), {"name": "input_ids", "shape": (), "kind": "int32"})(),)

        @staticmethod
        def input_dtype(i, fp16):
            return "int32"

    a = sample_inputs(G, {"input_ids": [3, 77]}, False, seed=5)["input_ids"]
    b = sample_inputs(G, {"input_ids": [3, 77]}, False, seed=5)["input_ids"]
    np.testing.assert_array_equal(a, b)
    assert (a[:, 0] == 49406).all() and (a == 49407).any(axis=1).all()
