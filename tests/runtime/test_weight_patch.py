"""`WeightPatch`: base + the LoRAs' low-rank products, computed when a backend asks, in
the stored layout and dtype, page-aligned (ONNX Runtime runs `add_initializer` arrays in
place), and refusing a product that overflows float32."""

from __future__ import annotations

import numpy as np
import pytest

from sd_deploy.engine_dir.lora import LoraError, LoraLayer
from sd_deploy.runtime.weight_patch import ALIGNMENT, WeightPatch, aligned_empty


def linear(rng, out: int, fan_in: int, rank: int, magnitude: float = 1.0) -> LoraLayer:
    down = (rng.standard_normal((rank, fan_in)) * magnitude).astype(np.float32)
    up = (rng.standard_normal((out, rank)) * magnitude).astype(np.float32)
    return LoraLayer("unet", "m", "lora_unet_m", down, up, None)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("transpose", [False, True])
def test_stored_layout_and_dtype(dtype, transpose) -> None:
    """A Linear kept as [out, in] (Gemm) or [in, out] (MatMul), fp32 or fp16: the sum is
    taken in float32 and cast once, as a merge at export does. Tolerance: fp32 1e-6
    relative (a product of concatenated ranks vs a sum of two); fp16 one rounding."""
    rng = np.random.default_rng(0)
    layers = [(linear(rng, 24, 40, 4), 0.5), (linear(rng, 24, 40, 8), 2.0)]
    weight = rng.standard_normal((24, 40)).astype(np.float32)
    base = (weight.T if transpose else weight).astype(dtype)
    delta = sum(layer.delta((24, 40), scale, transpose) for layer, scale in layers)
    want = (base.astype(np.float32) + delta).astype(dtype)
    got = WeightPatch.of(base, transpose, layers).array()
    assert got.dtype == dtype and got.shape == base.shape
    assert got.ctypes.data % ALIGNMENT == 0
    rtol = 1e-6 if dtype == np.float32 else 1e-3
    np.testing.assert_allclose(
        got.astype(np.float32), want.astype(np.float32), rtol=rtol, atol=rtol
    )


def test_a_product_that_overflows_float32_is_refused() -> None:
    rng = np.random.default_rng(0)
    huge = linear(rng, 8, 8, 2, magnitude=1e20)
    patch = WeightPatch.of(np.zeros((8, 8), np.float32), False, [(huge, 1.0)])
    with pytest.raises(LoraError, match="overflows float32"):
        patch.array()
    fine = WeightPatch.of(np.zeros((8, 8), np.float32), False, [(linear(rng, 8, 8, 2), 1.0)])
    assert fine.risky == () and np.isfinite(fine.array()).all()


def test_aligned_empty_is_page_aligned() -> None:
    arrays = [aligned_empty((n, 3), np.float32) for n in (1, 1000, 300_000)]
    assert all(a.ctypes.data % ALIGNMENT == 0 and a.flags.c_contiguous for a in arrays)
