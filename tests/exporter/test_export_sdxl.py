"""SDXL export (tiny-xl, fp16): five graphs validated against PyTorch, the VAE kept fp32, the
manifest describing the extra UNet inputs, the second tokenizer and the zeroed negative."""

from __future__ import annotations

import json

import pytest

from sd_deploy.engine_dir.manifest import read_manifest
from sd_deploy.errors import ExportError
from sd_deploy.exporter import export_engine_dir, resolve_components
from sd_deploy.models import load_models


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    models = load_models("tiny-xl", random_init=True, seed=3)
    out = tmp_path_factory.mktemp("xl") / "engines"
    export_engine_dir(models, out, fp16=True, progress=False)
    return out


def test_fp16_export_validates_every_sdxl_graph_and_keeps_the_vae_fp32(exported) -> None:
    manifest = read_manifest(exported)
    assert list(manifest.components) == [
        "text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"
    ]  # fmt: skip
    precision = {n: c.precision for n, c in manifest.components.items()}
    assert precision == {
        "text_encoder": "fp16", "text_encoder_2": "fp16", "unet": "fp16",
        "vae_decoder": "fp32", "vae_encoder": "fp32",
    }  # fmt: skip
    for spec in manifest.components.values():
        assert spec.validation["validated"], spec.name
        assert spec.validation["max_rel_l2"] <= spec.validation["tolerance_rel_l2"]
    unet = manifest.components["unet"]
    inputs = {t.name: (t.dtype, t.shape) for t in unet.inputs}
    assert inputs["encoder_hidden_states"] == ("float16", ["cfg_batch", "context_length", 96])
    assert inputs["text_embeds"] == ("float16", ["cfg_batch", 64])
    assert inputs["time_ids"] == ("float32", ["cfg_batch", 6])
    assert unet.profile_shapes["time_ids"]["max"] == [8, 6]
    outputs = [t.name for t in manifest.components["text_encoder_2"].outputs]
    assert outputs == ["text_embeddings", "text_embeds"]


def test_manifest_describes_the_sdxl_conditioning(exported) -> None:
    data = json.loads((exported / "manifest.json").read_text())
    assert data["schema_version"] == 1
    model = data["model"]
    assert model["family"] == "tiny-xl" and model["scaling_factor"] == 0.13025
    assert model["text_embed_dim"] == 96 and model["pooled_embed_dim"] == 64
    assert model["time_ids"][0] == "original_height" and len(model["time_ids"]) == 6
    assert model["zero_negative_for_empty_prompt"] is True
    assert data["tokenizer"]["pad_token_id"] == 49407
    assert data["tokenizer_2"] == {**data["tokenizer"], "path": "tokenizer_2", "pad_token_id": 0}
    assert (exported / "tokenizer_2" / "vocab.json").is_file()
    assert "text_embeds" in data["io_conventions"]["unet"]


def test_text_encoder_2_is_sdxl_only() -> None:
    assert resolve_components(["all"], ("text_encoder", "unet")) == ["text_encoder", "unet"]
    with pytest.raises(ExportError, match="SDXL's only"):
        resolve_components(["text_encoder_2"], ("text_encoder", "unet"))


def test_finalize_streams_external_tensors_into_one_aligned_file(tmp_path, monkeypatch) -> None:
    """Past 2 GB (the full-size SDXL UNet) the traced graph's per-tensor files are packed into
    one model.onnx_data tensor by tensor, each file deleted once packed; here with the
    threshold at 0."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from sd_deploy.exporter import onnx_export

    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((16, 16)).astype(np.float32) for _ in range(3)]
    nodes, previous = [], "x"
    for i in range(3):
        nodes.append(helper.make_node("MatMul", [previous, f"w{i}"], [f"h{i}"]))
        previous = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, [2, 16])],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)],
    )
    raw = tmp_path / "raw" / "model.onnx"
    raw.parent.mkdir()
    onnx.save_model(
        helper.make_model(graph), str(raw), save_as_external_data=True,
        all_tensors_to_one_file=False, size_threshold=0,
    )  # fmt: skip
    final = tmp_path / "out" / "model.onnx"
    final.parent.mkdir()
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    files = onnx_export.finalize_onnx(raw, final)
    assert [f.name for f in files] == ["model.onnx", "model.onnx_data"]
    assert sorted(p.name for p in final.parent.iterdir()) == ["model.onnx", "model.onnx_data"]
    assert [p.name for p in raw.parent.iterdir()] == ["model.onnx"]  # tensor files packed away
    offsets = [
        int({e.key: e.value for e in t.external_data}["offset"])
        for t in onnx.load(str(final), load_external_data=False).graph.initializer
    ]
    assert all(o % 4096 == 0 for o in offsets)
    x = rng.standard_normal((2, 16)).astype(np.float32)
    got = ort.InferenceSession(str(final)).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ weights[0] @ weights[1] @ weights[2], rtol=1e-5)


@pytest.mark.parametrize("fp16", [True, False])
def test_big_fp32_references_are_parked_on_disk_while_another_copy_is_in_memory(
    tmp_path, monkeypatch, fp16
):
    """Past SPILL_BYTES (the full-size SDXL UNet) the fp32 module leaves memory while its fp16
    copy is traced and packed, and while ONNX Runtime validates the graph (fp16 and fp32), and
    comes back unchanged each time (threshold 0 here)."""
    import torch

    from sd_deploy.exporter import export as export_code

    models = load_models("tiny-xl", random_init=True, seed=4)
    before = {k: v.clone() for k, v in models.unet.state_dict().items()}
    seen = []
    spill = export_code.spill_reference

    def spy(reference, path):
        seen.append(spill(reference, path))
        assert all(p.is_meta for p in reference.parameters())  # freed meanwhile
        return seen[-1]

    monkeypatch.setattr(export_code, "SPILL_BYTES", 0)
    monkeypatch.setattr(export_code, "spill_reference", spy)
    manifest = export_engine_dir(
        models, tmp_path / "e", components=["unet"], fp16=fp16, progress=False
    )
    assert len(seen) == (2 if fp16 else 1)  # tracing (fp16 only), then validation
    assert all(path is not None and not path.exists() for path in seen)
    assert manifest.components["unet"].validation["validated"]
    after = models.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not list((tmp_path / "e").glob(".*safetensors"))
