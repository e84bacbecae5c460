"""Reads back what a shapes picture shows: an independent check of generated images.

No learning involved, only measurements, so a pass means the picture really has the
colour and shape the prompt asked for:

1. background: the median colour of the picture's outer frame, named by the nearest of
   `BACKGROUNDS`;
2. foreground: pixels farther than `FOREGROUND_DISTANCE` from the background colour; the
   largest 4-connected region of them is the shape;
3. colour: the mean colour of the region's interior (edges are anti-aliased mixtures),
   named by the nearest of `COLOURS`;
4. shape, from two scale-free measurements of the region:
   - solidity, area / convex hull area: a five-pointed star is far from convex (~0.6),
     the other shapes are convex (~0.95+);
   - fill, area / bounding box area: square ~1, circle pi/4 ~ 0.79, triangle ~ 0.5.

`check_dataset_renders` in the tests confirms it reads the renderer's own pictures right.
Only numpy, so the benchmark can use it without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sd_deploy.models.shapes_data import BACKGROUNDS, COLOURS, ShapeSpec

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that counts as "drawn"
MIN_AREA_FRACTION = 0.01  # a region smaller than this is "nothing drawn"
STAR_SOLIDITY = 0.8  # below: star
SQUARE_FILL = 0.89  # above (and convex): square
CIRCLE_FILL = 0.64  # above (and convex): circle, below: triangle
_FRAME = 2  # pixels of the outer frame that give the background colour

_COLOUR_NAMES = list(COLOURS)
_COLOUR_RGB = np.array([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float64)
_BACKGROUND_NAMES = list(BACKGROUNDS)
_BACKGROUND_RGB = np.array([BACKGROUNDS[b] for b in _BACKGROUND_NAMES], dtype=np.float64)


@dataclass(frozen=True)
class ShapeReading:
    """What one picture shows. colour/shape are None when nothing is drawn."""

    colour: str | None
    shape: str | None
    background: str
    area_fraction: float  # the shape's area / the picture's
    fill: float  # area / bounding box area
    solidity: float  # area / convex hull area
    mean_rgb: tuple[float, float, float] | None


def _nearest(rgb: np.ndarray, names: list[str], table: np.ndarray) -> str:
    return names[int(np.argmin(np.linalg.norm(table - rgb[None], axis=1)))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (iterative labelling, numpy only)."""
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    # Propagate the maximum label through each region until it stops changing.
    while True:
        padded = np.pad(labels, 1)
        neighbours = np.maximum.reduce(
            [
                padded[1:-1, 1:-1],
                padded[:-2, 1:-1],
                padded[2:, 1:-1],
                padded[1:-1, :-2],
                padded[1:-1, 2:],
            ]
        )
        updated = np.where(mask, neighbours, 0)
        if np.array_equal(updated, labels):
            break
        labels = updated
    values, counts = np.unique(labels[mask], return_counts=True)
    if len(values) == 0:
        return mask
    return labels == values[np.argmax(counts)]


def _erode(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    return (
        padded[1:-1, 1:-1]
        & padded[:-2, 1:-1]
        & padded[2:, 1:-1]
        & padded[1:-1, :-2]
        & padded[1:-1, 2:]
    )


def _convex_hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of the mask's pixels taken as unit squares (monotone chain)."""
    ys, xs = np.nonzero(mask)
    corners = np.concatenate(
        [np.stack([xs + dx, ys + dy], axis=1) for dx in (0, 1) for dy in (0, 1)]
    )
    points = sorted({(int(x), int(y)) for x, y in corners})
    if len(points) < 3:
        return 0.0

    def cross(o: tuple[int, int], a: tuple[int, int], b: tuple[int, int]) -> int:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[int, int]] = []
    for p in points:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[tuple[int, int]] = []
    for p in reversed(points):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = np.array(lower[:-1] + upper[:-1], dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def classify_shape(fill: float, solidity: float) -> str:
    """circle / square / triangle / star from the two measurements (see module docstring)."""
    if solidity < STAR_SOLIDITY:
        return "star"
    if fill > SQUARE_FILL:
        return "square"
    if fill > CIRCLE_FILL:
        return "circle"
    return "triangle"


def read_image(image: np.ndarray) -> ShapeReading:
    """Measure one uint8 (or float in [0,1]) RGB picture [H, W, 3]."""
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8:
        pixels = np.clip(np.asarray(pixels, dtype=np.float64) * 255.0, 0, 255)
    rgb = pixels.astype(np.float64)
    h, w, _ = rgb.shape
    frame = np.ones((h, w), dtype=bool)
    frame[_FRAME:-_FRAME, _FRAME:-_FRAME] = False
    background_rgb = np.median(rgb[frame], axis=0)
    background = _nearest(background_rgb, _BACKGROUND_NAMES, _BACKGROUND_RGB)
    distance = np.linalg.norm(rgb - background_rgb[None, None], axis=-1)
    mask = distance > FOREGROUND_DISTANCE
    region = _largest_component(mask) if mask.any() else mask
    area = int(region.sum())
    if area < MIN_AREA_FRACTION * h * w:
        return ShapeReading(None, None, background, area / (h * w), 0.0, 0.0, None)
    core = _erode(region)
    inside = rgb[core] if core.sum() >= 4 else rgb[region]
    mean_rgb = inside.mean(axis=0)
    ys, xs = np.nonzero(region)
    box = float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    hull = _convex_hull_area(region)
    fill = area / box
    solidity = area / hull if hull > 0 else 0.0
    return ShapeReading(
        colour=_nearest(mean_rgb, _COLOUR_NAMES, _COLOUR_RGB),
        shape=classify_shape(fill, solidity),
        background=background,
        area_fraction=area / (h * w),
        fill=fill,
        solidity=solidity,
        mean_rgb=(float(mean_rgb[0]), float(mean_rgb[1]), float(mean_rgb[2])),
    )


@dataclass(frozen=True)
class CheckScores:
    """Fractions of pictures whose colour / shape / background / all three match."""

    n: int
    colour: float
    shape: float
    background: float
    all: float
    readings: tuple[ShapeReading, ...]

    def summary(self) -> str:
        return (
            f"{self.n} images: colour {self.colour:.1%}, shape {self.shape:.1%}, "
            f"background {self.background:.1%}, all three {self.all:.1%}"
        )


def score(
    images: np.ndarray | Sequence[np.ndarray],
    wanted: Sequence[ShapeSpec | tuple[str, str, str]],
) -> CheckScores:
    """Read each image and compare with the (colour, shape, background) it should show."""
    if len(images) != len(wanted):
        raise ValueError(f"{len(images)} images but {len(wanted)} expected readings")
    readings = tuple(read_image(image) for image in images)
    combos = [w.combination if isinstance(w, ShapeSpec) else tuple(w) for w in wanted]
    colour = [r.colour == c for r, (c, _, _) in zip(readings, combos, strict=True)]
    shape = [r.shape == s for r, (_, s, _) in zip(readings, combos, strict=True)]
    background = [r.background == b for r, (_, _, b) in zip(readings, combos, strict=True)]
    n = len(readings)
    both = [a and b and c for a, b, c in zip(colour, shape, background, strict=True)]
    return CheckScores(
        n=n,
        colour=sum(colour) / n if n else 0.0,
        shape=sum(shape) / n if n else 0.0,
        background=sum(background) / n if n else 0.0,
        all=sum(both) / n if n else 0.0,
        readings=readings,
    )
