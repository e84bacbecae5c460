"""MatMul weights stored [out, in] behind a Transpose (`onnx_export.store_weights_out_in`):
exact in both packing paths, only where a weight feeds one MatMul alone, and in every
exported graph but the run-time LoRA ones (whose weights are patched by name)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from sd_deploy.exporter import onnx_export  # noqa: E402


def _graph(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x @ w0 @ shared @ shared + bias, then h @ h^T (an activation, not a weight)."""
    weights = {
        "w0": rng.standard_normal((16, 24)).astype(np.float32),
        "shared": rng.standard_normal((24, 24)).astype(np.float32),
        "bias": rng.standard_normal((24,)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h0"]),
        helper.make_node("MatMul", ["h0", "shared"], ["h1"]),
        helper.make_node("MatMul", ["h1", "shared"], ["h2"]),
        helper.make_node("Add", ["h2", "bias"], ["h3"]),
        helper.make_node("Transpose", ["h3"], ["h3t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h3", "h3t"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        [numpy_helper.from_array(w, name) for name, w in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), weights


@pytest.mark.parametrize("external", [False, True])
def test_single_use_matmul_weights_are_stored_out_in_and_the_graph_computes_the_same(
    tmp_path: Path, monkeypatch, external: bool
) -> None:
    rng = np.random.default_rng(0)
    model, weights = _graph(rng)
    raw = tmp_path / "raw" / "model.onnx"
    raw.parent.mkdir()
    onnx.save_model(
        model, str(raw), save_as_external_data=True, all_tensors_to_one_file=False,
        size_threshold=0,
    )  # fmt: skip
    final = tmp_path / "out" / "model.onnx"
    final.parent.mkdir()
    if external:
        monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    files = onnx_export.finalize_onnx(raw, final)
    assert [f.name for f in files] == ["model.onnx"] + ["model.onnx_data"] * external

    out = onnx.load(str(final))
    onnx.checker.check_model(out)
    stored = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_array_equal(stored["w0"], weights["w0"].T)  # [out, in]
    np.testing.assert_array_equal(stored["shared"], weights["shared"])  # two MatMuls use it
    np.testing.assert_array_equal(stored["bias"], weights["bias"])
    transposes = [n for n in out.graph.node if n.op_type == "Transpose"]
    assert [(n.input[0], n.output[0]) for n in transposes] == [("w0", "w0_out_in"), ("h3", "h3t")]

    x = rng.standard_normal((2, 16)).astype(np.float32)
    h = x @ weights["w0"] @ weights["shared"] @ weights["shared"] + weights["bias"]
    got = ort.InferenceSession(str(final)).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, h @ h.T, rtol=1e-5)  # the same float32 products


def test_the_rewrite_can_be_turned_off(tmp_path: Path) -> None:
    model, _ = _graph(np.random.default_rng(0))
    raw = tmp_path / "raw.onnx"
    onnx.save_model(model, str(raw))
    onnx_export.finalize_onnx(raw, tmp_path / "model.onnx", weights_out_in=False)
    assert onnx.load(str(tmp_path / "model.onnx")).graph == model.graph


def _matmul_weights(path: Path) -> tuple[int, int]:
    """(MatMuls reading a 2-D initializer directly, MatMuls reading one through a Transpose)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    matrices = {t.name for t in graph.initializer if len(t.dims) == 2}
    transposed = {
        n.output[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in matrices
    }
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    return (
        sum(n.input[1] in matrices for n in matmuls),
        sum(n.input[1] in transposed for n in matmuls),
    )


def test_exported_graphs_store_weights_out_in_and_lora_ready_ones_do_not(
    tiny_engine_fp32: Path, tmp_path: Path
) -> None:
    from sd_deploy.exporter import export_engine_dir
    from sd_deploy.models import build_random, get_preset

    for component in ("unet", "text_encoder"):
        direct, behind = _matmul_weights(tiny_engine_fp32 / component / "model.onnx")
        assert direct == 0 and behind > 0, component
    out = tmp_path / "lora"
    models = build_random(get_preset("tiny"), seed=4)
    export_engine_dir(models, out, lora_ready=True, validate=False, progress=False)
    for component in ("unet", "text_encoder"):
        direct, behind = _matmul_weights(out / component / "model.onnx")
        assert direct > 0 and behind == 0, component
    assert _matmul_weights(out / "vae_decoder" / "model.onnx")[0] == 0  # not a LoRA target
