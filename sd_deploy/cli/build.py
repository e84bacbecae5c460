"""sd-build: TensorRT plans from an engine dir's graphs."""

from __future__ import annotations

from pathlib import Path

import click

from sd_deploy.cli.common import (
    command,
    engine_option,
    range_options,
    user_errors,
)


@command
@engine_option
@click.option(
    "--component", "components", multiple=True, default=("all",), show_default=True, metavar="NAME"
)
@range_options
@click.option("--static", is_flag=True, help="One fixed shape (the opt values): fastest engines.")
@click.option(
    "--timing-cache", type=click.Path(path_type=Path), default=None, help="Reused across builds."
)
@click.option("--optimization-level", type=click.IntRange(0, 5), default=None)
@click.option("--workspace", default=None, metavar="SIZE", help="Builder workspace, e.g. 4G.")
@click.option("--force", is_flag=True, help="Rebuild even up-to-date plans.")
@click.option(
    "--refittable",
    is_flag=True,
    help="Plans whose weights can be refit: sd-run --lora switches LoRAs without a rebuild "
    "(engine dirs exported with --lora-ready).",
)
@user_errors
def build_command(
    engine_dir: Path,
    components: tuple[str, ...],
    batch: str | None,
    height: str | None,
    width: str | None,
    static: bool,
    timing_cache: Path | None,
    optimization_level: int | None,
    workspace: str | None,
    force: bool,
    refittable: bool,
) -> None:
    """Build FP16 TensorRT engines (strongly typed) from an engine dir's ONNX graphs."""
    from sd_deploy.engines import build_engines

    results = build_engines(
        engine_dir,
        components=components,
        batch=batch,
        height=height,
        width=width,
        static=static,
        timing_cache=timing_cache,
        optimization_level=optimization_level,
        workspace=workspace,
        force=force,
        refittable=refittable,
    )
    for result in results:
        click.echo(str(result))
