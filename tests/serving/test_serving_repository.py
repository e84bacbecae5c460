"""Model repository generation, the client's URL/error handling and the model's input
parsing: everything of sd_deploy.serving that needs no running server."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sd_deploy.errors import EngineDirError, GenerationCancelled, RequestError, UserError
from sd_deploy.serving import RepositoryConfig, write_model_repository
from sd_deploy.serving.client import error_from_message, parse_url
from sd_deploy.serving.repository import render_config
from sd_deploy.serving.triton_model import (
    PipelineModel,
    check_engine_dir,
    decode_text,
    error_message,
    rows_of,
)


def test_repository_layout_and_config(tiny_engine_fp32, tmp_path):
    model = write_model_repository(
        tiny_engine_fp32,
        tmp_path / "repo",
        RepositoryConfig(name="pipe", max_batch=4, instances=2, kind="cpu", threads=1),
    )
    assert model == tmp_path / "repo" / "pipe"
    text = (model / "config.pbtxt").read_text()
    assert 'name: "pipe"' in text and 'backend: "python"' in text
    assert "max_batch_size: 4" in text and "dynamic_batching" in text
    assert "instance_group [ { kind: KIND_CPU count: 2 } ]" in text
    assert str(tiny_engine_fp32.resolve()) in text
    for name, dtype in [
        ("prompt", "TYPE_STRING"),
        ("negative_prompt", "TYPE_STRING"),
        ("seed", "TYPE_INT64"),
        ("steps", "TYPE_INT32"),
        ("guidance", "TYPE_FP32"),
        ("width", "TYPE_INT32"),
        ("height", "TYPE_INT32"),
        ("sampler", "TYPE_STRING"),
        ("clip_skip", "TYPE_INT32"),
        ("emphasis", "TYPE_BOOL"),
        ("image", "TYPE_UINT8"),
        ("parameters", "TYPE_STRING"),
    ]:
        assert f'name: "{name}" data_type: {dtype}' in text
    assert text.count("optional: true") == 9  # everything but prompt
    assert '{ key: "precision" value: { string_value: "auto" } }' in text
    model_py = (model / "1" / "model.py").read_text()
    assert "from sd_deploy.serving.triton_model import TritonPythonModel" in model_py
    assert not list((tmp_path / "repo").glob(".*"))  # no staging leftovers


def test_max_batch_defaults_to_the_engine_dirs_batch_range(tiny_engine_fp32, tmp_path):
    from sd_deploy.engine_dir import read_manifest
    from sd_deploy.engine_dir.shapes import request_ranges

    manifest = read_manifest(tiny_engine_fp32)
    batch_max = request_ranges(manifest, ("text_encoder", "unet", "vae_decoder")).batch.max
    model = write_model_repository(tiny_engine_fp32, tmp_path / "repo")
    assert f"max_batch_size: {batch_max}\n" in (model / "config.pbtxt").read_text()


def test_unbatched_gpu_config(tiny_engine_fp32):
    text = render_config(tiny_engine_fp32, "0" * 64, RepositoryConfig(max_batch=0, kind="gpu"))
    assert "max_batch_size: 0" in text and "dynamic_batching" not in text
    assert "KIND_GPU" in text


def test_repository_refusals(tiny_engine_fp32, tmp_path):
    with pytest.raises(EngineDirError, match="does not exist"):
        write_model_repository(tmp_path / "nowhere", tmp_path / "repo")
    write_model_repository(tiny_engine_fp32, tmp_path / "repo")
    with pytest.raises(UserError, match="--force"):
        write_model_repository(tiny_engine_fp32, tmp_path / "repo")
    write_model_repository(tiny_engine_fp32, tmp_path / "repo", force=True)
    for bad, match in [
        (RepositoryConfig(name="../x"), "model name"),
        (RepositoryConfig(max_batch=-1), "max-batch"),
        (RepositoryConfig(instances=0), "instances"),
        (RepositoryConfig(kind="tpu"), "kind"),
        (RepositoryConfig(precision="fp16"), "unknown precision 'fp16'"),
        (RepositoryConfig(backend="onnxruntime-cpu", precision="bf16"), "needs --backend openvino"),
        (RepositoryConfig(backend="cuda"), "unknown backend 'cuda'"),
    ]:
        with pytest.raises(UserError, match=match):
            write_model_repository(tiny_engine_fp32, tmp_path / "other", bad)


def test_stale_and_missing_engine_dir(tiny_engine_fp32, tmp_path):
    import shutil

    from sd_deploy.engine_dir.hashing import sha256_file

    engine = tmp_path / "engine"
    shutil.copytree(tiny_engine_fp32, engine)
    digest = sha256_file(engine / "manifest.json")
    check_engine_dir(engine, digest)
    manifest = json.loads((engine / "manifest.json").read_text())
    (engine / "manifest.json").write_text(json.dumps(manifest, indent=1))
    with pytest.raises(EngineDirError, match="changed since"):
        check_engine_dir(engine, digest)
    with pytest.raises(EngineDirError, match="missing"):
        check_engine_dir(tmp_path / "gone", digest)


def test_error_messages_round_trip():
    for exc in [RequestError("width must be a multiple of 8"), EngineDirError("gone")]:
        back = error_from_message(error_message(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
    back = error_from_message("[StatusCode.CANCELLED] CANCELLED: the client cancelled")
    assert isinstance(back, GenerationCancelled)
    assert error_message(ValueError("x")).startswith("INTERNAL: ValueError")
    assert type(error_from_message("something else")) is UserError


def test_parse_url():
    assert parse_url("http://127.0.0.1:8000").host_port == "127.0.0.1:8000"
    assert parse_url("grpc://host:9").protocol == "grpc"
    assert parse_url("localhost:5").protocol == "http"
    for bad in ["ftp://x:1", "http://:80", "http://h:1/v2/models"]:
        with pytest.raises(UserError):
            parse_url(bad)


def test_decode_text_and_rows():
    assert decode_text("héllo".encode(), "prompt", 10) == "héllo"
    with pytest.raises(RequestError, match="not UTF-8"):
        decode_text(b"\xff\xfe", "prompt", 10)
    with pytest.raises(RequestError, match="at most 10"):
        decode_text(b"x" * 11, "prompt", 10)
    rows = rows_of(
        {"prompt": np.array([[b"a"], [b"b"]], dtype=object), "seed": np.array([[1], [2]])},
        batched=True,
    )
    assert rows == [{"prompt": b"a", "seed": 1}, {"prompt": b"b", "seed": 2}]
    with pytest.raises(RequestError, match="rows"):
        rows_of(
            {"prompt": np.array([[b"a"], [b"b"]], dtype=object), "seed": np.array([[1]])},
            batched=True,
        )


def test_the_model_reads_clip_skip_and_emphasis(tiny_engine_fp32):
    """Prompt reading as sd-run's --clip-skip / --no-emphasis, refused when ill-typed."""
    model = PipelineModel(tiny_engine_fp32, backend="onnxruntime-cpu", threads=1)
    request = model.parse(
        {"prompt": b"(a red:1.3) ring", "clip_skip": np.int32(2), "emphasis": np.bool_(False)}
    )
    assert request.clip_skip == 2 and request.emphasis is False
    assert model.parse({"prompt": b"x"}).emphasis is True
    for row, message in [
        ({"clip_skip": np.int32(0)}, "clip_skip must be an integer >= 1"),
        ({"clip_skip": np.float32(1.5)}, "clip_skip must be an integer, got 1.5"),
        ({"steps": 4.5}, "steps must be an integer, got 4.5"),
        ({"emphasis": np.int32(1)}, "emphasis must be a boolean, got int32"),
    ]:
        with pytest.raises(RequestError, match=message):
            model.parse({"prompt": b"x", **row})


def test_the_model_computes_at_the_exported_precision(tiny_engine_fp32, tmp_path):
    """sd-triton export --precision reaches the instances' backend (OpenVINO)."""
    pytest.importorskip("openvino")
    model_dir = write_model_repository(
        tiny_engine_fp32, tmp_path / "repo", RepositoryConfig(backend="openvino", precision="fp32")
    )
    text = (model_dir / "config.pbtxt").read_text()
    assert '{ key: "precision" value: { string_value: "fp32" } }' in text
    model = PipelineModel(tiny_engine_fp32, backend="openvino", precision="fp32", threads=1)
    backend = model.pipeline.backend
    assert backend.requested_precision == "fp32" and backend.compute_precision() == "fp32"
