"""`--lora-ready` exports: every LoRA target weight found in its graph, fp32 and fp16."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")

from sd_deploy.engine_dir.manifest import read_manifest  # noqa: E402
from sd_deploy.exporter import export_engine_dir  # noqa: E402
from sd_deploy.models import build_random, get_preset  # noqa: E402
from sd_deploy.models.lora import lora_modules  # noqa: E402


@pytest.mark.parametrize("fp16", [False, True])
def test_lora_ready_maps_every_target(tmp_path: Path, fp16: bool) -> None:
    models = build_random(get_preset("tiny-v"), seed=4)
    out = tmp_path / "engines"
    manifest = export_engine_dir(
        models, out, fp16=fp16, lora_ready=True,
        progress=False, validate=False,
    )  # fmt: skip
    assert manifest.provenance["lora_ready"] is True and manifest.provenance["loras"] == []
    again = read_manifest(out)
    for component in ("unet", "text_encoder"):
        spec = again.components[component]
        assert f"{component}/lora_targets.json" in spec.files
        assert f"{component}/model.onnx_data" in spec.files
        data = json.loads((out / component / "lora_targets.json").read_text())
        modules = lora_modules(models)[component]
        assert data["unmapped"] == [] and set(data["targets"]) == set(modules)
        # the recorded bytes are the weight (transposed for MatMul initializers)
        for target, record in list(data["targets"].items())[::7]:
            raw = np.fromfile(
                out / component / record["file"], dtype=record["dtype"],
                count=int(np.prod(record["shape"])), offset=record["offset"],
            ).reshape(record["shape"])  # fmt: skip
            weight = modules[target].weight.detach().numpy()
            weight = weight.T if record["transpose"] else weight
            np.testing.assert_allclose(raw.astype(np.float32), weight, rtol=1e-3, atol=1e-3)
    assert "lora_targets.json" not in {p.name for p in (out / "vae_decoder").glob("*")}
    # a graph whose weights are already external (as a >2 GB UNet's are) is re-saved in
    # place, not appended to
    from sd_deploy.exporter.lora_ready import prepare_lora_ready

    data = out / "unet" / "model.onnx_data"
    size = data.stat().st_size
    prepare_lora_ready(out / "unet" / "model.onnx", models, "unet")
    assert data.stat().st_size == size
