"""The full-size SD 1.5 UNet (seeded weights) exports with external data and validates.

About 2-3 minutes and 11 GB of RAM on a 2-core machine: marked slow, run by CI.
"""

from __future__ import annotations

import gc

import pytest

from sd_deploy.engine_dir.manifest import read_manifest


@pytest.mark.slow
def test_sd15_unet_fp32_exports_with_external_data(tmp_path):
    from sd_deploy.exporter import export_engine_dir
    from sd_deploy.models import build_random, get_preset

    models = build_random(get_preset("sd15"))
    out = tmp_path / "sd15"
    export_engine_dir(models, out, components=["unet"], progress=False)
    del models
    gc.collect()
    spec = read_manifest(out, require=("unet",)).components["unet"]
    assert spec.files == ["unet/model.onnx", "unet/model.onnx_data"]
    data = out / "unet" / "model.onnx_data"
    assert data.stat().st_size > 3_400_000_000  # 859.5 M fp32 parameters
    assert (out / "unet" / "model.onnx").stat().st_size < 50_000_000
    assert spec.validation["validated"]
    assert spec.validation["max_rel_l2"] <= 1e-4
    assert [c["input_shapes"]["sample"] for c in spec.validation["cases"]] == [
        [2, 4, 64, 64],
        [8, 4, 32, 32],
    ]
