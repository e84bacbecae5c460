"""Atomic engine-dir writes: stage in a hidden sibling, then swap it in.

An interrupted export leaves at most a hidden `.NAME.partial-*` folder, never a
directory at the requested path that looks complete. Updating an engine dir of the
same model keeps the components not re-exported (hard links, so no copy of GBs).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from sd_deploy.errors import ExportError
from sd_deploy.runtime.manifest import MANIFEST_NAME, Manifest, read_manifest


def model_identity(provenance: dict) -> str:
    """What makes two exports 'the same model': the source's hash, else its description."""
    return str(provenance.get("source_sha256") or provenance.get("source"))


def existing_manifest(out: Path, identity: str, force: bool) -> Manifest | None:
    """The manifest of an engine dir of the same model at `out` (to update), else None.

    Refuses to touch a directory holding something else unless --force, and never
    deletes a non-empty folder that is not an engine dir.
    """
    if not out.exists():
        return None
    if not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if not any(out.iterdir()):
        return None
    if not (out / MANIFEST_NAME).is_file():
        raise ExportError(
            f"--out {out} is a non-empty folder that is not an engine dir; choose another --out"
        )
    try:
        manifest = read_manifest(out, require=())
    except Exception as exc:  # noqa: BLE001 - any unreadable engine dir is replaced only with --force
        if force:
            return None
        raise ExportError(
            f"--out {out} holds an unreadable engine dir ({exc}); use --force"
        ) from None
    if model_identity(manifest.provenance) != identity:
        if force:
            return None
        raise ExportError(
            f"--out {out} holds engines of another model ({manifest.provenance.get('source')}); "
            "use --force to replace it or choose another --out"
        )
    return manifest


def link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield a hidden sibling to build in; on success it replaces `out`, else it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        stage.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise ExportError(f"disk full while writing {out}; nothing was changed") from None
        raise
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
