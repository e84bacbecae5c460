"""Our ldm-layout UNet and VAE against diffusers, built from configs (nothing from the hub).

1. Single-file direction: our seeded modules' state dicts, prefixed as in an ldm checkpoint,
   go through diffusers' own single-file conversion (`convert_ldm_unet_checkpoint`,
   `convert_ldm_vae_checkpoint`, configs from `create_*_diffusers_config_from_ldm`, called
   by `sd_deploy.benchmarks.diffusers_backend.convert_to_diffusers`, which sd-bench uses
   too) into `UNet2DConditionModel` / `AutoencoderKL` (strict) and must compute the same
   outputs.
2. Folder direction: seeded diffusers modules saved with `save_pretrained` into a pipeline
   folder are loaded by `load_checkpoint` and must compute what the diffusers modules do.

Tolerance: relative L2 error <= 1e-4 in fp32 (attention implementations differ by ~1e-6).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL as DiffusersVAE  # noqa: E402
from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402

from sd_deploy.benchmarks.diffusers_backend import (  # noqa: E402
    convert_to_diffusers,
    diffusers_configs,
)
from sd_deploy.models import ModelConfig, build_random, get_preset  # noqa: E402
from sd_deploy.models.checkpoints import load_checkpoint  # noqa: E402
from sd_deploy.runtime.tokenizer import write_clip_tokenizer_files  # noqa: E402

TOLERANCE = 1e-4


def rel_l2(ours: torch.Tensor, reference: torch.Tensor) -> float:
    ours, reference = ours.double(), reference.double()
    return ((ours - reference).norm() / reference.norm()).item()


def inputs(config: ModelConfig, latent: int, batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {
        "sample": torch.randn(batch, config.unet.in_channels, latent, latent, generator=g),
        "timestep": torch.tensor([981.0, 7.25, 500.5][:batch]),
        "context": torch.randn(batch, 77, config.unet.context_dim, generator=g),
        "z": torch.randn(batch, config.vae.z_channels, latent, latent, generator=g),
        "image": torch.rand(batch, 3, 8 * latent, 8 * latent, generator=g) * 2 - 1,
    }


def compare(ours_unet, ours_vae, their_unet, their_vae, x: dict[str, torch.Tensor]) -> dict:
    with torch.no_grad():
        errors = {
            "unet": rel_l2(
                ours_unet(x["sample"], x["timestep"], x["context"]),
                their_unet(x["sample"], x["timestep"], encoder_hidden_states=x["context"]).sample,
            ),
            "vae_decode": rel_l2(ours_vae.decode(x["z"]), their_vae.decode(x["z"]).sample),
        }
        mean, logvar = ours_vae.encode_moments(x["image"])
        dist = their_vae.encode(x["image"]).latent_dist
        errors["vae_mean"] = rel_l2(mean, dist.mean)
        errors["vae_logvar"] = rel_l2(logvar, dist.logvar)
    return errors


def check_single_file_oracle(name: str, latent: int, batch: int) -> dict[str, float]:
    config = get_preset(name)
    models = build_random(config, seed=7)
    # Meta construction + assign: the diffusers modules share our tensors (no second copy).
    their_unet, their_vae = convert_to_diffusers(models)
    errors = compare(models.unet, models.vae, their_unet, their_vae, inputs(config, latent, batch))
    print(f"single-file oracle {name}: " + ", ".join(f"{k}={v:.2e}" for k, v in errors.items()))
    del models, their_unet, their_vae
    gc.collect()
    return errors


@pytest.mark.parametrize("name", ["tiny", "tiny-v"])
def test_single_file_conversion_matches_diffusers_tiny(name: str) -> None:
    errors = check_single_file_oracle(name, latent=16, batch=2)
    assert max(errors.values()) <= TOLERANCE, errors


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_single_file_conversion_matches_diffusers_full_size(name: str) -> None:
    # Full-size weights (~4.3 GB fp32 per model, shared with the diffusers modules), a small
    # 8x8 latent to keep CPU time down. One model in memory at a time.
    errors = check_single_file_oracle(name, latent=8, batch=1)
    assert max(errors.values()) <= TOLERANCE, errors


# --------------------------------------------------------------------------- diffusers folders


def write_pipeline_folder(config: ModelConfig, folder: Path, seed: int = 3) -> dict[str, Any]:
    """A diffusers StableDiffusionPipeline folder with seeded weights; returns the modules."""
    from transformers import CLIPTextConfig

    unet_config, vae_config = diffusers_configs(config, {})
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config).eval()
    vae = DiffusersVAE(**vae_config).eval()
    t = config.text_encoder
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            max_position_embeddings=t.max_position_embeddings, hidden_act=t.hidden_act,
            layer_norm_eps=t.layer_norm_eps,
        )
    ).eval()  # fmt: skip
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=config.prediction_type, steps_offset=1, clip_sample=False,
        set_alpha_to_one=False,
    ).save_pretrained(folder / "scheduler")  # fmt: skip
    write_clip_tokenizer_files(folder / "tokenizer")
    pad = "!" if config.pad_token_id == 0 else "<|endoftext|>"
    (folder / "tokenizer" / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad}))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return {"unet": unet, "vae": vae, "text_encoder": text}


def check_folder(folder: Path, config: ModelConfig, theirs: dict[str, Any]) -> dict[str, float]:
    models = load_checkpoint(folder)
    assert models.config.family == config.family
    assert models.config.prediction_type == config.prediction_type
    assert models.config.pad_token_id == config.pad_token_id
    assert models.config.unet == config.unet
    assert models.config.vae == config.vae
    assert models.config.text_encoder == config.text_encoder
    assert models.tokenizer_dir == folder / "tokenizer"
    assert models.source == str(folder)
    assert models.source_sha256 is not None and len(models.source_sha256) == 64
    errors = compare(models.unet, models.vae, theirs["unet"], theirs["vae"], inputs(config, 16, 2))
    ids = torch.randint(0, config.text_encoder.vocab_size, (2, 77), generator=torch.Generator())
    with torch.no_grad():
        errors["text"] = rel_l2(
            models.text_encoder(ids), theirs["text_encoder"](ids).last_hidden_state
        )
    return errors


@pytest.mark.parametrize("name", ["tiny", "tiny-v"])
def test_diffusers_folder_matches_diffusers_modules(tmp_path: Path, name: str) -> None:
    config = get_preset(name)
    theirs = write_pipeline_folder(config, tmp_path)
    errors = check_folder(tmp_path, config, theirs)
    print(f"folder oracle {name}: " + ", ".join(f"{k}={v:.2e}" for k, v in errors.items()))
    assert max(errors.values()) <= TOLERANCE, errors


def _rename_file(path: Path, rename) -> None:
    tensors = load_file(path)
    save_file({rename(k): v.contiguous() for k, v in tensors.items()}, path)


def test_diffusers_folder_variants(tmp_path: Path) -> None:
    """Older and alternative folder layouts load to the same modules.

    - text encoder keys with transformers' `text_model.` level (what the hub's SD folders hold)
      and as a PyTorch `.bin`;
    - VAE attention with pre-0.14 diffusers names (query/key/value/proj_attn), sharded;
    - UNet only as an fp16 variant (`diffusion_pytorch_model.fp16.safetensors`).
    """
    config = get_preset("tiny-v")
    theirs = write_pipeline_folder(config, tmp_path)
    text_file = tmp_path / "text_encoder" / "model.safetensors"
    tensors = load_file(text_file)
    torch.save(
        {"text_model." + k.removeprefix("text_model."): v for k, v in tensors.items()},
        tmp_path / "text_encoder" / "pytorch_model.bin",
    )
    text_file.unlink()

    legacy = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    vae_file = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(vae_file)
    renamed = {}
    for key, value in tensors.items():
        for new, old in legacy.items():
            key = key.replace(f"attentions.0.{new}", f"attentions.0.{old}")
        renamed[key] = value
    names = sorted(renamed)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for shard, keys in shards.items():
        save_file({k: renamed[k].contiguous() for k in keys}, tmp_path / "vae" / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    vae_file.unlink()

    unet_file = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(unet_file)
    save_file(
        {k: v.half() for k, v in tensors.items()},
        tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors",
    )
    unet_file.unlink()
    # Compare against the fp16-rounded weights.
    theirs["unet"].load_state_dict({k: v.half().float() for k, v in tensors.items()})

    errors = check_folder(tmp_path, config, theirs)
    assert max(errors.values()) <= TOLERANCE, errors


# --------------------------------------------------------------------------- folder errors


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pipeline") / "tiny"
    write_pipeline_folder(get_preset("tiny"), folder)
    return folder


def broken_copy(tiny_folder: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(tiny_folder, tmp_path / "copy"))


def expect_error(folder: Path, *parts: str, **kwargs: Any) -> None:
    from sd_deploy.errors import CheckpointError

    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(folder, **kwargs)
    message = str(excinfo.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)


def test_folder_overrides_and_hash(tiny_folder: Path, tmp_path: Path) -> None:
    base = load_checkpoint(tiny_folder)
    assert base.config.family == "tiny"
    forced = load_checkpoint(tiny_folder, prediction_type="v_prediction")
    assert forced.config.prediction_type == "v_prediction"
    assert forced.source_sha256 == base.source_sha256
    expect_error(tiny_folder, "does not match the tiny-v architecture", family="tiny-v")
    folder = broken_copy(tiny_folder, tmp_path)
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    tensors["quant_conv.bias"] = tensors["quant_conv.bias"] + 1
    save_file(tensors, path)
    assert load_checkpoint(folder).source_sha256 != base.source_sha256


def test_folder_missing_parts(tiny_folder: Path, tmp_path: Path) -> None:
    import shutil

    folder = broken_copy(tiny_folder, tmp_path)
    shutil.rmtree(folder / "text_encoder")
    expect_error(folder, "copy", "without text_encoder/")
    folder = broken_copy(tiny_folder, tmp_path / "b")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    expect_error(folder, "vae", "has no weights")
    folder = broken_copy(tiny_folder, tmp_path / "c")
    (folder / "model_index.json").write_text("{not json")
    expect_error(folder, "model_index.json", "not valid JSON")
    folder = broken_copy(tiny_folder, tmp_path / "d")
    (folder / "unet" / "config.json").unlink()
    expect_error(folder, "unet/config.json", "missing")


def test_folder_weights_that_do_not_fit(tiny_folder: Path, tmp_path: Path) -> None:
    folder = broken_copy(tiny_folder, tmp_path)
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    del tensors["conv_out.bias"]
    tensors["extra.weight"] = torch.zeros(2)
    tensors["conv_in.bias"] = torch.zeros(5)
    save_file(tensors, path)
    expect_error(
        folder, "copy", "1 missing key (unet/conv_out.bias)",
        "1 unexpected key (unet/extra.weight)", "unet/conv_in.bias is [5], expected [32]",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("component", "change", "message"),
    [
        ("unet", {"class_embed_type": "timestep"}, "class_embed_type='timestep' is not supported"),
        ("unet", {"cross_attention_dim": [64, 64]}, "cross_attention_dim"),
        ("unet", {"down_block_types": ["DownBlock2D"]}, "block types"),
        ("vae", {"use_quant_conv": False}, "use_quant_conv"),
        ("text_encoder", {"architectures": ["CLIPTextModelWithProjection"]}, "not supported"),
    ],
)
def test_folder_unsupported_configs(
    tiny_folder: Path, tmp_path: Path, component: str, change: dict, message: str
) -> None:
    folder = broken_copy(tiny_folder, tmp_path)
    path = folder / component / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    expect_error(folder, f"{component}/config.json", message)
