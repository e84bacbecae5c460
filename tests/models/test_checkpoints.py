"""Single-file checkpoints: round trips, formats, EMA, detection, overrides, and bad inputs."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sd_deploy.engine_dir.hashing import sha256_file as file_sha256
from sd_deploy.errors import CheckpointError, UserError
from sd_deploy.models import LoadedModels, build_random, get_preset, load_models
from sd_deploy.models import checkpoints as ckpt
from sd_deploy.models.checkpoints import (
    assembly,
    diffusers_configs,
    ldm_state_dict,
    load_checkpoint,
    load_default_model,
    save_checkpoint,
    single_file,
)
from sd_deploy.models.checkpoints.readers import Reader
from sd_deploy.models.presets import PRESETS, ModelConfig

COMPONENTS = ("unet", "vae", "text_encoder")
# Every preset small enough for a quick test (tiny, tiny-v, and any added later).
# SD 1.x / 2.x-style small presets; tiny-xl (two towers, vector conditioning) has its own
# round trip and detection tests in tests/models/test_sdxl.py.
SMALL_PRESETS = [n for n, p in PRESETS.items() if not n.startswith("sd") and not p.is_sdxl]


# --------------------------------------------------------------------------- helpers


def assert_same_weights(a: LoadedModels, b: LoadedModels) -> None:
    for name in COMPONENTS:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert sb[key].dtype == sa[key].dtype, key
            assert torch.equal(sa[key], sb[key]), f"{name}: {key}"


def outputs(models: LoadedModels) -> dict[str, torch.Tensor]:
    config = models.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, config.unet.in_channels, 16, 16, generator=g)
    context = torch.randn(2, 77, config.unet.context_dim, generator=g)
    ids = torch.randint(0, config.text_encoder.vocab_size, (2, 77), generator=g)
    z = torch.randn(1, config.vae.z_channels, 8, 8, generator=g)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        return {
            "unet": models.unet(x, torch.tensor([999.0, 0.5]), context),
            "vae_decode": models.vae.decode(z),
            "vae_mean": models.vae.encode_moments(image)[0],
            "text": models.text_encoder(ids),
        }


def assert_same_outputs(a: LoadedModels, b: LoadedModels) -> None:
    oa, ob = outputs(a), outputs(b)
    for key in oa:
        assert torch.equal(oa[key], ob[key]), key


def one_line_error(excinfo: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)
    return message


@pytest.fixture(scope="module")
def tiny() -> LoadedModels:
    return build_random(get_preset("tiny"), seed=1)


@pytest.fixture(scope="module")
def tiny_state(tiny: LoadedModels) -> dict[str, torch.Tensor]:
    return ldm_state_dict(tiny)


# --------------------------------------------------------------------------- round trips


def test_saved_checkpoint_follows_the_umask(tmp_path: Path, tiny: LoadedModels) -> None:
    # safetensors alone creates 0600 files, unreadable to the rest of a team.
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tiny, tmp_path / "model.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("name", SMALL_PRESETS)
def test_round_trip_gives_identical_modules_and_outputs(tmp_path: Path, name: str) -> None:
    models = build_random(get_preset(name), seed=2)
    path = save_checkpoint(models, tmp_path / "model.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left
    loaded = load_checkpoint(path)
    assert loaded.config == models.config
    assert loaded.source == str(path)
    assert loaded.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.source_sha256 == file_sha256(path)
    assert loaded.tokenizer_dir is None
    assert all(not p.requires_grad for p in loaded.unet.parameters())
    assert not loaded.unet.training
    assert_same_weights(models, loaded)
    assert_same_outputs(models, loaded)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert metadata["family"] == name
    assert metadata["prediction_type"] == models.config.prediction_type
    assert json.loads(metadata["sd_deploy.config"])["unet"] == json.loads(
        json.dumps(dataclasses.asdict(models.config.unet))
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_loads_into_fp32(
    tmp_path: Path, tiny: LoadedModels, dtype: torch.dtype
) -> None:
    path = save_checkpoint(tiny, tmp_path / "half.safetensors", dtype=dtype)
    assert all(t.dtype == dtype for t in load_file(path).values() if t.is_floating_point())
    loaded = load_checkpoint(path)
    for name in COMPONENTS:
        ours = getattr(tiny, name).state_dict()
        for key, value in getattr(loaded, name).state_dict().items():
            assert value.dtype == torch.float32, key
            assert torch.equal(value, ours[key].to(dtype).float()), key


def test_load_models_casts_and_freezes(tmp_path: Path, tiny: LoadedModels) -> None:
    path = save_checkpoint(tiny, tmp_path / "m.safetensors")
    loaded = load_models(path, dtype=torch.float16)
    assert loaded.unet.dtype == torch.float16
    assert loaded.vae.dtype == torch.float16
    assert loaded.text_encoder.dtype == torch.float16
    assert not any(p.requires_grad for p in loaded.text_encoder.parameters())


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_torch_pickle_formats(
    tmp_path: Path, tiny: LoadedModels, tiny_state: dict, suffix: str
) -> None:
    path = tmp_path / f"model{suffix}"
    torch.save({"state_dict": tiny_state, "global_step": 123, "epoch": 4}, path)
    loaded = load_checkpoint(path)
    assert loaded.config == tiny.config  # detected from shapes
    assert_same_weights(tiny, loaded)


def test_torch_legacy_format_and_double_nesting(
    tmp_path: Path, tiny: LoadedModels, tiny_state: dict
) -> None:
    legacy = tmp_path / "legacy.ckpt"
    torch.save(tiny_state, legacy, _use_new_zipfile_serialization=False)
    assert_same_weights(tiny, load_checkpoint(legacy))
    nested = tmp_path / "nested.ckpt"
    torch.save({"state_dict": {"state_dict": tiny_state}, "global_step": 1}, nested)
    assert_same_weights(tiny, load_checkpoint(nested))


def test_format_is_told_by_content_not_extension(
    tmp_path: Path, tiny: LoadedModels, tiny_state: dict
) -> None:
    safetensors_as_ckpt = tmp_path / "really_safetensors.ckpt"
    save_file(tiny_state, safetensors_as_ckpt)
    assert_same_weights(tiny, load_checkpoint(safetensors_as_ckpt))


def test_ldm_extras_are_ignored(tmp_path: Path, tiny: LoadedModels, tiny_state: dict) -> None:
    extras = {
        "betas": torch.linspace(0, 1, 1000),
        "alphas_cumprod": torch.ones(1000),
        "posterior_mean_coef1": torch.ones(1000),
        "logvar": torch.zeros(1000),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(10, dtype=torch.int32),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
        "first_stage_model.loss.logvar": torch.zeros(()),
    }
    path = tmp_path / "extras.safetensors"
    save_file({**tiny_state, **extras}, path)
    assert_same_weights(tiny, load_checkpoint(path))


def ema_state(state: dict[str, torch.Tensor], offset: float) -> dict[str, torch.Tensor]:
    """ldm's LitEma naming: `model_ema.` + the key after `model.` with the dots removed."""
    return {
        "model_ema." + "".join(k.split(".")[1:]): v + offset
        for k, v in state.items()
        if k.startswith("model.diffusion_model.")
    }


def test_ema_weights_are_used_for_the_unet(
    tmp_path: Path, tiny: LoadedModels, tiny_state: dict
) -> None:
    ema = ema_state(tiny_state, 1.0)
    path = tmp_path / "ema.ckpt"
    torch.save({"state_dict": {**tiny_state, **ema, "model_ema.decay": torch.tensor(0.99)}}, path)
    with_ema = load_checkpoint(path)
    for key, value in with_ema.unet.state_dict().items():
        assert torch.equal(value, tiny.unet.state_dict()[key] + 1.0), key
    assert_same_outputs_vae_text(tiny, with_ema)
    without = load_checkpoint(path, use_ema=False)
    assert_same_weights(tiny, without)

    incomplete = dict(ema)
    incomplete.pop(next(iter(incomplete)))
    path2 = tmp_path / "ema_incomplete.safetensors"
    save_file({**tiny_state, **incomplete}, path2)
    assert_same_weights(tiny, load_checkpoint(path2))  # partial EMA sets are ignored


def assert_same_outputs_vae_text(a: LoadedModels, b: LoadedModels) -> None:
    for name in ("vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_text_model_level_optional_in_sd1_files(
    tmp_path: Path, tiny: LoadedModels, tiny_state: dict
) -> None:
    """Very old SD 1.x files have cond_stage_model.transformer.<keys> without text_model."""
    flat = {k.replace("transformer.text_model.", "transformer."): v for k, v in tiny_state.items()}
    path = tmp_path / "flat.safetensors"
    save_file(flat, path)
    assert_same_weights(tiny, load_checkpoint(path))


def test_vae_attention_stored_as_linear(
    tmp_path: Path, tiny: LoadedModels, tiny_state: dict
) -> None:
    """Some VAEs store the mid-block attention q/k/v/proj_out as [C, C] instead of [C, C, 1, 1]."""
    state = {
        k: (v[:, :, 0, 0] if ".mid.attn_1." in k and v.ndim == 4 else v)
        for k, v in tiny_state.items()
    }
    path = tmp_path / "linear_attn.safetensors"
    save_file(state, path)
    assert_same_weights(tiny, load_checkpoint(path))


# --------------------------------------------------------------------------- detection


def strip_metadata(path: Path, metadata: dict[str, str] | None = None) -> Path:
    out = path.with_name(path.stem + "-plain.safetensors")
    save_file(load_file(path), out, metadata=metadata)
    return out


@pytest.mark.parametrize("name", SMALL_PRESETS)
def test_presets_detected_from_shapes(tmp_path: Path, name: str) -> None:
    models = build_random(get_preset(name), seed=4)
    plain = strip_metadata(save_checkpoint(models, tmp_path / "m.safetensors"))
    loaded = load_checkpoint(plain)
    assert loaded.config == models.config
    assert_same_outputs(models, loaded)


def test_overrides(tmp_path: Path, tiny: LoadedModels) -> None:
    path = save_checkpoint(tiny, tmp_path / "m.safetensors")
    plain = strip_metadata(path)
    assert load_checkpoint(path, prediction_type="v_prediction").config.prediction_type == (
        "v_prediction"
    )
    forced = load_checkpoint(plain, family="tiny", prediction_type="v_prediction")
    assert forced.config == tiny.config.with_prediction_type("v_prediction")
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(plain, family="tiny-v")
    one_line_error(excinfo, "plain.safetensors", "does not match the tiny-v architecture")
    with pytest.raises(UserError, match="unknown model preset"):
        load_checkpoint(plain, family="sd9")
    with pytest.raises(UserError, match="prediction type"):
        load_checkpoint(plain, prediction_type="sample")
    # ModelSpec-style metadata written by other tools.
    spec = strip_metadata(path, {"modelspec.prediction_type": "v"})
    assert load_checkpoint(spec).config.prediction_type == "v_prediction"


class ShapeReader(Reader):
    """Shapes (and extras/metadata) only: enough for detection without any weights."""

    def __init__(self, shapes: dict, metadata: dict | None = None, extras: dict | None = None):
        self.path = Path("shapes-only.safetensors")
        self.shapes = shapes
        self.metadata = metadata or {}
        self.extras = extras or {}


def meta_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    modules = assembly.meta_modules(config)
    models = LoadedModels(
        modules["unet"], modules["vae"], modules["text_encoder"], config, source="meta"
    )
    return {k: tuple(v.shape) for k, v in ldm_state_dict(models).items()}


@pytest.mark.parametrize(
    ("preset", "metadata", "extras", "expected", "prediction"),
    [
        ("sd15", {}, {}, "sd15", "epsilon"),
        ("sd21", {}, {}, "sd21", "v_prediction"),
        ("sd21", {}, {"global_step": 875000}, "sd21-base", "epsilon"),
        ("sd21-base", {}, {"global_step": 110000}, "sd21", "v_prediction"),
        ("sd21", {"prediction_type": "epsilon"}, {}, "sd21-base", "epsilon"),
        ("sd21", {"family": "sd21-base"}, {}, "sd21-base", "epsilon"),
    ],
)
def test_full_size_family_detection(
    preset: str, metadata: dict, extras: dict, expected: str, prediction: str
) -> None:
    """SD 2.x 768-v and 512-base share every shape: metadata, then global_step, decide."""
    reader = ShapeReader(meta_shapes(get_preset(preset)), metadata, extras)
    config, _ = single_file.single_file_config(reader, None, None)
    assert config.family == expected
    assert config.prediction_type == prediction
    assert config.unet == get_preset(expected).unet
    assert config.text_encoder == get_preset(expected).text_encoder
    forced, _ = single_file.single_file_config(reader, None, "v_prediction")
    assert forced.prediction_type == "v_prediction"
    # --prediction-type picks between same-shaped presets, unless the file names its family.
    assert forced.family == metadata.get("family", "sd15" if preset == "sd15" else "sd21")


CUSTOM_SD1 = replace(
    get_preset("tiny"),
    family="custom",
    unet=replace(
        get_preset("tiny").unet, model_channels=64, channel_mult=(1, 1, 2),
        num_res_blocks=2, attention_resolutions=(2, 4), num_heads=8, in_channels=9,
    ),
    vae=replace(get_preset("tiny").vae, ch_mult=(1, 2, 2, 2), num_res_blocks=2),
    text_encoder=replace(
        get_preset("tiny").text_encoder, num_hidden_layers=3, num_attention_heads=1
    ),
)  # fmt: skip
CUSTOM_SD2 = replace(
    get_preset("tiny-v"),
    family="custom",
    unet=replace(
        get_preset("tiny-v").unet, model_channels=64, channel_mult=(1, 2),
        attention_resolutions=(1, 2), num_head_channels=64, transformer_depth=2,
    ),
    text_encoder=replace(
        get_preset("tiny-v").text_encoder, hidden_size=128, intermediate_size=256,
        num_attention_heads=2,
    ),
)  # fmt: skip


CUSTOM_NARROW = replace(
    get_preset("tiny"),
    family="custom",
    unet=replace(
        get_preset("tiny").unet, model_channels=48, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(2,), num_heads=8, norm_num_groups=16,
    ),
    vae=replace(get_preset("tiny").vae, ch=16, ch_mult=(1, 2, 2, 2), norm_num_groups=16),
    text_encoder=replace(get_preset("tiny").text_encoder, num_attention_heads=1),
)  # fmt: skip


@pytest.mark.parametrize(
    "config", [CUSTOM_SD1, CUSTOM_SD2, CUSTOM_NARROW], ids=["sd1-like", "sd2-like", "narrow"]
)
def test_custom_architecture_built_from_shapes(tmp_path: Path, config: ModelConfig) -> None:
    models = build_random(config, seed=6)
    plain = strip_metadata(save_checkpoint(models, tmp_path / "custom.safetensors"))
    loaded = load_checkpoint(plain)
    assert loaded.config.family == "custom"
    assert loaded.config.unet == config.unet
    assert loaded.config.vae == config.vae
    assert loaded.config.text_encoder == config.text_encoder
    assert loaded.config.prediction_type == config.prediction_type
    assert_same_outputs(models, loaded)


def test_metadata_config_pins_what_shapes_cannot(tmp_path: Path) -> None:
    """Head counts are invisible in weights; our metadata keeps them exact."""
    config = replace(CUSTOM_SD1, unet=replace(CUSTOM_SD1.unet, num_heads=4))
    models = build_random(config, seed=8)
    path = save_checkpoint(models, tmp_path / "heads.safetensors")
    assert load_checkpoint(path).config == config
    assert load_checkpoint(strip_metadata(path)).config.unet.num_heads == 8  # the fallback


# --------------------------------------------------------------------------- bad inputs


def test_missing_keys(tmp_path: Path, tiny_state: dict) -> None:
    state = dict(tiny_state)
    del state["model.diffusion_model.out.2.bias"]
    del state["first_stage_model.decoder.conv_out.weight"]
    path = tmp_path / "missing.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    one_line_error(
        excinfo, "missing.safetensors", "2 missing keys",
        "model.diffusion_model.out.2.bias", "first_stage_model.decoder.conv_out.weight",
    )  # fmt: skip


def test_unexpected_keys(tmp_path: Path, tiny_state: dict) -> None:
    state = {
        **tiny_state,
        "model.diffusion_model.extra.weight": torch.zeros(3),
        "control_model.zero_convs.0.0.weight": torch.zeros(3),
    }
    path = tmp_path / "unexpected.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    one_line_error(
        excinfo, "unexpected.safetensors", "2 unexpected keys",
        "model.diffusion_model.extra.weight", "control_model.zero_convs.0.0.weight",
    )  # fmt: skip


def test_wrong_shapes(tmp_path: Path, tiny_state: dict) -> None:
    state = dict(tiny_state)
    state["first_stage_model.quant_conv.bias"] = torch.zeros(9)
    path = tmp_path / "shapes.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    one_line_error(
        excinfo, "shapes.safetensors", "1 wrong shape",
        "first_stage_model.quant_conv.bias is [9], expected [8]",
    )  # fmt: skip


def test_many_problems_stay_one_line(tmp_path: Path, tiny: LoadedModels) -> None:
    path = save_checkpoint(tiny, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path, family="sd15")
    message = one_line_error(excinfo, "does not match the sd15 architecture", "--family")
    assert len(message) < 1000


def test_non_float_tensor_refused(tmp_path: Path, tiny_state: dict) -> None:
    state = dict(tiny_state)
    state["model.diffusion_model.out.2.bias"] = torch.zeros(4, dtype=torch.int32)
    path = tmp_path / "ints.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    one_line_error(excinfo, "ints.safetensors", "out.2.bias", "int32")


def test_truncated_safetensors(tmp_path: Path, tiny: LoadedModels) -> None:
    path = save_checkpoint(tiny, tmp_path / "full.safetensors")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(truncated)
    one_line_error(excinfo, "truncated.safetensors", "truncated or corrupted")


def test_safetensors_header_that_lies(tmp_path: Path) -> None:
    header = json.dumps(
        {"model.diffusion_model.out.2.bias": {"dtype": "F32", "shape": [1000, 1000],
                                              "data_offsets": [0, 4_000_000]}}
    ).encode()  # fmt: skip
    path = tmp_path / "lies.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    one_line_error(excinfo, "lies.safetensors", "not a valid safetensors file")
    huge = tmp_path / "huge_header.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**9) + b'{"a": 1}')
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(huge)
    one_line_error(excinfo, "huge_header.safetensors", "header", "truncated or corrupted")


def test_truncated_zip_checkpoint(tmp_path: Path, tiny_state: dict) -> None:
    path = tmp_path / "full.ckpt"
    torch.save({"state_dict": tiny_state}, path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(truncated)
    one_line_error(excinfo, "truncated.ckpt", "truncated or corrupted")


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_random_bytes(tmp_path: Path, suffix: str) -> None:
    data = bytearray(random.Random(0).randbytes(4096))
    data[0], data[8] = ord("x"), ord("y")  # neither a pickle, zip nor safetensors start
    path = tmp_path / f"noise{suffix}"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    one_line_error(excinfo, f"noise{suffix}", "is not a checkpoint")


def test_pickle_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x80\x02" + random.Random(1).randbytes(100))
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(garbage)
    one_line_error(excinfo, "garbage.ckpt", "not a PyTorch checkpoint")
    a_list = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], a_list)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(a_list)
    one_line_error(excinfo, "list.pt", "not a checkpoint", "list")
    no_tensors = tmp_path / "no_tensors.pt"
    torch.save({"global_step": 3}, no_tensors)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(no_tensors)
    one_line_error(excinfo, "no_tensors.pt", "no tensors")


def test_unsafe_pickle_refused(tmp_path: Path, tiny_state: dict) -> None:
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": tiny_state, "hparams": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    one_line_error(excinfo, "unsafe.ckpt", "argparse.Namespace", "can execute code", ".safetensors")


def test_json_and_empty_files(tmp_path: Path) -> None:
    as_safetensors = tmp_path / "config.safetensors"
    as_safetensors.write_text(json.dumps({"model": "sd15", "padding": "x" * 100}))
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(as_safetensors)
    one_line_error(excinfo, "config.safetensors", "is not a checkpoint")
    as_json = tmp_path / "config.json"
    as_json.write_text("{}")
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(as_json)
    one_line_error(excinfo, "config.json", "unknown checkpoint type '.json'")
    for name in ("empty.safetensors", "empty.ckpt"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(CheckpointError) as excinfo:
            load_checkpoint(tmp_path / name)
        one_line_error(excinfo, name, "empty")


def test_unknown_extension_directory_and_missing_path(tmp_path: Path, tiny: LoadedModels) -> None:
    onnx = tmp_path / "model.onnx"
    save_file({"a": torch.zeros(1)}, onnx)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(onnx)
    one_line_error(excinfo, "model.onnx", "unknown checkpoint type", ".safetensors")
    folder = tmp_path / "not_diffusers"
    folder.mkdir()
    save_checkpoint(tiny, folder / "inside.safetensors")
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(folder)
    one_line_error(excinfo, "not_diffusers", "not a diffusers model folder", "model_index.json")
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(tmp_path / "nope.safetensors")
    one_line_error(excinfo, "nope.safetensors", "does not exist")


def test_files_that_are_not_stable_diffusion(tmp_path: Path, tiny_state: dict) -> None:
    other = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.alpha": torch.zeros(()), "x.weight": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(other)
    one_line_error(excinfo, "lora.safetensors", "does not look like a Stable Diffusion checkpoint")
    component = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({"conv_in.weight": torch.zeros(1), "down_blocks.0.x": torch.zeros(1)}, component)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(component)
    one_line_error(excinfo, "diffusion_pytorch_model.safetensors", "diffusers folder")
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({**tiny_state, "conditioner.embedders.0.transformer.x": torch.zeros(1)}, sdxl)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(sdxl)
    one_line_error(excinfo, "sdxl.safetensors", "SDXL")


def test_save_checkpoint_wants_safetensors(tmp_path: Path, tiny: LoadedModels) -> None:
    with pytest.raises(CheckpointError, match="safetensors"):
        save_checkpoint(tiny, tmp_path / "model.ckpt")


# --------------------------------------------------------------------------- default model


def test_default_model_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(ckpt, "DEFAULT_MODEL_PATH", tmp_path / "data" / "x" / "model.safetensors")
    for call in (load_default_model, lambda: load_models(None), lambda: load_models("default")):
        with pytest.raises(CheckpointError) as excinfo:
            call()
        one_line_error(excinfo, "default model is not in this install", "--model",
                       "--random-weights")  # fmt: skip


def test_default_model_present(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny: LoadedModels
) -> None:
    path = save_checkpoint(tiny, tmp_path / "default_model" / "model.safetensors")
    monkeypatch.setattr(ckpt, "DEFAULT_MODEL_PATH", path)
    loaded = load_models()
    assert loaded.source == "default"
    assert loaded.source_sha256 == file_sha256(path)
    assert_same_weights(tiny, loaded)


# --------------------------------------------------------------------------- hub-style configs

_SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
_SD21_UNET = {
    **_SD15_UNET,
    "_diffusers_version": "0.10.0.dev0",
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}
_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
_SD15_TEXT = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "float32",
    "vocab_size": 49408,
}
_SD21_TEXT = {
    **_SD15_TEXT, "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
    "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512,
}  # fmt: skip


@pytest.mark.parametrize(
    ("unet", "text", "prediction", "pad", "expected"),
    [
        (_SD15_UNET, _SD15_TEXT, "epsilon", "<|endoftext|>", "sd15"),
        (_SD21_UNET, _SD21_TEXT, "v_prediction", "!", "sd21"),
        ({**_SD21_UNET, "upcast_attention": False}, _SD21_TEXT, "epsilon", "!", "sd21-base"),
    ],
)
def test_hub_style_folder_configs_map_to_presets(
    tmp_path: Path, unet: dict, text: dict, prediction: str, pad: str, expected: str
) -> None:
    """The config.json files of the released SD 1.5 / 2.1 / 2.1-base folders give our presets."""
    for name, config in (("unet", unet), ("vae", _VAE), ("text_encoder", text)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    (tmp_path / "scheduler").mkdir()
    scheduler = {
        "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "num_train_timesteps": 1000, "prediction_type": prediction,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    }  # fmt: skip
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    (tmp_path / "tokenizer").mkdir()
    vocab = {"!": 0, "<|startoftext|>": 49406, "<|endoftext|>": 49407}
    (tmp_path / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "tokenizer" / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad}))
    config, _ = diffusers_configs.folder_config(tmp_path, None, None)
    assert config == get_preset(expected)


def test_persistent_position_ids_are_rebuilt(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny: LoadedModels, tiny_state: dict
) -> None:
    """Older transformers keep CLIP's position_ids in the state dict: never read, always 0..76."""
    build = assembly.meta_modules

    def with_persistent_position_ids(config: ModelConfig) -> dict:
        modules = build(config)
        clip = modules["text_encoder"].model
        embeddings = getattr(clip, "text_model", clip).embeddings
        embeddings.register_buffer("position_ids", embeddings.position_ids, persistent=True)
        return modules

    monkeypatch.setattr(assembly, "meta_modules", with_persistent_position_ids)
    damaged = torch.arange(77, dtype=torch.float32)[None] + 0.4  # as in some merged SD 1.x files
    path = tmp_path / "positions.safetensors"
    save_file(
        {**tiny_state, "cond_stage_model.transformer.text_model.embeddings.position_ids": damaged},
        path,
    )
    loaded = load_checkpoint(path)
    assert any(k.endswith("position_ids") for k in loaded.text_encoder.state_dict())
    clip = loaded.text_encoder.model
    positions = getattr(clip, "text_model", clip).embeddings.position_ids
    assert torch.equal(positions, torch.arange(77)[None])
    assert_same_outputs(tiny, loaded)
