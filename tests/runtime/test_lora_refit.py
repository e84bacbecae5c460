"""TensorRT LoRA refits by initializer name, against a fake of TensorRT's Refitter API.

The fake records what TensorRT's Python API would be called with (`trt.Refitter(engine,
logger)`, `set_named_weights(name, trt.Weights(array))`, `get_missing_weights()`,
`refit_cuda_engine()`), and keeps the engine's weights so that a switch back to no LoRA
can be checked to restore the base values exactly.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

from sd_deploy.errors import BuildError
from sd_deploy.runtime.lora import LoraSessionCache, RefitState, refit_engine

BASE = {
    "onnx::MatMul_1": np.arange(6, dtype=np.float16).reshape(2, 3),
    "unet.conv.weight": np.ones((2, 2, 3, 3), np.float16),
    "unet.conv.bias": np.zeros(2, np.float16),
}


class FakeWeights:
    def __init__(self, array: np.ndarray) -> None:
        self.array = array


class FakeEngine:
    def __init__(self, refittable: bool = True, fused: dict[str, str] | None = None) -> None:
        self.refittable = refittable
        self.weights = {k: v.copy() for k, v in BASE.items()}
        self.fused = fused or {}  # weight -> another weight TensorRT wants with it
        self.refits = 0


class FakeRefitter:
    def __init__(self, engine: FakeEngine, logger: object) -> None:
        assert logger == "logger"
        self.engine = engine
        self.pending: dict[str, np.ndarray] = {}

    def set_named_weights(self, name: str, weights: FakeWeights) -> bool:
        if name not in self.engine.weights:
            return False
        assert weights.array.dtype == self.engine.weights[name].dtype
        self.pending[name] = weights.array.copy()
        return True

    def get_missing_weights(self) -> list[str]:
        return [
            other
            for name, other in self.engine.fused.items()
            if name in self.pending and other not in self.pending
        ]

    def refit_cuda_engine(self) -> bool:
        if self.get_missing_weights():
            return False
        self.engine.weights.update(self.pending)
        self.engine.refits += 1
        return True


FAKE_TRT = types.SimpleNamespace(Refitter=FakeRefitter, Weights=FakeWeights)


def base(name: str) -> np.ndarray | None:
    return BASE.get(name)


def switch(engine: FakeEngine, state: RefitState, key, patches) -> None:
    weights = state.plan(key, patches, base)
    refit_engine(FAKE_TRT, engine, "logger", weights, base, "unet")
    state.done(key, patches)


def test_refit_sets_named_weights_and_switching_back_restores_base() -> None:
    engine = FakeEngine(fused={"unet.conv.weight": "unet.conv.bias"})
    state = RefitState()
    style = {
        "onnx::MatMul_1": BASE["onnx::MatMul_1"] + np.float16(1),
        "unet.conv.weight": BASE["unet.conv.weight"] * np.float16(2),
    }
    switch(engine, state, (("sha-a", 1.0),), style)
    np.testing.assert_array_equal(engine.weights["onnx::MatMul_1"], style["onnx::MatMul_1"])
    np.testing.assert_array_equal(engine.weights["unet.conv.weight"], style["unet.conv.weight"])
    # TensorRT asked for the fused bias too: it got the base value
    np.testing.assert_array_equal(engine.weights["unet.conv.bias"], BASE["unet.conv.bias"])

    other = {"onnx::MatMul_1": BASE["onnx::MatMul_1"] - np.float16(3)}
    switch(engine, state, (("sha-b", 0.5),), other)
    np.testing.assert_array_equal(engine.weights["onnx::MatMul_1"], other["onnx::MatMul_1"])
    # the conv the first LoRA touched and this one does not is back to base
    np.testing.assert_array_equal(engine.weights["unet.conv.weight"], BASE["unet.conv.weight"])

    switch(engine, state, (), {})
    for name, value in BASE.items():
        assert engine.weights[name].tobytes() == value.tobytes(), name
    assert engine.refits == 3 and state.touched == set()


def test_refit_errors_say_how_to_rebuild() -> None:
    with pytest.raises(BuildError, match="not refittable; rebuild it with sd-build --refittable"):
        refit_engine(FAKE_TRT, FakeEngine(refittable=False), "logger", {}, base, "unet")
    with pytest.raises(BuildError, match="cannot refit unet weight onnx::Gone"):
        refit_engine(
            FAKE_TRT, FakeEngine(), "logger", {"onnx::Gone": np.zeros(1, np.float16)}, base, "unet"
        )
    engine = FakeEngine(fused={"onnx::MatMul_1": "unknown.weight"})
    with pytest.raises(BuildError, match="needs unet weight unknown.weight"):
        refit_engine(
            FAKE_TRT, engine, "logger", {"onnx::MatMul_1": BASE["onnx::MatMul_1"]}, base, "unet"
        )


class Closable:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def close(self) -> None:
        self.log.append(self.name)


def test_session_cache_is_a_bounded_lru() -> None:
    closed: list[str] = []
    built: list[str] = []
    cache = LoraSessionCache(max_sets=2)

    def build(name):
        def make():
            built.append(name)
            return {"unet": Closable(name, closed)}

        return make

    a, b, c = (("a", 1.0),), (("b", 1.0),), (("c", 1.0),)
    cache.get(a, build("a"))
    cache.get(b, build("b"))
    cache.get(a, build("a"))  # hit: a becomes the most recent
    cache.get(c, build("c"))  # evicts b, the least recently used
    assert built == ["a", "b", "c"] and closed == ["b"]
    assert a in cache and c in cache and b not in cache and len(cache) == 2
    cache.clear()
    assert sorted(closed) == ["a", "b", "c"]
    with pytest.raises(ValueError):
        LoraSessionCache(0)


def test_tensorrt_backend_refit_drops_the_cuda_graph() -> None:
    from sd_deploy.runtime.backends.tensorrt import TensorRTBackend

    dropped: list[bool] = []
    engine = FakeEngine()
    session = types.SimpleNamespace(
        engine=engine,
        spec=types.SimpleNamespace(name="unet"),
        _drop_graph=lambda: dropped.append(True),
    )
    backend = types.SimpleNamespace(_trt=FAKE_TRT, _logger="logger")
    new = {"onnx::MatMul_1": BASE["onnx::MatMul_1"] * np.float16(3)}
    TensorRTBackend.refit(backend, session, new, base)  # type: ignore[arg-type]
    np.testing.assert_array_equal(engine.weights["onnx::MatMul_1"], new["onnx::MatMul_1"])
    assert dropped == [True]
    session.engine = None
    with pytest.raises(BuildError, match="closed"):
        TensorRTBackend.refit(backend, session, new, base)  # type: ignore[arg-type]
