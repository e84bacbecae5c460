"""A real Triton server for the serving tests: the packaged default model's engine dir,
a NumPy 1 stub env, a model repository, and tritonserver on free loopback ports.

Everything is session-scoped (one export, one server). The tests skip with a reason
where the `serve` extra is not installed; CI installs it and makes the stub env
($SD_TRITON_STUB_ENV), so there they run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

BACKEND = "onnxruntime"


@pytest.fixture(scope="session")
def default_engine(tmp_path_factory) -> Path:
    """The packaged default model exported as `sd-export --out DIR` does. Read-only."""
    from sd_deploy.exporter import export_engine_dir
    from sd_deploy.models import load_models

    models = load_models("default")
    out = tmp_path_factory.mktemp("serving") / "engines"
    export_engine_dir(models, out, progress=False)
    return out


@pytest.fixture(scope="session")
def stub_env(tmp_path_factory) -> Path:
    """$SD_TRITON_STUB_ENV, or a fresh one (pip installs NumPy 1 from the index or cache)."""
    from sd_deploy.serving.server import STUB_ENV_VAR, make_stub_env

    given = os.environ.get(STUB_ENV_VAR)
    if given:
        return Path(given)
    try:
        return make_stub_env(tmp_path_factory.mktemp("stub") / "env")
    except Exception as exc:  # no index and no cache: nothing to test the server with
        pytest.skip(f"cannot make a NumPy 1 stub env ({exc}); set {STUB_ENV_VAR}")


@pytest.fixture(scope="session")
def local_pipeline(default_engine):
    """The local twin the server's images are compared with (same engine dir, backend).

    ONNX Runtime, named: `auto` may pick OpenVINO, whose bf16 CPU kernels give batched
    images that differ slightly from solo ones (docs/serving.md), so byte equality of
    batched serving holds on ONNX Runtime only."""
    from sd_deploy.runtime import Pipeline

    with Pipeline(default_engine, backend=BACKEND) as pipe:
        pipe.load_all()  # writes ONNX Runtime's graph cache before the server reads it
        yield pipe


@pytest.fixture(scope="session")
def repository(tmp_path_factory, default_engine) -> Path:
    from sd_deploy.serving import RepositoryConfig, write_model_repository

    out = tmp_path_factory.mktemp("repo")
    write_model_repository(
        default_engine, out, RepositoryConfig(name="sd", kind="cpu", backend=BACKEND)
    )
    # max_batch_size 0: tensors without the batch dimension, every request alone.
    write_model_repository(
        default_engine,
        out,
        RepositoryConfig(name="sd_unbatched", max_batch=0, kind="cpu", backend=BACKEND),
    )
    return out


@pytest.fixture(scope="session")
def server(tmp_path_factory, repository, stub_env, local_pipeline):
    """tritonserver serving `repository` on free 127.0.0.1 ports; stopped at the end."""
    from sd_deploy.serving.server import TritonServer

    log = tmp_path_factory.mktemp("triton-log") / "tritonserver.log"
    server = TritonServer(
        repository, http_port=0, grpc_port=0, metrics_port=0, stub_env=stub_env, log=log
    )
    server.start(timeout_s=180)
    states = {s["name"]: s for s in server.model_states() or []}
    for name in ("sd", "sd_unbatched"):
        if states.get(name, {}).get("state") != "READY":
            server.stop()
            pytest.fail(f"model {name} did not load: {states.get(name)}\n{log.read_text()[-3000:]}")
    yield server
    server.stop()
