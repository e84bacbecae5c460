"""Optimization profiles from the manifest's ranges and the sd-build flags."""

from __future__ import annotations

import pytest

from sd_deploy.engine_dir import shapes
from sd_deploy.engine_dir.manifest import read_manifest
from sd_deploy.engine_dir.shapes import (
    build_ranges,
    check_within,
    component_profile,
    profile_difference,
    wanted_profile,
)
from sd_deploy.errors import BuildError


@pytest.fixture
def manifest(engine_dir):
    return read_manifest(engine_dir)


def test_no_flags_is_the_manifests_profile(manifest):
    for spec in manifest.components.values():
        assert wanted_profile(spec, 8) == spec.profile_shapes


def test_recomputed_profile_matches_the_exporters(manifest):
    # The exporter wrote profile_shapes with the same helper: recomputing from the
    # unnarrowed ranges must give the same shapes.
    for spec in manifest.components.values():
        assert component_profile(spec, spec.shape_ranges, 8) == spec.profile_shapes


def test_cfg_batch_doubles_for_unet_and_text_encoder_only(manifest):
    unet = wanted_profile(manifest.components["unet"], 8, batch="1:2:3")
    assert unet["sample"] == {"min": [1, 4, 4, 4], "opt": [4, 4, 8, 8], "max": [6, 4, 16, 16]}
    assert unet["timestep"] == {"min": [1], "opt": [4], "max": [6]}
    assert unet["encoder_hidden_states"]["max"] == [6, 77, 64]
    text = wanted_profile(manifest.components["text_encoder"], 8, batch="1:2:3")
    assert text["input_ids"] == {"min": [1, 77], "opt": [4, 77], "max": [6, 77]}
    vae = wanted_profile(manifest.components["vae_decoder"], 8, batch="1:2:3")
    assert vae["latent"] == {"min": [1, 4, 4, 4], "opt": [2, 4, 8, 8], "max": [3, 4, 16, 16]}


def test_unguided_min_keeps_a_single_image(manifest):
    unet = wanted_profile(manifest.components["unet"], 8, batch="2:2:4")
    assert unet["sample"]["min"][0] == 2  # min batch 2, unguided: 2 rows, not 4
    assert unet["sample"]["opt"][0] == 4


def test_height_and_width_narrowing(manifest):
    unet = wanted_profile(manifest.components["unet"], 8, height="64:64:128", width="32:64:64")
    assert unet["sample"] == {"min": [1, 4, 8, 4], "opt": [2, 4, 8, 8], "max": [8, 4, 16, 8]}
    vae = wanted_profile(manifest.components["vae_encoder"], 8, height="64", width="64")
    assert vae["images"] == {"min": [1, 3, 64, 64], "opt": [1, 3, 64, 64], "max": [4, 3, 64, 64]}


def test_static_is_min_opt_max_at_opt(manifest):
    unet = wanted_profile(manifest.components["unet"], 8, static=True)
    assert unet["sample"] == {"min": [2, 4, 8, 8], "opt": [2, 4, 8, 8], "max": [2, 4, 8, 8]}
    vae = wanted_profile(manifest.components["vae_decoder"], 8, static=True)
    assert vae["latent"] == {"min": [1, 4, 8, 8], "opt": [1, 4, 8, 8], "max": [1, 4, 8, 8]}
    unet2 = wanted_profile(manifest.components["unet"], 8, batch="2", height="96", static=True)
    assert unet2["sample"]["min"] == unet2["sample"]["max"] == [4, 4, 12, 8]


def test_static_ranges_collapse(manifest):
    ranges = build_ranges(manifest.components["unet"], batch="1:2:4", static=True)
    assert ranges.to_json() == {
        "batch": [2, 2, 2],
        "height": [64, 64, 64],
        "width": [64, 64, 64],
        "context_length": [77, 77, 77],  # the default one-chunk context
    }


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        ({"batch": "1:1:8"}, "outside the exported range 1:1:4"),
        ({"height": "16:64:128"}, "outside the exported range 32:64:128"),
        ({"width": "32:64:256"}, "outside the exported range 32:64:128"),
        ({"height": "30:64:128"}, "not a multiple of 8"),
        ({"batch": "4:2:1"}, "inverted"),
        ({"batch": "two"}, "not N or MIN:OPT:MAX"),
        ({"batch": "1:2"}, "not N or MIN:OPT:MAX"),
        ({"batch": "0:1:2"}, "must be positive"),
    ],
)
def test_bad_flags_are_one_line_build_errors(manifest, flags, words):
    with pytest.raises(BuildError) as info:
        wanted_profile(manifest.components["unet"], 8, **flags)
    message = str(info.value)
    assert words in message
    assert "\n" not in message


def test_check_within_names_the_input(manifest):
    spec = manifest.components["unet"]
    wide = component_profile(spec, shapes.narrow(spec.shape_ranges, None, None, None), 8)
    check_within(wide, spec.profile_shapes, "unet profile")
    wide["timestep"]["max"] = [16]
    with pytest.raises(BuildError, match=r"unet profile: timestep max shape \[16\] is outside"):
        check_within(wide, spec.profile_shapes, "unet profile")
    with pytest.raises(BuildError, match="'extra' is not an input"):
        check_within({"extra": wide["timestep"]}, spec.profile_shapes, "unet profile")


def test_profile_difference_and_format(manifest):
    spec = manifest.components["unet"]
    same = wanted_profile(spec, 8)
    assert profile_difference(spec.profile_shapes, same) == ""
    narrower = wanted_profile(spec, 8, batch="1:1:2")
    assert profile_difference(spec.profile_shapes, narrower) == (
        "encoder_hidden_states max shape is [8, 77, 64], wanted [4, 77, 64]"
    )
    assert "missing" in profile_difference({}, same)
