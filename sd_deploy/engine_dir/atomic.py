"""Atomic writes, the one implementation: write a hidden sibling, then rename it into place.

Readers see the old file (or folder) or the whole new one, never half of either, and an
interrupted write leaves only a hidden `.NAME.tmp-*` / `.NAME.partial-*` sibling behind.
Every file and folder written honours the process umask: Python's tempfile and
safetensors create 0600 files, which a service running as another user cannot read.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from sd_deploy.errors import EngineDirError, UserError


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask sets it, which
    races with other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path) -> None:
    """Give `path` (and, for a folder, everything in it) the modes a plain open()/mkdir()
    would have: 0666 / 0777 less the umask."""
    mask = current_umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            os.chmod(root, dir_mode)
            for name in files:
                os.chmod(os.path.join(root, name), file_mode)
            for name in dirs:
                os.chmod(os.path.join(root, name), dir_mode)
    else:
        os.chmod(path, file_mode)


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{threading.get_ident()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it replaces `path`."""
    path = Path(path)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        honour_umask(tmp)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` atomically (text as UTF-8)."""
    with replacing(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def staged_dir(
    out: Path, replace: bool = True, error: type[UserError] = EngineDirError
) -> Iterator[Path]:
    """Yield a hidden sibling folder to build in; on success it becomes `out`.

    `replace`: an existing `out` is swapped out and removed; otherwise a folder that
    appeared at `out` meanwhile (another process finished first) wins and the stage is
    dropped. A full disk becomes one `error` line; nothing at `out` is changed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = _sibling(out, "partial")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        honour_umask(stage)
        if not replace:
            try:
                stage.rename(out)
            except OSError:  # `out` exists: another writer committed the same content first
                _remove(stage)
            return
        old = _sibling(out, "old")
        if out.exists():
            out.rename(old)
        stage.rename(out)
        _remove(old)
    except OSError as exc:
        _remove(stage)
        if exc.errno == errno.ENOSPC:
            raise error(f"disk full while writing {out}; nothing was changed") from None
        raise
    except BaseException:
        _remove(stage)
        raise
