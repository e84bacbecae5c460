"""Finding run-time LoRA weights by value in ONNX Runtime's optimized graph
(`ort_patch_map.find_places`) on hand-made graphs: blocked conv filters are found by their
values, and a weight whose values sit in two cached initializers is left out."""

from __future__ import annotations

import json

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


def lora_layer(rng, out: int, fan_in: int, kernel: int, rank: int, alpha: float | None):
    from sd_deploy.engine_dir.lora import LoraLayer

    down = rng.standard_normal((rank, fan_in, kernel, kernel)).astype(np.float32)
    up = rng.standard_normal((out, rank, 1, 1)).astype(np.float32)
    return LoraLayer("unet", "m", f"lora_unet_m{rank}", down, up, alpha)


@pytest.mark.parametrize(
    ("layout", "out", "fan_in"),
    [
        ("OIHW16i16o", 32, 48),  # whole blocks
        ("OIHW16i16o", 20, 36),  # both channel counts padded up to the block
        ("OIHW8i8o", 12, 8),
        ("OIHW16o", 20, 4),  # a first convolution: input channels not blocked
        ("OIHW8o", 8, 3),
    ],
)
def test_a_filter_patched_in_its_blocked_layout_equals_the_patched_filter_reordered(
    layout, out, fan_in
) -> None:
    """`patched_filter` computes base + up @ down straight into MLAS's layout; it must equal
    reordering the stored-layout result (two LoRAs on one filter: their ranks concatenated).
    Tolerance 1e-6 relative: the same float32 sums of 12 products, by another matmul shape."""
    from sd_deploy.runtime.backends.ort_patch_map import patched_filter
    from sd_deploy.runtime.weight_patch import ALIGNMENT, WeightPatch

    rng = np.random.default_rng(1)
    base = rng.standard_normal((out, fan_in, 3, 3)).astype(np.float32)
    layers = [
        (lora_layer(rng, out, fan_in, 3, 8, 4.0), 0.7),
        (lora_layer(rng, out, fan_in, 3, 4, None), -1.5),
    ]
    patch = WeightPatch.of(base, False, layers)
    stored = patch.array()
    want = base + sum(layer.delta(base.shape, scale) for layer, scale in layers)
    np.testing.assert_allclose(stored, want, rtol=1e-6, atol=1e-6)
    blocked = patched_filter(patch, layout, to_layout(base, layout))
    np.testing.assert_allclose(blocked, to_layout(stored, layout), rtol=1e-6, atol=1e-6)
    assert blocked.ctypes.data % ALIGNMENT == 0 and stored.ctypes.data % ALIGNMENT == 0
    # MLAS's zero padding stays zero: a patch only moves the filter's own values
    padded = to_layout(np.ones_like(base), layout) == 0
    assert np.all(blocked[padded] == 0)


def test_a_saved_map_that_does_not_fit_its_graph_is_built_again(tmp_path) -> None:
    """A patch map naming an initializer the cached graph lacks (or of another shape) is
    not trusted: it is found again by value."""
    from sd_deploy.runtime.backends.ort_patch_map import PATCH_MAP_NAME, PatchMap

    matmul = np.random.default_rng(2).standard_normal((16, 8)).astype(np.float32)
    save_graph(tmp_path / "source.onnx", {"w": matmul})
    (tmp_path / "cache").mkdir()
    save_graph(tmp_path / "cache" / "model.onnx", {"w": matmul})
    saved = {"schema": 1, "places": {"w": ["gone", AS_STORED, [16, 8]]}, "tried": ["w"]}
    (tmp_path / "cache" / PATCH_MAP_NAME).write_text(json.dumps(saved))
    places = PatchMap.load_or_build(
        tmp_path / "cache", tmp_path / "source.onnx", ["w"], {"w": matmul}.get
    )
    assert places.places == {"w": ["w", AS_STORED, [16, 8]]}
