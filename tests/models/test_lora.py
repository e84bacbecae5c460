"""LoRA reading and merging without diffusers: formats, scales, and one-line errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_files import write_lora
from safetensors.torch import load_file, save_file

from sd_deploy.engine_dir.lora import read_safetensors, write_safetensors
from sd_deploy.models import build_random, get_preset
from sd_deploy.models.lora import (
    LoraError,
    LoraSpec,
    load_lora,
    lora_modules,
    merge_loras,
    parse_lora_arg,
    target_table,
)


@pytest.fixture(scope="module")
def models():
    return build_random(get_preset("tiny"), seed=1)


def weights(models) -> dict[str, torch.Tensor]:
    return {
        f"{c}.{t}": m.weight.detach().clone()
        for c, modules in lora_modules(models).items()
        for t, m in modules.items()
    }


def expect(match: str, fn, *args) -> str:
    with pytest.raises(LoraError) as excinfo:
        fn(*args)
    message = str(excinfo.value)
    assert "\n" not in message, message
    assert match in message, message
    return message


def test_parse_lora_arg() -> None:
    assert parse_lora_arg("a/b.safetensors:0.8") == LoraSpec(Path("a/b.safetensors"), 0.8)
    assert parse_lora_arg("b.safetensors") == LoraSpec(Path("b.safetensors"), 1.0)
    assert parse_lora_arg("b.safetensors:-1") == LoraSpec(Path("b.safetensors"), -1.0)
    assert parse_lora_arg(r"C:\loras\b.safetensors").path == Path(r"C:\loras\b.safetensors")
    assert parse_lora_arg("b.safetensors:0.5").name == "b"
    expect("is not a number", parse_lora_arg, "b.safetensors:strong")
    expect("not a finite number", parse_lora_arg, "b.safetensors:nan")


def test_numpy_reader_matches_safetensors(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 4, generator=g),
        "b": torch.randn(5, generator=g).half(),
        "c": torch.randn(2, 2, generator=g).bfloat16(),
        "d": torch.tensor(4.0),
    }
    save_file(tensors, tmp_path / "x.safetensors", metadata={"k": "v"})
    ours, metadata = read_safetensors(tmp_path / "x.safetensors")
    assert metadata == {"k": "v"}
    for key, value in tensors.items():
        np.testing.assert_array_equal(ours[key].astype(np.float32), value.float().numpy())
    write_safetensors(tmp_path / "y.safetensors", {k: v for k, v in ours.items() if k != "c"})
    again = load_file(tmp_path / "y.safetensors")
    assert torch.equal(again["b"], tensors["b"]) and torch.equal(again["a"], tensors["a"])


def test_scale_is_alpha_over_rank_times_user_scale(tmp_path: Path, models) -> None:
    path = write_lora(tmp_path / "k.safetensors", models, "kohya", rank=4, alpha=2.0)
    lora = load_lora(path)
    assert lora.format == "kohya" and all(layer.alpha == 2.0 for layer in lora.layers)
    assert lora.layers[0].scale(0.8) == pytest.approx(2.0 / 4 * 0.8)
    path = write_lora(tmp_path / "n.safetensors", models, "kohya", rank=4)
    assert load_lora(path).layers[0].scale(0.8) == pytest.approx(0.8)
    # both components and conv (LoCon) layers are covered
    kinds = {(lay.component, lay.down.ndim) for lay in lora.layers}
    assert kinds == {("unet", 2), ("unet", 4), ("text_encoder", 2)}


def test_merge_adds_scaled_product(tmp_path: Path) -> None:
    m = build_random(get_preset("tiny"), seed=1)
    before = weights(m)
    path = write_lora(tmp_path / "k.safetensors", m, "kohya", rank=4, alpha=1.0)
    applied = merge_loras(m, [LoraSpec(path, 0.5)])
    assert applied[0].name == "k" and applied[0].scale == 0.5 and len(applied[0].sha256) == 64
    tensors = load_file(path)
    target = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    kohya = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    expected = before[f"unet.{target}"] + 0.5 / 4 * (
        tensors[f"{kohya}.lora_up.weight"] @ tensors[f"{kohya}.lora_down.weight"]
    )
    after = dict(m.unet.named_parameters())[target]
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-6)
    untouched = "input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight"
    assert torch.equal(dict(m.unet.named_parameters())[untouched], before[f"unet.{untouched}"])


def test_ldm_named_kohya_keys_map_too(tmp_path: Path, models) -> None:
    """sgm-style kohya files name modules by ldm paths (input_blocks_1_1_...)."""
    table = target_table(models)
    name = "input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    assert table.aliases["unet"][name] == "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    diffusers_name = "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert table.aliases["unet"][diffusers_name] == table.aliases["unet"][name]
    assert table.aliases["text_encoder"]["text_model_encoder_layers_1_mlp_fc2"].endswith(
        "encoder.layers.1.mlp.fc2.weight"
    )


def _rewrite(path: Path, out: Path, change) -> Path:
    tensors = load_file(path)
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out)
    return out


def test_bad_loras_are_one_line_errors_and_change_nothing(tmp_path: Path) -> None:
    m = build_random(get_preset("tiny"), seed=1)
    before = weights(m)
    good = write_lora(tmp_path / "good.safetensors", m, "kohya", alpha=1.0)

    def merge(path):
        merge_loras(m, [LoraSpec(good, 1.0), LoraSpec(path, 1.0)])

    # keys that match nothing: the first few are named
    def unknown(t):
        for i in range(5):
            key = f"lora_unet_down_blocks_9_attentions_{i}_proj_in"
            t[f"{key}.lora_down.weight"] = torch.zeros(4, 2)
            t[f"{key}.lora_up.weight"] = torch.zeros(2, 4)

    msg = expect(
        "match no module of this tiny model",
        merge, _rewrite(good, tmp_path / "unknown.safetensors", unknown),
    )  # fmt: skip
    assert "lora_unet_down_blocks_9_attentions_0_proj_in" in msg and "and 2 more" in msg

    # shape mismatch
    def wrong_shape(t):
        key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
        t[f"{key}.lora_up.weight"] = torch.zeros(7, 4)

    expect("do not fit", merge, _rewrite(good, tmp_path / "shape.safetensors", wrong_shape))

    # another family's LoRA: SDXL's two text encoders, or SDXL's 2048-wide cross-attention
    def sdxl_te(t):
        t["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 1280)
        t["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(5120, 4)

    expect("is an SDXL LoRA", merge, _rewrite(good, tmp_path / "xl.safetensors", sdxl_te))

    def sdxl_context(t):
        key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
        t[f"{key}.lora_down.weight"] = torch.zeros(4, 2048)

    msg = expect("made for SDXL", merge, _rewrite(good, tmp_path / "xl2.safetensors", sdxl_context))
    assert "2048" in msg and "64" in msg

    # truncated file, not safetensors at all, a LyCORIS network we do not merge
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    expect("truncated", merge, tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"hello world, not a tensor file")
    expect("not a safetensors file", merge, tmp_path / "junk.safetensors")
    expect("does not exist", merge, tmp_path / "missing.safetensors")

    def loha(t):
        t["lora_unet_conv_in.hada_w1_a"] = torch.zeros(2, 2)

    expect("LoHa", merge, _rewrite(good, tmp_path / "loha.safetensors", loha))

    # a pickle: refused unless weights_only loading accepts it
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    expect("cannot be loaded safely", merge, tmp_path / "evil.pt")

    for key, value in weights(m).items():
        assert torch.equal(value, before[key]), key  # nothing was written


def test_pickle_lora_with_tensors_only_loads(tmp_path: Path, models) -> None:
    path = write_lora(tmp_path / "k.safetensors", models, "kohya", alpha=2.0)
    torch.save(load_file(path), tmp_path / "k.pt")
    a, b = load_lora(path), load_lora(tmp_path / "k.pt")
    assert [lay.key for lay in a.layers] == [lay.key for lay in b.layers]
    np.testing.assert_array_equal(a.layers[3].up, b.layers[3].up)


def test_formats_agree(tmp_path: Path) -> None:
    """The same pairs in kohya, PEFT and old-diffusers spellings merge to the same weights."""
    results = []
    for fmt in ("kohya", "peft", "lora_down_up"):
        m = build_random(get_preset("tiny-v"), seed=2)
        path = write_lora(tmp_path / f"{fmt}.safetensors", m, fmt, rank=3, seed=4)
        merge_loras(m, [LoraSpec(path, 0.9)])
        results.append(weights(m))
    for other in results[1:]:
        for key, value in results[0].items():
            assert torch.equal(value, other[key]), key


def test_sdxl_kohya_lora_merges_into_both_text_encoders(tmp_path: Path) -> None:
    """kohya's SDXL files: sgm UNet names, lora_te1_ (CLIP-L) and lora_te2_ (OpenCLIP bigG)."""
    from sd_deploy.models.checkpoints.layout import text_bare

    m = build_random(get_preset("tiny-xl"), seed=1)
    before = weights(m)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    chosen = {}
    for component, modules in lora_modules(m).items():
        for target, module in list(modules.items())[::5]:
            name = target.removesuffix(".weight")
            if component != "unet":
                name = "text_model." + text_bare(name)
                name = name.replace("text_model.text_projection", "text_projection")
            key = prefixes[component] + name.replace(".", "_")
            w = module.weight
            down = torch.randn(2, *w.shape[1:], generator=g)
            up = torch.randn(w.shape[0], 2, *([1, 1] if w.ndim == 4 else []), generator=g)
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
            chosen[f"{component}.{target}"] = (down, up)
    save_file(tensors, tmp_path / "xl.safetensors")
    merge_loras(m, [LoraSpec(tmp_path / "xl.safetensors", 0.5)])
    after = weights(m)
    for key, (down, up) in chosen.items():
        delta = 0.5 * (up.reshape(up.shape[0], -1) @ down.reshape(2, -1)).reshape(after[key].shape)
        torch.testing.assert_close(after[key], before[key] + delta, rtol=0, atol=1e-5)
    assert {k.split(".")[0] for k in chosen} == {"unet", "text_encoder", "text_encoder_2"}

    # an SD 1.x-style LoRA on SDXL: its widths give it away
    sd1 = write_lora(tmp_path / "sd1.safetensors", build_random(get_preset("tiny")), "kohya")
    msg = expect("was made for", merge_loras, m, [LoraSpec(sd1, 1.0)])
    assert "tiny-xl" in msg
