"""Against a REAL tritonserver (conftest.py): generation equal to local Pipeline.generate,
dynamic batching of concurrent clients, bad inputs, cancellation, failed model loads and
clean shutdown."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("pytriton") is None
    or importlib.util.find_spec("tritonclient") is None,
    reason="needs the serve extra (nvidia-pytriton, tritonclient): pip install '.[serve]'",
)

QUICK = {"steps": 4}  # enough to make an image; the server's cost is per step


def local_twin(pipe, **fields):
    from sd_deploy.runtime import GenerationRequest

    result = pipe.generate(GenerationRequest(**fields))
    return result.images[0], result.parameters[0].infotext()


def http_infer(server, inputs: dict, model: str = "sd", batched: bool = True):
    """A raw tritonclient call with exactly the given tensors (no help from our client)."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    tensors = []
    for name, (kind, value) in inputs.items():
        array = np.array([value], dtype=object if kind == "BYTES" else None)
        if kind != "BYTES":
            array = array.astype(
                {"INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_}[kind]
            )
        array = array.reshape(1, 1) if batched else array.reshape(1)
        tensor = httpclient.InferInput(name, list(array.shape), kind)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    try:
        return client.infer(model, tensors)
    finally:
        client.close()


def test_one_generation_equals_local(server, local_pipeline):
    from sd_deploy.serving.client import RemotePipeline

    with RemotePipeline(server.http_url) as remote:
        images, texts = remote.generate(prompt="a red circle", seed=7, **QUICK)
    image, text = local_twin(local_pipeline, prompt="a red circle", seed=7, **QUICK)
    assert images.shape == (1, *image.shape) and images.dtype == np.uint8
    assert images[0].tobytes() == image.tobytes()
    assert texts == [text]
    assert "Seed: 7" in text and "Steps: 4" in text


def test_grpc_and_raw_client_defaults(server, local_pipeline):
    """A client written from the I/O list alone (only `prompt` and `seed`) gets the engine
    dir's defaults, over gRPC as over HTTP."""
    from sd_deploy.serving.client import RemotePipeline

    result = http_infer(server, {"prompt": ("BYTES", b"a blue star"), "seed": ("INT64", 3)})
    image, text = local_twin(local_pipeline, prompt="a blue star", seed=3)
    assert result.as_numpy("image")[0].tobytes() == image.tobytes()
    assert result.as_numpy("parameters")[0, 0].decode() == text
    with RemotePipeline(server.grpc_url) as remote:
        images, texts = remote.generate(prompt="a blue star", seed=3)
    assert images[0].tobytes() == image.tobytes() and texts == [text]


def test_unbatched_model(server, local_pipeline):
    """max_batch_size 0: prompt [1] in, image [H, W, 3] and parameters [1] out."""
    from sd_deploy.serving.client import RemotePipeline

    inputs = {"prompt": ("BYTES", b"a square"), "seed": ("INT64", 9), "steps": ("INT32", 3)}
    result = http_infer(server, inputs, model="sd_unbatched", batched=False)
    image, text = local_twin(local_pipeline, prompt="a square", seed=9, steps=3)
    assert result.as_numpy("image").shape == image.shape
    assert result.as_numpy("image").tobytes() == image.tobytes()
    assert result.as_numpy("parameters")[0].decode() == text
    with RemotePipeline(server.grpc_url, model="sd_unbatched") as remote:
        images, texts = remote.generate(prompt="a square", seed=9, steps=3, batch=2)
    assert images.shape == (2, *image.shape) and images[0].tobytes() == image.tobytes()
    assert "Seed: 10" in texts[1]


def test_concurrent_clients_batched_and_equal(server, local_pipeline):
    """8 clients at once, different prompts and seeds, one size: Triton's dynamic batcher
    hands them to the model together and Pipeline.generate_many runs them as batches.
    Each image must be byte-equal to its local solo twin: ONNX Runtime CPU gives the same
    bytes batched and alone for this model (if that ever stops holding, this fails)."""
    from sd_deploy.serving.client import RemotePipeline

    before = server.statistics("sd")
    prompts = [f"shape number {i}" for i in range(8)]
    results: dict[int, tuple[np.ndarray, list[str]]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def client(i: int) -> None:
        try:
            with RemotePipeline(server.http_url) as remote:
                remote.max_batch_size()
                barrier.wait()
                results[i] = remote.generate(prompt=prompts[i], seed=100 + i, steps=8)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    after = server.statistics("sd", min_inferences=before["inference_count"] + 8)
    requests = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert requests == 8
    assert executions < requests, f"{executions} executions for {requests} requests: no batching"
    for i in range(8):
        image, text = local_twin(local_pipeline, prompt=prompts[i], seed=100 + i, steps=8)
        assert results[i][0][0].tobytes() == image.tobytes(), f"client {i} differs"
        assert results[i][1] == [text]


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"prompt": ("BYTES", b"x"), "width": ("INT32", 500)}, "INVALID_ARGUMENT: .*500"),
        ({"prompt": ("BYTES", b"x"), "steps": ("INT32", 0)}, "INVALID_ARGUMENT: steps"),
        ({"prompt": ("BYTES", b"x"), "sampler": ("BYTES", b"warp9")}, "INVALID_ARGUMENT: .*warp9"),
        ({"prompt": ("BYTES", b"x"), "guidance": ("FP32", -1.0)}, "INVALID_ARGUMENT: guidance"),
        ({"seed": ("INT64", 1)}, "INVALID_ARGUMENT: prompt is required"),
        ({"prompt": ("BYTES", b"y" * 10_000)}, "INVALID_ARGUMENT: prompt has 10000 characters"),
        ({"prompt": ("BYTES", b"caf\xe9 \xff")}, "INVALID_ARGUMENT: prompt is not UTF-8"),
        ({"prompt": ("BYTES", b"x"), "clip_skip": ("INT32", 0)}, "INVALID_ARGUMENT: clip_skip"),
        ({"prompt": ("BYTES", b"x"), "clip_skip": ("INT32", 99)}, "INVALID_ARGUMENT: clip skip 99"),
        # Triton itself checks the type against config.pbtxt
        ({"prompt": ("BYTES", b"x"), "emphasis": ("INT32", 1)}, "'INT32', but .* expects 'BOOL'"),
    ],
    ids=[
        "width500",
        "steps0",
        "sampler",
        "guidance",
        "no-prompt",
        "10k-prompt",
        "not-utf8",
        "clip-skip0",
        "clip-skip99",
        "emphasis-int",
    ],
)
def test_bad_input_is_an_error_response(server, inputs, message):
    import re

    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as info:
        http_infer(server, inputs)
    text = info.value.message()
    assert re.search(message, text), text
    assert "\n" not in text.strip(), "one line"
    ok = http_infer(server, {"prompt": ("BYTES", b"still serving"), "steps": ("INT32", 2)})
    assert ok.as_numpy("image").shape[-1] == 3


def test_client_side_errors_are_sd_deploy_errors(server):
    from sd_deploy.errors import RequestError
    from sd_deploy.serving.client import RemotePipeline

    for url in (server.http_url, server.grpc_url):
        with RemotePipeline(url) as remote, pytest.raises(RequestError, match="steps"):
            remote.generate(prompt="x", steps=0)


def test_cancelled_request_does_not_wedge(server):
    """A gRPC client cancels a long generation; the instance stops it at a step and the
    next request is served at once (not after the cancelled one's 1000 steps)."""
    import tritonclient.grpc as grpcclient

    from sd_deploy.serving.client import RemotePipeline

    client = grpcclient.InferenceServerClient(server.grpc_url.removeprefix("grpc://"))
    prompt = grpcclient.InferInput("prompt", [1, 1], "BYTES")
    prompt.set_data_from_numpy(np.array([[b"a very long one"]], dtype=object))
    steps = grpcclient.InferInput("steps", [1, 1], "INT32")
    steps.set_data_from_numpy(np.array([[1000]], dtype=np.int32))
    done = threading.Event()
    outcome: list = []

    def callback(result, error) -> None:
        outcome.append(error)
        done.set()

    start = time.monotonic()
    call = client.async_infer("sd", [prompt, steps], callback)
    time.sleep(1.5)  # mid-generation
    call.cancel()
    assert done.wait(30)
    assert outcome[0] is not None and "cancel" in str(outcome[0]).lower()
    with RemotePipeline(server.http_url) as remote:
        images, _ = remote.generate(prompt="next", seed=1, steps=2)
    elapsed = time.monotonic() - start
    assert images.shape[0] == 1
    # 1000 steps take ~40 s here; stopping at a step frees the instance within seconds.
    solo = server.statistics("sd")
    assert elapsed < 15, f"next request waited {elapsed:.1f} s: the instance kept generating"
    assert solo["inference_stats"]["success"]["count"] >= 1
    client.close()


def test_failed_models_leave_the_server_up(tmp_path, default_engine, stub_env):
    """Missing and stale engine dirs: the models are UNAVAILABLE with the reason in the
    status and the log, the server runs; SIGTERM stops it and its stubs."""
    import shutil

    from sd_deploy.serving import RepositoryConfig, write_model_repository
    from sd_deploy.serving.server import TritonServer

    gone, stale = tmp_path / "gone", tmp_path / "stale"
    shutil.copytree(default_engine, gone)
    shutil.copytree(default_engine, stale)
    repo = tmp_path / "repo"
    write_model_repository(gone, repo, RepositoryConfig(name="gone", kind="cpu"))
    write_model_repository(stale, repo, RepositoryConfig(name="stale", kind="cpu"))
    shutil.rmtree(gone)
    manifest = stale / "manifest.json"
    manifest.write_text(manifest.read_text() + "\n")  # a re-export, as far as the hash sees
    log = tmp_path / "triton.log"
    server = TritonServer(
        repo, http_port=0, grpc_port=0, metrics_port=0, stub_env=stub_env, log=log
    )
    server.start(timeout_s=120)
    try:
        states = {s["name"]: s for s in server.model_states() or []}
        assert states["gone"]["state"] == "UNAVAILABLE"
        assert "ENGINE_DIR: engine dir" in states["gone"]["reason"]
        assert "missing" in states["gone"]["reason"]
        assert states["stale"]["state"] == "UNAVAILABLE"
        assert "changed since this repository was made" in states["stale"]["reason"]
        assert server._get("/v2/health/live") is not None  # up, though not ready
        assert "changed since this repository was made" in log.read_text(errors="replace")
        pid = server.process.pid
    finally:
        code = server.stop()
    assert code == 0
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # nothing of its process group is left


def test_serve_command_prints_urls_and_stops_on_sigint(tmp_path, repository, stub_env):
    """sd-triton serve: ready, URLs printed, Ctrl-C -> exit 0 and nothing left running."""
    from sd_deploy.serving.server import free_port

    port = free_port()
    env = {**os.environ, "SD_TRITON_STUB_ENV": str(stub_env)}
    command = [
        sys.executable, "-c", "from sd_deploy.cli import triton_group; triton_group()",
        "serve", "--repository", str(repository), "--http-port", str(port),
        "--grpc-port", "0", "--metrics-port", "0",
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "ready" in line and f"http://127.0.0.1:{port}" in "".join(lines):
                break
        assert any(f"http://127.0.0.1:{port}" in line for line in lines), "".join(lines)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "".join(lines) + out
    assert "stopped" in out
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"--http-port={port}" not in ps


@pytest.mark.parametrize(
    "reading",
    [[], ["--clip-skip", "2", "--no-emphasis"]],
    ids=["defaults", "clip-skip-no-emphasis"],
)
def test_sd_run_server_writes_the_same_png(server, default_engine, tmp_path, reading):
    """sd-run --server: same pixels and the same parameters chunk as local sd-run, with
    the prompt read as asked (the served model takes clip_skip and emphasis inputs)."""
    from click.testing import CliRunner
    from PIL import Image

    from sd_deploy.cli import run_command

    common = ["--prompt", "a (green:1.4) ring", "--seed", "5", "--steps", "4", "--batch", "2"]
    common += reading
    remote = CliRunner().invoke(
        run_command, [*common, "--server", server.http_url, "--out", str(tmp_path / "r.png")]
    )
    assert remote.exit_code == 0, remote.output
    local = CliRunner().invoke(
        run_command,
        [
            *common,
            "--engine",
            str(default_engine),
            "--backend",
            "onnxruntime",
            "--out",
            str(tmp_path / "l.png"),
        ],
    )
    assert local.exit_code == 0, local.output
    for i in range(2):
        with Image.open(tmp_path / f"r-{i}.png") as got, Image.open(tmp_path / f"l-{i}.png") as ref:
            assert got.tobytes() == ref.tobytes()
            assert got.text["parameters"] == ref.text["parameters"]
            assert f"Seed: {5 + i}" in got.text["parameters"]
            assert ("Clip skip: 2" in got.text["parameters"]) == bool(reading)
    if not reading:
        return
    plain = CliRunner().invoke(
        run_command,
        [*common[:8], "--server", server.http_url, "--out", str(tmp_path / "p.png")],
    )
    assert plain.exit_code == 0, plain.output
    with Image.open(tmp_path / "p-0.png") as plain_image, Image.open(tmp_path / "r-0.png") as r:
        assert plain_image.tobytes() != r.tobytes()  # the inputs reached the model
    bad = CliRunner().invoke(
        run_command, ["--prompt", "x", "--width", "500", "--server", server.http_url]
    )
    assert bad.exit_code == 1 and "error: width 500" in bad.output
