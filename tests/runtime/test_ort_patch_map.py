"""Finding run-time LoRA weights by value in ONNX Runtime's optimized graph
(`ort_patch_map.find_places`) on hand-made graphs: blocked conv filters are found by their
values, and a weight whose values sit in two cached initializers is left out."""

from __future__ import annotations

import numpy as np
import pytest

from sd_deploy.runtime.backends.ort_patch_map import AS_STORED, find_places, to_layout

onnx = pytest.importorskip("onnx")


def save_graph(path, weights: dict[str, np.ndarray]) -> None:
    """A graph whose initializers are `weights`, all in external data (as our exports and
    ONNX Runtime's saved optimized graphs keep them)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                              initializer=inits)  # fmt: skip
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=True,
                    location=path.name + "_data", size_threshold=0)  # fmt: skip


def test_blocked_filters_are_found_and_twins_are_left_out(tmp_path) -> None:
    from sd_deploy.runtime.backends.ort_patch_map import fingerprint

    rng = np.random.default_rng(0)
    conv = rng.standard_normal((32, 32, 3, 3)).astype(np.float32)
    twin = rng.standard_normal((32, 32, 3, 3)).astype(np.float32)
    near = to_layout(conv, "OIHW16i16o").copy()
    near[-1] += 1.0  # the last of 9216 values: odd, past the first 1024, so unsampled
    matmul = rng.standard_normal((16, 8)).astype(np.float32)
    source = {"conv": conv, "twin": twin, "matmul": matmul}
    blocked = "OIHW16i16o"
    cached = {
        "matmul": matmul,  # kept under its name, as ONNX Runtime keeps MatMul weights
        "new_conv": to_layout(conv, blocked).reshape(2, 2, 3, 3, 16, 16),
        "new_near": near.reshape(2, 2, 3, 3, 16, 16),
        "new_twin_a": to_layout(twin, blocked).reshape(2, 2, 3, 3, 16, 16),
        "new_twin_b": to_layout(twin, blocked).reshape(2, 2, 3, 3, 16, 16),
    }
    assert fingerprint(near) == fingerprint(to_layout(conv, blocked))
    save_graph(tmp_path / "source.onnx", source)
    (tmp_path / "cache").mkdir()
    save_graph(tmp_path / "cache" / "model.onnx", cached)
    found = find_places(tmp_path / "cache" / "model.onnx", tmp_path / "source.onnx",
                        list(source), source.get)  # fmt: skip
    assert found["matmul"] == ["matmul", AS_STORED, [16, 8]]
    # new_near has conv's fingerprint; comparing every value picks new_conv
    assert found["conv"] == ["new_conv", blocked, [2, 2, 3, 3, 16, 16]]
    assert "twin" not in found  # two cached copies: patching either could be the wrong one
