"""A synthetic engine dir shaped like the tiny preset's, made in milliseconds.

The TensorRT build and plan checks only read the manifest and hash the graph
files, so these tests need no real ONNX export; the GPU tests use the real
`tiny_engine_fp16` export from tests/conftest.py instead.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from sd_deploy.engine_dir.hashing import files_sha256
from sd_deploy.engine_dir.manifest import Manifest

RANGES = {"batch": [1, 1, 4], "height": [32, 64, 128], "width": [32, 64, 128]}

COMPONENTS: dict[str, dict[str, Any]] = {
    "text_encoder": {
        "inputs": [{"name": "input_ids", "dtype": "int32", "shape": ["cfg_batch", 77]}],
        "outputs": [
            {"name": "text_embeddings", "dtype": "float16", "shape": ["cfg_batch", 77, 64]}
        ],
        "profile_shapes": {"input_ids": {"min": [1, 77], "opt": [2, 77], "max": [8, 77]}},
    },
    "unet": {
        "inputs": [
            {
                "name": "sample",
                "dtype": "float16",
                "shape": ["cfg_batch", 4, "latent_height", "latent_width"],
            },
            {"name": "timestep", "dtype": "float32", "shape": ["cfg_batch"]},
            {"name": "encoder_hidden_states", "dtype": "float16", "shape": ["cfg_batch", 77, 64]},
        ],
        "outputs": [
            {
                "name": "model_output",
                "dtype": "float16",
                "shape": ["cfg_batch", 4, "latent_height", "latent_width"],
            }
        ],
        "profile_shapes": {
            "sample": {"min": [1, 4, 4, 4], "opt": [2, 4, 8, 8], "max": [8, 4, 16, 16]},
            "timestep": {"min": [1], "opt": [2], "max": [8]},
            "encoder_hidden_states": {"min": [1, 77, 64], "opt": [2, 77, 64], "max": [8, 77, 64]},
        },
    },
    "vae_decoder": {
        "inputs": [
            {
                "name": "latent",
                "dtype": "float16",
                "shape": ["batch", 4, "latent_height", "latent_width"],
            }
        ],
        "outputs": [
            {"name": "images", "dtype": "float16", "shape": ["batch", 3, "height", "width"]}
        ],
        "profile_shapes": {
            "latent": {"min": [1, 4, 4, 4], "opt": [1, 4, 8, 8], "max": [4, 4, 16, 16]}
        },
    },
    "vae_encoder": {
        "inputs": [
            {"name": "images", "dtype": "float16", "shape": ["batch", 3, "height", "width"]}
        ],
        "outputs": [
            {
                "name": "latent_mean",
                "dtype": "float16",
                "shape": ["batch", 4, "latent_height", "latent_width"],
            },
            {
                "name": "latent_std",
                "dtype": "float16",
                "shape": ["batch", 4, "latent_height", "latent_width"],
            },
        ],
        "profile_shapes": {
            "images": {"min": [1, 3, 32, 32], "opt": [1, 3, 64, 64], "max": [4, 3, 128, 128]}
        },
    },
}


def make_engine_dir(
    root: Path, precision: str = "fp16", components: tuple[str, ...] = tuple(COMPONENTS)
) -> Path:
    """An engine dir with the tiny preset's manifest and placeholder graph files."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "tokenizer" / "vocab.json").write_text("{}")
    (root / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    specs = {}
    for name in components:
        graph = root / name / "model.onnx"
        graph.parent.mkdir(exist_ok=True)
        graph.write_bytes(f"placeholder graph of {name}".encode())
        files = [graph]
        if name == "unet":  # as a full-size UNet: weights in an external data file
            files.append(graph.with_name("model.onnx_data"))
            files[-1].write_bytes(b"placeholder weights")
        spec = copy.deepcopy(COMPONENTS[name])
        if precision == "fp32":
            for tensor in spec["inputs"] + spec["outputs"]:
                if tensor["dtype"] == "float16":
                    tensor["dtype"] = "float32"
        spec.update(
            onnx=f"{name}/model.onnx",
            files=[f.relative_to(root).as_posix() for f in files],
            precision=precision,
            shape_ranges=RANGES,
            onnx_sha256=files_sha256(root, files),
        )
        specs[name] = spec
    data = {
        "schema_version": 1,
        "model": {
            "family": "tiny",
            "prediction_type": "epsilon",
            "latent_channels": 4,
            "vae_scale_factor": 8,
            "scaling_factor": 0.18215,
            "text_embed_dim": 64,
            "default_height": 64,
            "default_width": 64,
        },
        "tokenizer": {
            "path": "tokenizer",
            "max_length": 77,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
        "scheduler": {"num_train_timesteps": 1000},
        "io_conventions": {},
        "provenance": {"source": "synthetic test engine dir"},
        "components": specs,
    }
    Manifest.from_json(data).write(root)
    return root


@pytest.fixture
def engine_dir(tmp_path: Path) -> Path:
    """A fresh fp16 synthetic engine dir with all four components."""
    return make_engine_dir(tmp_path / "engines")


@pytest.fixture
def make_engine():
    """make_engine(root, precision="fp16", components=...) -> a synthetic engine dir."""
    return make_engine_dir


@pytest.fixture
def env() -> dict[str, str]:
    """A running-environment mapping (what `current_environment` returns on a GPU box)."""
    return {
        "trt_version": "10.13.0.35",
        "gpu_name": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0",
    }
