"""SDXL as a family of its own: sgm-layout modules against diffusers, loading, bad input.

Oracle: our tiny-xl modules' weights, converted by diffusers' own single-file code
(tests/models/sdxl_oracle.py), must give what our modules give (fp32 rel L2 <= 1e-4) in
UNet2DConditionModel (with text_embeds / time_ids), AutoencoderKL, CLIPTextModel
(hidden_states[-2]) and CLIPTextModelWithProjection (hidden_states[-2], text_embeds).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sd_deploy.errors import CheckpointError
from sd_deploy.models import build_random, get_preset, load_models
from sd_deploy.models.checkpoints import ldm_state_dict, load_checkpoint, save_checkpoint
from sd_deploy.models.unet import count_parameters, sdxl_vector

TOLERANCE = 1e-4


def rel_l2(ours: torch.Tensor, reference: torch.Tensor) -> float:
    ours, reference = ours.double(), reference.double()
    return ((ours - reference).norm() / reference.norm()).item()


@pytest.fixture(scope="module")
def tiny_xl():
    return build_random(get_preset("tiny-xl"), seed=5)


@pytest.fixture(scope="module")
def tiny_xl_file(tiny_xl, tmp_path_factory) -> Path:
    """tiny-xl in sgm layout without our metadata: found from the tensor shapes alone."""
    path = tmp_path_factory.mktemp("xl") / "tiny-xl.safetensors"
    save_file(ldm_state_dict(tiny_xl), str(path))
    return path


def ids(batch: int, pad: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = torch.full((batch, 77), pad, dtype=torch.long)
    for row in range(batch):
        n = 5 + 7 * row
        out[row, 0] = 49406
        out[row, 1 : n + 1] = torch.randint(0, 49406, (n,), generator=g)
        out[row, n + 1] = 49407
    return out


def test_single_file_conversion_matches_diffusers_tiny_xl(tiny_xl) -> None:
    pytest.importorskip("diffusers")
    from tests.models.sdxl_oracle import diffusers_sdxl_modules

    theirs = diffusers_sdxl_modules(tiny_xl)
    g = torch.Generator().manual_seed(3)
    tok, tok_2 = ids(2, 49407, 1), ids(2, 0, 1)
    sample = torch.randn(2, 4, 16, 12, generator=g)
    timestep = torch.tensor([981.0, 7.25])
    time_ids = torch.tensor([[1024.0, 768, 0, 0, 1024, 768], [128, 96, 16, 8, 128, 96]])
    z = torch.randn(2, 4, 8, 8, generator=g)
    image = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    errors = {}
    with torch.no_grad():
        h1 = tiny_xl.text_encoder(tok)
        h2, pooled = tiny_xl.text_encoder_2(tok_2)
        errors["text_encoder"] = rel_l2(
            h1, theirs["text_encoder"](tok, output_hidden_states=True).hidden_states[-2]
        )
        out_2 = theirs["text_encoder_2"](tok_2, output_hidden_states=True)
        errors["text_encoder_2.hidden"] = rel_l2(h2, out_2.hidden_states[-2])
        errors["text_encoder_2.text_embeds"] = rel_l2(pooled, out_2.text_embeds)
        context = torch.cat([h1, h2], dim=-1)
        ours = tiny_xl.unet(sample, timestep, context, sdxl_vector(pooled, time_ids))
        reference = theirs["unet"](
            sample,
            timestep,
            encoder_hidden_states=context,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample
        errors["unet"] = rel_l2(ours, reference)
        errors["vae_decode"] = rel_l2(tiny_xl.vae.decode(z), theirs["vae"].decode(z).sample)
        mean, logvar = tiny_xl.vae.encode_moments(image)
        dist = theirs["vae"].encode(image).latent_dist
        errors["vae_mean"] = rel_l2(mean, dist.mean)
        errors["vae_logvar"] = rel_l2(logvar, dist.logvar)
    print("sdxl oracle tiny-xl: " + ", ".join(f"{k}={v:.2e}" for k, v in errors.items()))
    assert max(errors.values()) <= TOLERANCE, errors


def test_sdxl_preset_has_the_real_parameter_counts() -> None:
    from sd_deploy.models.loaded import build_modules

    with torch.device("meta"):
        modules = build_modules(get_preset("sdxl"))
    counts = {name: count_parameters(m) for name, m in modules.items()}
    # diffusers' stabilityai/stable-diffusion-xl-base-1.0 components
    assert counts == {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    }


def test_sgm_single_file_loads_by_shapes_and_round_trips(tiny_xl, tiny_xl_file, tmp_path) -> None:
    loaded = load_checkpoint(tiny_xl_file)
    assert loaded.config == get_preset("tiny-xl")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(tiny_xl, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    # fp16 file with our metadata, and --family tiny-xl, load too
    saved = save_checkpoint(tiny_xl, tmp_path / "half.safetensors", dtype=torch.float16)
    assert load_checkpoint(saved).config.family == "tiny-xl"
    assert load_models(tiny_xl_file, family="tiny-xl").config.family == "tiny-xl"


def test_random_weights_preset_is_seeded() -> None:
    a = load_models("tiny-xl", random_init=True, seed=2)
    b = load_models("tiny-xl", random_init=True, seed=2)
    assert a.text_encoder_2 is not None
    assert torch.equal(a.unet.label_emb[0][0].weight, b.unet.label_emb[0][0].weight)


# --------------------------------------------------------------------------- bad input


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_sdxl_file_with_family_sd15_is_one_line(tiny_xl_file) -> None:
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tiny_xl_file, family="sd15")
    assert "is an SDXL checkpoint" in _one_line(exc) and "--family sd15" in str(exc.value)


def test_sd_file_with_family_sdxl_is_one_line(tmp_path) -> None:
    path = save_checkpoint(build_random(get_preset("tiny")), tmp_path / "sd.safetensors")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, family="sdxl")
    assert "not an SDXL checkpoint" in _one_line(exc)


def test_refiner_is_refused(tiny_xl, tmp_path) -> None:
    sd = ldm_state_dict(tiny_xl)
    # the refiner's layout: bigG alone as embedders.0, 2560-wide vector conditioning
    refiner = {
        k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v
        for k, v in sd.items()
        if not k.startswith("conditioner.embedders.0.")
    }
    path = tmp_path / "refiner.safetensors"
    save_file(refiner, str(path))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    assert "SDXL refiner" in _one_line(exc)
    sd = dict(sd)
    sd["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(128, 2560)
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="SDXL refiner"):
        load_checkpoint(path, family="tiny-xl")


def test_sdxl_lora_where_a_base_is_expected(tmp_path) -> None:
    lora = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": (
            torch.zeros(4, 640)
        ),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": (
            torch.zeros(640, 4)
        ),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280),
    }
    path = tmp_path / "xl_lora.safetensors"
    save_file(lora, str(path))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    assert "LoRA file" in _one_line(exc)


def test_truncated_sdxl_files_are_one_line(tiny_xl_file, tiny_xl, tmp_path) -> None:
    data = tiny_xl_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(cut)
    _one_line(exc)
    # a complete file missing part of a tower and of the UNet: validation names the keys
    sd = {
        k: v
        for k, v in ldm_state_dict(tiny_xl).items()
        if ".resblocks.2." not in k and "output_blocks.5." not in k
    }
    short = tmp_path / "short.safetensors"
    save_file(sd, str(short))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(short)
    text = _one_line(exc)
    assert "tiny-xl" in text and "missing key" in text


def test_diffusers_sdxl_folder_loads_into_the_same_modules(tiny_xl, tmp_path) -> None:
    """A StableDiffusionXLPipeline folder (text_encoder_2/, tokenizer_2/) saved by diffusers
    from diffusers' conversion of our weights loads back into identical modules."""
    diffusers = pytest.importorskip("diffusers")
    import json

    from sd_deploy.runtime.tokenizer import write_clip_tokenizer_files
    from tests.models.sdxl_oracle import diffusers_sdxl_modules

    folder = tmp_path / "xl"
    for name, module in diffusers_sdxl_modules(tiny_xl).items():
        module.save_pretrained(folder / name)
    write_clip_tokenizer_files(folder / "tokenizer")
    write_clip_tokenizer_files(folder / "tokenizer_2")
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    loaded = load_checkpoint(folder)
    assert loaded.config.family == "tiny-xl"
    assert loaded.tokenizer_2_dir == folder / "tokenizer_2"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(tiny_xl, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    # the refiner's folder (no text_encoder/) is refused in one line
    import shutil

    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(CheckpointError, match="SDXL refiner"):
        load_checkpoint(folder)
