"""What every command shares: one-line errors, the option groups, the command decorator."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from sd_deploy.engine_dir.layout import COMPONENTS
from sd_deploy.errors import UserError
from sd_deploy.runtime.request import PRECISIONS
from sd_deploy.runtime.schedulers import SAMPLERS

F = TypeVar("F", bound=Callable[..., Any])


class _OneLineHandler(logging.Handler):
    """The library's log messages (logger "sd_deploy") as one `warning: ...` line each,
    printed under any progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        level = "warning" if record.levelno >= logging.WARNING else "note"
        tqdm.write(f"{level}: {record.getMessage()}", file=sys.stderr)


def user_errors(func: F) -> F:
    """Turn UserError into `error: <message>` and exit 1; KeyboardInterrupt into exit 130;
    the library's warnings into one `warning: <message>` line each."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logger = logging.getLogger("sd_deploy")
        handler = _OneLineHandler(logging.WARNING)
        logger.addHandler(handler)
        logger.propagate = False
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing half-written was kept", err=True)
            sys.exit(130)
        finally:
            logger.removeHandler(handler)
            logger.propagate = True

    return wrapper  # type: ignore[return-value]


def range_options(func: F) -> F:
    """--batch/--height/--width as N or MIN:OPT:MAX."""
    for name, what in (("width", "pixels"), ("height", "pixels"), ("batch", "images per call")):
        func = click.option(
            f"--{name}",
            metavar="N|MIN:OPT:MAX",
            default=None,
            help=f"{name.capitalize()} range ({what}).",
        )(func)
    return func


def command(func: F) -> click.Command:
    """A click command whose help is its own docstring. (One shared `click.command(...)`
    decorator object would give every command the first one's help text.)"""
    return click.command(context_settings={"help_option_names": ["-h", "--help"]})(func)


engine_option = click.option(
    "--engine",
    "engine_dir",
    default="engines",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Engine dir made by sd-export (and sd-build).",
)

COMPONENT_CHOICES = ["all", *COMPONENTS]


precision_option = click.option(
    "--precision",
    type=click.Choice(list(PRECISIONS)),
    default="auto",
    show_default=True,
    help="OpenVINO's compute precision: auto is bf16 where the CPU has AMX or AVX512-BF16, "
    "else fp32, on the int8-weight graphs of sd-quantize where the engine dir has them; "
    "int8 insists on them. Other backends run the graphs as exported (bf16 and int8 are "
    "refused there).",
)


def sampler_help() -> str:
    return "Sampler: " + "; ".join(f"{name} ({s.description})" for name, s in SAMPLERS.items())
