"""PNG figures for sd-bench reports, drawn with Pillow alone (no plotting library).

- `latency_chart`: one panel per measured quantity (text encoder, UNet step, VAE decoder,
  end to end), a horizontal bar per backend, each panel on its own scale and labelled with
  the value, so a 20 ms text encoder and a 5 s generation are both readable.
- `image_grid`: per backend a row PyTorch | backend | |difference| x amplification.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = (
    (76, 114, 176),
    (221, 132, 82),
    (85, 168, 104),
    (196, 78, 82),
    (129, 114, 179),
    (147, 120, 96),
    (218, 139, 195),
)
BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
GRID = (225, 225, 225)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def format_seconds(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def latency_chart(
    panels: Sequence[tuple[str, Sequence[tuple[str, float]]]],
    backends: Sequence[str],
    path: Path,
    title: str = "",
) -> Path:
    """Horizontal bar panels: (panel title, [(backend, seconds), ...]) each."""
    font, small, big = _font(14), _font(12), _font(16)
    width, label_w, value_w, bar_h, gap = 760, 130, 90, 20, 6
    colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(backends)}
    heights = [28 + len(rows) * (bar_h + gap) + 14 for _, rows in panels]
    top = 40 if title else 10
    image = Image.new("RGB", (width, top + sum(heights) + 10), BACKGROUND)
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((10, 10), title, fill=INK, font=big)
    y = top
    plot_w = width - label_w - value_w - 20
    for (panel_title, rows), height in zip(panels, heights, strict=True):
        draw.text((10, y), panel_title, fill=INK, font=font)
        y0 = y + 26
        peak = max((value for _, value in rows), default=0.0) or 1.0
        for fraction in (0.25, 0.5, 0.75, 1.0):
            x = label_w + int(plot_w * fraction)
            draw.line([(x, y0 - 2), (x, y0 + len(rows) * (bar_h + gap))], fill=GRID)
        for i, (name, value) in enumerate(rows):
            yb = y0 + i * (bar_h + gap)
            draw.text((10, yb + 3), name, fill=INK, font=small)
            length = max(int(plot_w * value / peak), 1)
            draw.rectangle(
                [label_w, yb, label_w + length, yb + bar_h], fill=colours.get(name, PALETTE[0])
            )
            draw.text((label_w + length + 6, yb + 3), format_seconds(value), fill=INK, font=small)
        y += height
    image.save(path)
    return path


def amplified_difference(got: np.ndarray, want: np.ndarray, gain: float) -> np.ndarray:
    """|got - want| per pixel (max over RGB) times `gain`, as a grey uint8 image."""
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16)).max(axis=-1)
    grey = np.clip(diff.astype(np.float32) * gain, 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def image_grid(
    reference: np.ndarray,
    rows: Sequence[tuple[str, np.ndarray]],
    path: Path,
    gain: float | None = None,
    min_side: int = 160,
) -> Path:
    """Rows of PyTorch | backend | |difference| x gain, for the first image of each batch.

    gain None: chosen so the largest difference over all rows is bright (255 / max, between
    1 and 64), and written in the column header.
    """
    font = _font(13)
    ref = reference[0]
    if gain is None:
        largest = max(
            (int(np.abs(img[0].astype(np.int16) - ref.astype(np.int16)).max()) for _, img in rows),
            default=0,
        )
        gain = float(min(64, max(1, 255 // largest))) if largest else 1.0
    h, w = ref.shape[:2]
    scale = max(1, int(np.ceil(min_side / max(h, w))))
    cell_w, cell_h = w * scale, h * scale
    pad, label_h = 8, 20
    header = 24
    columns = ("PyTorch fp32", "backend", f"|difference| x {gain:g}")
    total_w = pad + 3 * (cell_w + pad)
    total_h = header + len(rows) * (label_h + cell_h + pad) + pad
    canvas = Image.new("RGB", (total_w, total_h), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(columns):
        draw.text((pad + c * (cell_w + pad), 6), text, fill=INK, font=font)

    def cell(array: np.ndarray) -> Image.Image:
        return Image.fromarray(array).resize((cell_w, cell_h), Image.Resampling.NEAREST)

    y = header
    for label, images in rows:
        got = images[0]
        draw.text((pad, y + 2), label, fill=INK, font=font)
        y += label_h
        for c, array in enumerate((ref, got, amplified_difference(got, ref, gain))):
            canvas.paste(cell(array), (pad + c * (cell_w + pad), y))
        y += cell_h + pad
    canvas.save(path)
    return path
