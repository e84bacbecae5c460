"""Write the committed seeds in tools/fuzz/seeds/ from the project's own writers.

- manifest.json: the manifest `export_engine_dir` writes for the tiny preset (no validation);
- diffusers_tiny.json: a diffusers folder's config files for the tiny preset, made by
  diffusers' own single-file code (`benchmarks.diffusers_backend.diffusers_configs`);
- plan_unet.json: the plan metadata `sd-build` would write beside the tiny UNet's plan;
- int8_unet.json: the metadata `sd-quantize` would write beside the tiny UNet's int8 graph
  (for the placeholder IR files the int8 target writes);
- infotext_*.txt / infotext_*.png: `ImageParameters.infotext()` texts, one in a PNG from
  `save_png`, and an A1111 v1.9 text.

The checkpoint, ckpt, tokenizer and prompt seeds are made at run time (tools/fuzz/targets.py).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tools.fuzz.targets import SEEDS_DIR


def write_seeds() -> None:
    SEEDS_DIR.mkdir(exist_ok=True)
    manifest = _write_manifest()
    _write_diffusers()
    _write_plan(manifest)
    _write_int8(manifest)
    _write_infotexts()
    for path in sorted(SEEDS_DIR.iterdir()):
        print(path, path.stat().st_size)


def _write_manifest() -> dict:
    from sd_deploy.exporter import export_engine_dir
    from sd_deploy.models import build_random, get_preset

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "engines"
        export_engine_dir(build_random(get_preset("tiny"), seed=0), out, progress=False,
                          validate=False)  # fmt: skip
        data = json.loads((out / "manifest.json").read_text())
    data["provenance"]["created"] = "2026-01-01T00:00:00+00:00"
    (SEEDS_DIR / "manifest.json").write_text(json.dumps(data, indent=2) + "\n")
    return data


def _write_diffusers() -> None:
    import diffusers

    from sd_deploy.benchmarks.diffusers_backend import diffusers_configs
    from sd_deploy.models import get_preset

    config = get_preset("tiny")
    unet, vae = diffusers_configs(config, {})
    t = config.text_encoder
    files = {
        "model_index.json": {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDIMScheduler"],
        },
        "unet/config.json": {"_class_name": "UNet2DConditionModel", **unet},
        "vae/config.json": {"_class_name": "AutoencoderKL", **vae},
        "text_encoder/config.json": {
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "max_position_embeddings": t.max_position_embeddings,
            "hidden_act": t.hidden_act,
            "layer_norm_eps": t.layer_norm_eps,
        },  # fmt: skip
        "scheduler/scheduler_config.json": {
            "_class_name": "DDIMScheduler",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "prediction_type": "epsilon",
            "steps_offset": 1,
            "clip_sample": False,
            "set_alpha_to_one": False,
            "num_train_timesteps": 1000,
        },  # fmt: skip
        "tokenizer/special_tokens_map.json": {"pad_token": "!"},
        "tokenizer/vocab.json": {"!": 0, "a": 1},
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors": "",
        "unet/diffusion_pytorch_model.safetensors.index.json": {
            "metadata": {"total_size": 10},
            "weight_map": {"conv_in.weight": "diffusion_pytorch_model-00001-of-00002.safetensors"},
        },
    }
    text = json.dumps(files, indent=1, default=list)
    (SEEDS_DIR / "diffusers_tiny.json").write_text(text + "\n")


def _write_plan(manifest: dict) -> None:
    from sd_deploy.engine_dir.manifest import Manifest
    from sd_deploy.engine_dir.plans import PlanMetadata
    from sd_deploy.engine_dir.shapes import wanted_profile

    m = Manifest.from_json(manifest)
    spec = m.components["unet"]
    meta = PlanMetadata(
        component="unet", tensorrt_version="10.12.0", gpu_name="NVIDIA H200",
        compute_capability="9.0", onnx_sha256=spec.onnx_sha256, precision=spec.precision,
        profile=wanted_profile(spec, m.model.vae_scale_factor),
        shape_ranges=spec.shape_ranges.to_json(), plan_bytes=64,
        build_flags={"refittable": False}, build_seconds=1.5,
        built_at="2026-01-01T00:00:00+00:00", sd_deploy_version="0.1.0",
    )  # fmt: skip
    (SEEDS_DIR / "plan_unet.json").write_text(json.dumps(meta.to_json(), indent=2) + "\n")


def _write_int8(manifest: dict) -> None:
    from dataclasses import asdict

    from sd_deploy.engine_dir.int8_graphs import (
        INT8_WEIGHTS_MODE,
        Int8Metadata,
        int8_files_bytes,
        int8_files_sha256,
    )
    from tools.fuzz.targets import write_int8_placeholders

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_int8_placeholders(Path(tmp))
        meta = Int8Metadata(
            component="unet", onnx_sha256=manifest["components"]["unet"]["onnx_sha256"],
            ir_sha256=int8_files_sha256(folder), ir_bytes=int8_files_bytes(folder),
            mode=INT8_WEIGHTS_MODE, kept_full_precision=["/unet/out/out.2/Conv"],
            openvino_version="2026.4.1", nncf_version="3.4.0", seconds=1.5,
            made_at="2026-01-01T00:00:00+00:00", sd_deploy_version="0.1.0",
        )  # fmt: skip
    (SEEDS_DIR / "int8_unet.json").write_text(json.dumps(asdict(meta), indent=2) + "\n")


def _write_infotexts() -> None:
    import numpy as np

    from sd_deploy.runtime.images import save_png
    from sd_deploy.runtime.request import ImageParameters

    params = ImageParameters(
        prompt="a (red:1.2) circle, on a white background", negative_prompt="blurry",
        seed=7, steps=10, sampler="dpmpp_2m_karras", guidance=7.5, width=64, height=64,
        strength=None, model="tiny", backend="onnxruntime", clip_skip=2, emphasis=True,
        model_name="model", model_hash="0123456789",
    )  # fmt: skip
    img2img = ImageParameters(
        prompt='x, "quoted": yes\nsecond line', negative_prompt="", seed=1, steps=3,
        sampler="euler_a", guidance=1.0, width=32, height=32, strength=0.6, model="tiny",
        backend="onnxruntime", emphasis=False,
    )  # fmt: skip
    (SEEDS_DIR / "infotext_txt2img.txt").write_text(params.infotext())
    (SEEDS_DIR / "infotext_img2img.txt").write_text(img2img.infotext())
    a1111_v19 = (
        "masterpiece, (best quality:1.1)\nNegative prompt: lowres\nSteps: 20, Sampler: DPM++ 2M, "
        "Schedule type: Karras, CFG scale: 7, Seed: 12345, Size: 64x64, Model hash: abc, "
        'Model: sd15, Lora hashes: "a: 1234", Version: v1.9.0'
    )
    (SEEDS_DIR / "infotext_a1111_v19.txt").write_text(a1111_v19)
    save_png(np.zeros((8, 8, 3), np.uint8), SEEDS_DIR / "infotext_png.png", params.infotext())
