"""Where an export may write: refusing to clobber other folders, reusing unchanged components.

The export itself is staged with `sd_deploy.engine_dir.atomic.staged_dir`, so an
interrupted export leaves at most a hidden `.NAME.partial-*` folder, never a directory
at the requested path that looks complete. Updating an engine dir of the same model
keeps the components not re-exported (hard links, so no copy of GBs).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sd_deploy.engine_dir.layout import MANIFEST_NAME
from sd_deploy.engine_dir.manifest import Manifest, read_manifest
from sd_deploy.errors import ExportError


def model_identity(provenance: dict) -> str:
    """What makes two exports 'the same model': the source's hash, else its description,
    and the LoRAs merged into it (hash and scale each)."""
    identity = str(provenance.get("source_sha256") or provenance.get("source"))
    for lora in provenance.get("loras") or ():
        identity += f" + {lora.get('sha256')}:{lora.get('scale')}"
    return identity


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
