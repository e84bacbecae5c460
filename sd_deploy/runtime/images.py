"""Pixels in and out: init images, uint8 conversion, PNGs that carry their parameters.

PNGs get a "parameters" text chunk in the format other SD tools (AUTOMATIC1111,
ComfyUI importers, civitai) read: prompt, "Negative prompt: ...", then
"Steps: N, Sampler: X, CFG scale: G, Seed: S, Size: WxH, Model: M".
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from sd_deploy.errors import RequestError, UserError


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[B,3,H,W] floats in [0,1] -> [B,H,W,3] uint8 (rounded, clipped)."""
    scaled = np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255.0
    return np.rint(scaled).astype(np.uint8).transpose(0, 2, 3, 1)


def load_init_image(path: str | Path) -> np.ndarray:
    """An image file -> HxWx3 uint8 RGB; unreadable files are one-line errors."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise RequestError(f"init image {path} does not exist") from None
    except IsADirectoryError:
        raise RequestError(f"init image {path} is a directory") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise RequestError(f"init image {path} is not a readable image ({exc})") from None


def prepare_init_image(image: np.ndarray | Image.Image, width: int, height: int) -> np.ndarray:
    """RGB image (uint8 HxWx3 or PIL) -> [1,3,height,width] float32 in [0,1], resized if needed."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    pil = pil.convert("RGB")
    if pil.size != (width, height):
        pil = pil.resize((width, height), Image.Resampling.LANCZOS)
    return (np.asarray(pil, np.float32) / 255.0).transpose(2, 0, 1)[None]


def parameters_text(params: Mapping[str, Any]) -> str:
    """The A1111-style "parameters" string for one image."""
    lines = [str(params.get("prompt", ""))]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    fields = {
        "Steps": params.get("steps"),
        "Sampler": params.get("sampler"),
        "CFG scale": params.get("guidance"),
        "Seed": params.get("seed"),
        "Size": f"{params.get('width')}x{params.get('height')}",
        "Denoising strength": params.get("strength") if params.get("init_image") else None,
        "Model": params.get("model"),
        "Backend": params.get("backend"),
    }
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def check_writable_dir(directory: str | Path) -> Path:
    """Create the output folder if needed; refuse early if it cannot be written."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".sd-write-check-"):
            pass
    except OSError as exc:
        raise UserError(
            f"output folder {directory} is not writable ({exc.strerror or exc})"
        ) from None
    return directory


def save_png(image: np.ndarray, path: str | Path, params: Mapping[str, Any]) -> Path:
    """Write one HxWx3 uint8 image with its parameters chunk, atomically."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters_text(params))
    tmp = path.with_name(f".{path.name}.partial")
    try:
        Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path} ({exc.strerror or exc})") from None
    return path
