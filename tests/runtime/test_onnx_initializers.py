"""The runtime's own reader of external-initializer records against the onnx package's."""

from __future__ import annotations

import numpy as np
import pytest

from sd_deploy.runtime.backends.onnx_initializers import external_initializers

onnx = pytest.importorskip("onnx")


def test_records_and_values_match_the_onnx_package(tmp_path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {
        "w32": rng.standard_normal((64, 48)).astype(np.float32),
        "w16": rng.standard_normal((8, 4, 3, 3)).astype(np.float16),
        "big_dims": np.zeros((300, 2), np.float32),  # dims past one varint byte
        "tiny": np.ones(3, np.float32),  # stays inline (under the size threshold)
    }
    inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 48])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w32"], ["y"])], "g", [x], [y],
                              initializer=inits)  # fmt: skip
    path = tmp_path / "model.onnx"
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=True,
                    location="model.onnx_data", size_threshold=64)  # fmt: skip

    found = external_initializers(path)
    assert set(found) == {"w32", "w16", "big_dims"}
    stored = onnx.load(str(path), load_external_data=False)
    for init in stored.graph.initializer:
        if init.name not in found:
            continue
        info = {e.key: e.value for e in init.external_data}
        record = found[init.name]
        assert record.shape == tuple(init.dims) and record.data_type == init.data_type
        assert (record.file, record.offset, record.length) == (
            info["location"],
            int(info.get("offset", 0)),
            int(info["length"]),
        )
        np.testing.assert_array_equal(record.read(tmp_path), weights[init.name])


def test_not_a_graph_is_an_error_not_a_hang(tmp_path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x3a\xff\xff\xff\xff\x0f")  # graph field claiming 4 GB
    assert external_initializers(bad) == {}
    for data in (b"\x3b", b"\x3a\xff", b"\x08" + b"\xff" * 11):  # groups, cut, endless varint
        bad.write_bytes(data)
        with pytest.raises(ValueError):
            external_initializers(bad)
