"""Clip skip in the PyTorch text encoder: A1111's meaning, checked against transformers."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def _rel_l2(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("skip", [1, 2, 3])
def test_clip_skip_is_hidden_state_minus_n_through_final_norm(skip):
    from sd_deploy.models.text_encoder import TextEncoder, TextEncoderConfig

    torch.manual_seed(0)
    config = TextEncoderConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2
    )
    encoder = TextEncoder(config).eval()
    ids = torch.randint(0, 49406, (2, 77))
    with torch.no_grad():
        ref = encoder.model(input_ids=ids, output_hidden_states=True)
        want = encoder.final_layer_norm(ref.hidden_states[-skip])
        got = encoder(ids, torch.tensor([skip], dtype=torch.int32))
    assert _rel_l2(got, want) <= 1e-5
    if skip == 1:
        assert _rel_l2(got, ref.last_hidden_state) <= 1e-6
    else:
        assert _rel_l2(got, ref.last_hidden_state) > 1e-2  # a different layer, not a no-op


def test_sd2_families_have_a_fixed_text_layer():
    from sd_deploy.models import PRESETS

    fixed = {name for name, p in PRESETS.items() if p.fixed_text_layer}
    # SDXL's towers are read at their penultimate layers, built into the graphs as well
    assert fixed == {"sd21", "sd21-base", "tiny-v", "sdxl", "tiny-xl"}
