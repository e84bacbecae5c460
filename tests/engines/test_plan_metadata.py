"""Plan metadata: round trip, and each reason a plan is stale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sd_deploy.engine_dir.hashing import files_sha256
from sd_deploy.engine_dir.manifest import read_manifest
from sd_deploy.engine_dir.plans import (
    Fresh,
    PlanMetadata,
    Stale,
    plan_metadata_path,
    plan_path,
    plan_status,
    read_metadata,
    source_onnx_sha256,
    write_metadata,
)
from sd_deploy.engine_dir.shapes import wanted_profile


def write_plan(engine_dir: Path, name: str, env: dict[str, str], **changes) -> PlanMetadata:
    """A plan file plus metadata as sd-build would leave them, with `changes` applied."""
    spec = read_manifest(engine_dir).components[name]
    plan = plan_path(engine_dir, name)
    plan.write_bytes(b"serialized engine " + name.encode())
    metadata = PlanMetadata(
        component=name,
        tensorrt_version=env["trt_version"],
        gpu_name=env["gpu_name"],
        compute_capability=env["compute_capability"],
        onnx_sha256=spec.onnx_sha256,
        precision=spec.precision,
        profile=wanted_profile(spec, 8),
        shape_ranges=spec.shape_ranges.to_json(),
        plan_bytes=plan.stat().st_size,
        build_flags={"static": False, "strongly_typed": True},
        build_seconds=1.5,
        built_at="2026-01-01T00:00:00+00:00",
        sd_deploy_version="0.1.0",
    )
    for key, value in changes.items():
        setattr(metadata, key, value)
    write_metadata(plan_metadata_path(plan), metadata)
    return metadata


def status(engine_dir, component, env, profile=None):
    spec = read_manifest(engine_dir).components[component]
    return plan_status(engine_dir, spec, env, profile)


def test_round_trip(engine_dir, env):
    written = write_plan(engine_dir, "unet", env)
    path = plan_metadata_path(plan_path(engine_dir, "unet"))
    assert path.name == "model.plan.json"
    assert read_metadata(path) == written
    data = json.loads(path.read_text())
    for field in (
        "tensorrt_version",
        "gpu_name",
        "compute_capability",
        "profile",
        "onnx_sha256",
        "build_flags",
        "build_seconds",
        "built_at",
        "sd_deploy_version",
    ):
        assert field in data
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]


def test_from_json_rejects_malformed():
    good = {
        "metadata_version": 1,
        "component": "unet",
        "tensorrt_version": "10.13",
        "gpu_name": "GPU",
        "compute_capability": "9.0",
        "onnx_sha256": "ab",
        "precision": "fp16",
        "profile": {"sample": {"min": [1], "opt": [1], "max": [1]}},
        "shape_ranges": {},
        "plan_bytes": 3,
        "unknown_future_field": True,
    }
    assert PlanMetadata.from_json(good).plan_bytes == 3
    with pytest.raises(ValueError, match="metadata_version 2"):
        PlanMetadata.from_json({**good, "metadata_version": 2})
    with pytest.raises(ValueError, match="'gpu_name'"):
        PlanMetadata.from_json({k: v for k, v in good.items() if k != "gpu_name"})
    with pytest.raises(ValueError, match="'profile'"):
        PlanMetadata.from_json({**good, "profile": {"sample": [1, 2]}})
    with pytest.raises(ValueError, match="'plan_bytes'"):
        PlanMetadata.from_json({**good, "plan_bytes": "3"})
    with pytest.raises(ValueError, match="not a JSON object"):
        PlanMetadata.from_json([1])


def test_fresh(engine_dir, env):
    write_plan(engine_dir, "unet", env)
    spec = read_manifest(engine_dir).components["unet"]
    result = status(engine_dir, "unet", env, wanted_profile(spec, 8))
    assert isinstance(result, Fresh) and result.fresh
    assert result.metadata.component == "unet"
    assert isinstance(status(engine_dir, "unet", env), Fresh)  # any profile accepted


def assert_stale(result, *words):
    assert isinstance(result, Stale) and not result.fresh
    for word in words:
        assert word in result.reason, result.reason
    assert "\n" not in result.reason


def test_plan_missing(engine_dir, env):
    assert_stale(status(engine_dir, "unet", env), "no plan at unet/model.plan")


def test_metadata_missing(engine_dir, env):
    write_plan(engine_dir, "unet", env)
    plan_metadata_path(plan_path(engine_dir, "unet")).unlink()
    assert_stale(status(engine_dir, "unet", env), "unet/model.plan has no metadata")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{not json", "not JSON"),
        ('{"metadata_version": 1}', "'component'"),
        ("[]", "not a JSON object"),
    ],
)
def test_metadata_corrupt(engine_dir, env, content, words):
    write_plan(engine_dir, "unet", env)
    plan_metadata_path(plan_path(engine_dir, "unet")).write_text(content)
    assert_stale(status(engine_dir, "unet", env), "unet/model.plan.json is corrupt", words)


def test_plan_truncated_or_replaced(engine_dir, env):
    write_plan(engine_dir, "unet", env)
    plan_path(engine_dir, "unet").write_bytes(b"short")
    assert_stale(status(engine_dir, "unet", env), "has 5 bytes", "interrupted or replaced")


def test_wrong_component(engine_dir, env):
    write_plan(engine_dir, "unet", env, component="vae_decoder")
    assert_stale(status(engine_dir, "unet", env), "vae_decoder plan, not unet")


def test_onnx_changed(engine_dir, env):
    write_plan(engine_dir, "unet", env, onnx_sha256="0" * 64)
    assert_stale(status(engine_dir, "unet", env), "ONNX graph unet/model.onnx changed")


def test_tensorrt_version(engine_dir, env):
    write_plan(engine_dir, "unet", env, tensorrt_version="10.12.0.36")
    assert_stale(
        status(engine_dir, "unet", env),
        "built with TensorRT 10.12.0.36 but this is TensorRT 10.13.0.35",
    )


def test_gpu_name_and_compute_capability(engine_dir, env):
    write_plan(engine_dir, "unet", env, gpu_name="NVIDIA A100-SXM4-80GB", compute_capability="8.0")
    assert_stale(
        status(engine_dir, "unet", env),
        "built on NVIDIA A100-SXM4-80GB (compute capability 8.0)",
        "this GPU is NVIDIA H100 80GB HBM3 (compute capability 9.0)",
    )
    write_plan(engine_dir, "unet", env, gpu_name="NVIDIA H100 PCIe")
    assert_stale(status(engine_dir, "unet", env), "built on NVIDIA H100 PCIe")


def test_profile_differs(engine_dir, env):
    write_plan(engine_dir, "unet", env)
    spec = read_manifest(engine_dir).components["unet"]
    wanted = wanted_profile(spec, 8, batch="1:1:2")
    assert_stale(status(engine_dir, "unet", env, wanted), "profile differs: ", "wanted [4, 77, 64]")


def test_reasons_follow_the_fix_order(engine_dir, env):
    # ONNX change is reported before the TensorRT version: rebuilding fixes both.
    write_plan(engine_dir, "unet", env, onnx_sha256="0" * 64, tensorrt_version="9.0")
    assert_stale(status(engine_dir, "unet", env), "ONNX graph")


def test_onnx_hash_recomputed_when_manifest_has_none(engine_dir):
    spec = read_manifest(engine_dir).components["unet"]
    expected = files_sha256(engine_dir, [engine_dir / f for f in spec.files])
    assert source_onnx_sha256(engine_dir, spec) == expected == spec.onnx_sha256
    spec.onnx_sha256 = ""
    assert source_onnx_sha256(engine_dir, spec) == expected


def test_onnx_hash_covers_external_weights(engine_dir):
    # Same architecture, other weights: model.onnx is byte-identical, only the data differs.
    spec = read_manifest(engine_dir).components["unet"]
    assert spec.files == ["unet/model.onnx", "unet/model.onnx_data"]
    spec.onnx_sha256 = ""
    before = source_onnx_sha256(engine_dir, spec)
    (engine_dir / "unet" / "model.onnx_data").write_bytes(b"other weights")
    assert source_onnx_sha256(engine_dir, spec) != before
