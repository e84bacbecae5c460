"""sd-triton: serve engine dirs with NVIDIA Triton Inference Server."""

from __future__ import annotations

from pathlib import Path

import click

from sd_deploy.cli.common import (
    engine_option,
    precision_option,
    user_errors,
)
from sd_deploy.errors import UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def triton_group() -> None:
    """Serve engine dirs with NVIDIA Triton Inference Server (docs/serving.md)."""


@triton_group.command("export")
@engine_option
@click.option(
    "--out",
    default="model_repository",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Model repository folder (the model goes to OUT/NAME/).",
)
@click.option("--name", default="sd", show_default=True, help="Model name clients call.")
@click.option(
    "--max-batch",
    type=click.IntRange(min=0),
    default=None,
    help="max_batch_size; > 0 turns dynamic batching on, 0 means unbatched I/O "
    "[the engine dir's batch range max: the most images one generation takes].",
)
@click.option(
    "--instances",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Model instances (each loads the engine dir once) per device.",
)
@click.option(
    "--kind",
    type=click.Choice(["auto", "cpu", "gpu"]),
    default="auto",
    show_default=True,
    help="Instance kind: KIND_GPU (one instance set per GPU) or KIND_CPU; auto = gpu where "
    "an NVIDIA GPU is visible here.",
)
@click.option(
    "--backend",
    default="auto",
    show_default=True,
    help="Runtime backend each instance uses (as sd-run --backend).",
)
@precision_option
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="ONNX Runtime / OpenVINO threads per instance [one per physical core].",
)
@click.option(
    "--queue-delay-us",
    type=click.IntRange(min=0),
    default=5000,
    show_default=True,
    help="How long the dynamic batcher waits for more requests.",
)
@click.option(
    "--max-prompt-chars",
    type=click.IntRange(min=1),
    default=4096,
    show_default=True,
    help="Longer prompts are refused with an error response.",
)
@click.option("--force", is_flag=True, help="Replace an existing OUT/NAME/.")
@user_errors
def triton_export_command(
    engine_dir: Path,
    out: Path,
    name: str,
    max_batch: int | None,
    instances: int,
    kind: str,
    backend: str,
    precision: str,
    threads: int | None,
    queue_delay_us: int,
    max_prompt_chars: int,
    force: bool,
) -> None:
    """Write a Triton model repository whose Python-backend model runs the engine dir."""
    from sd_deploy.serving import RepositoryConfig, write_model_repository
    from sd_deploy.serving.repository import resolve_kind

    config = RepositoryConfig(
        name=name,
        max_batch=max_batch,
        instances=instances,
        kind=kind,
        backend=backend,
        precision=precision,
        threads=threads,
        queue_delay_us=queue_delay_us,
        max_prompt_chars=max_prompt_chars,
    )
    model_dir = write_model_repository(engine_dir, out, config, force=force)
    text = (model_dir / "config.pbtxt").read_text()
    max_batch = int(text.split("max_batch_size: ", 1)[1].split()[0])
    click.echo(
        f"{model_dir}: model {name}, max_batch_size {max_batch}, "
        f"{instances} x KIND_{resolve_kind(kind).upper()}, engine dir {engine_dir.resolve()}"
    )
    click.echo(f"serve it: sd-triton serve --repository {out}")


@triton_group.command("serve")
@click.option(
    "--repository",
    default="model_repository",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Model repository made by sd-triton export.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--http-port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=8002, show_default=True)
@click.option(
    "--stub-env",
    type=click.Path(path_type=Path),
    default=None,
    envvar="SD_TRITON_STUB_ENV",
    help="NumPy 1 env for the Python backend stubs (sd-triton stub-env) [$SD_TRITON_STUB_ENV].",
)
@click.option(
    "--log",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the server's log to this file [this terminal].",
)
@user_errors
def triton_serve_command(
    repository: Path,
    host: str,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    stub_env: Path | None,
    log: Path | None,
) -> None:
    """Run tritonserver on the repository until Ctrl-C / SIGTERM (port 0: any free one)."""
    import signal
    import threading

    from sd_deploy.serving.server import TritonServer

    server = TritonServer(
        repository,
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        stub_env=stub_env,
        log=log,
    )
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        for state in server.model_states() or []:
            reason = str(state.get("reason", "")).strip().splitlines()
            why = f": {reason[0]}" if reason and state.get("state") != "READY" else ""
            click.echo(f"model {state['name']}: {state.get('state')}{why}")
        click.echo(f"HTTP    {server.http_url}")
        click.echo(f"gRPC    {server.grpc_url}")
        click.echo(f"metrics {server.metrics_url}")
        status = "ready" if server.ready() else "up, NOT ready (a model failed to load)"
        click.echo(f"{status}; Ctrl-C stops", nl=True)
        while not stop.wait(0.5):
            if server.process is None or server.process.poll() is not None:
                code = server.stop()
                raise UserError(f"tritonserver exited by itself (status {code})")
        code = server.stop()
        click.echo(f"stopped (tritonserver exit status {code})")
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@triton_group.command("stub-env")
@click.argument("folder", type=click.Path(path_type=Path))
@user_errors
def triton_stub_env_command(folder: Path) -> None:
    """Make the NumPy 1 env the Python backend stubs run in (runs pip once)."""
    from sd_deploy.serving.server import STUB_ENV_VAR, STUB_NUMPY, make_stub_env

    env = make_stub_env(folder)
    click.echo(f"{env}: {STUB_NUMPY} over this environment's packages")
    click.echo(f"use it: sd-triton serve --stub-env {env}   (or export {STUB_ENV_VAR}={env})")
