"""Pixels in and out: init images, uint8 conversion, PNGs that carry their parameters.

PNGs get a "parameters" text chunk exactly as AUTOMATIC1111 v1.6.0 writes it (see
sd_deploy.runtime.infotext), which other SD tools (A1111, ComfyUI importers, civitai) read.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from sd_deploy.engine_dir.atomic import replacing
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
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise RequestError(f"init image {path} is not a readable image ({exc})") from None


def prepare_init_image(image: np.ndarray | Image.Image, width: int, height: int) -> np.ndarray:
    """RGB image (uint8 HxWx3 or PIL) -> [1,3,height,width] float32 in [0,1], resized if needed."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    pil = pil.convert("RGB")
    if pil.size != (width, height):
        pil = pil.resize((width, height), Image.Resampling.LANCZOS)
    return (np.asarray(pil, np.float32) / 255.0).transpose(2, 0, 1)[None]


def read_png_parameters(path: str | Path) -> str:
    """The "parameters" text an image carries (A1111 writes it in PNG tEXt/iTXt chunks and
    in JPEG/WebP EXIF UserComment; PNG only here); one-line errors when it has none."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            text = image.info.get("parameters")
    except FileNotFoundError:
        raise RequestError(f"image {path} does not exist") from None
    except IsADirectoryError:
        raise RequestError(f"image {path} is a directory") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        # DecompressionBombError: the header claims billions of pixels
        raise RequestError(f"image {path} is not a readable image ({exc})") from None
    if not isinstance(text, str) or not text.strip():
        raise RequestError(f"image {path} has no generation parameters (no 'parameters' text)")
    return text


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


def output_paths(out: str | Path, seeds: Sequence[int], overwrite: bool = False) -> list[Path]:
    """Where the images of one call go, checked before any work.

    `out` ending in .png names the file (a batch gets NAME-0.png, NAME-1.png, ...), which
    must not exist unless `overwrite`; anything else is a folder, created if needed, where
    image i is NNNNN-SEED.png numbered past the highest already there (never overwrites)."""
    out = Path(out)
    if out.suffix.lower() == ".png" and not out.is_dir():
        if len(seeds) == 1:
            paths = [out]
        else:
            paths = [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(seeds))]
        check_writable_dir(out.parent)
        taken = [p for p in paths if p.exists()]
        if taken and not overwrite:
            raise UserError(f"{taken[0]} exists (pass --overwrite to replace it)")
        directories = [p for p in taken if p.is_dir()]
        if directories:
            raise UserError(f"{directories[0]} is a directory, not a PNG file")
        return paths
    folder = check_writable_dir(out)
    numbers = [int(p.name[:5]) for p in folder.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")]
    first = max(numbers, default=0) + 1
    return [folder / f"{first + i:05d}-{seed}.png" for i, seed in enumerate(seeds)]


def save_png(image: np.ndarray, path: str | Path, parameters: str) -> Path:
    """Write one HxWx3 uint8 image with its A1111 "parameters" text chunk, atomically."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    try:
        with replacing(path) as tmp:
            Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror or exc})") from None
    return path
