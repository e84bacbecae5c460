"""Captioned pictures of simple coloured shapes: the training data of the default model.

`render(spec)` draws one shape (circle, square, triangle or star) in one of `COLOURS` on a
plain background of one of `BACKGROUNDS`, at 64x64 RGB, anti-aliased (drawn at 4x and
box-downsampled). `caption(spec)` says what it is: "a red circle on a white background".

`HELD_OUT` lists (colour, shape, background) combinations that training never sees; every
colour, shape and background in them does appear in training, in other combinations, so a
model that draws them right has learnt to compose the words rather than memorised pictures.

Everything is seeded: `sample_specs(n, seed)` and `render` are deterministic. Needs only
numpy and Pillow, so tests and the benchmark can render ground truth anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
_SUPERSAMPLE = 4

# Saturated, well separated colours, so "which colour is this" has one answer.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "purple": (140, 40, 180),
    "orange": (250, 135, 20),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

# Never shown in training (see module docstring). Each colour, shape and background
# appears here at most a few times and is seen in many other combinations.
HELD_OUT: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("red", "star", "white"),
        ("green", "circle", "black"),
        ("blue", "triangle", "gray"),
        ("yellow", "square", "black"),
        ("purple", "circle", "white"),
        ("orange", "triangle", "black"),
        ("black", "star", "gray"),
        ("white", "square", "gray"),
        ("red", "square", "gray"),
        ("green", "star", "white"),
        ("blue", "circle", "gray"),
        ("orange", "star", "gray"),
    }
)

# Radius (centre to the farthest point of the shape) in pixels, as a fraction of the side.
MIN_RADIUS = 0.2
MAX_RADIUS = 0.34
_STAR_INNER = 0.45  # inner/outer radius of the five-pointed star
_SQUARE_HALF_SIDE = 0.8  # half the side of a square / radius: about a circle's area


@dataclass(frozen=True)
class ShapeSpec:
    """One picture: what is drawn where. cx, cy, radius are fractions of the image side."""

    colour: str
    shape: str
    background: str
    cx: float = 0.5
    cy: float = 0.5
    radius: float = 0.25

    @property
    def combination(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.background)


def caption(spec: ShapeSpec) -> str:
    """The prompt that describes `spec`: "a red circle on a white background"."""
    return f"a {spec.colour} {spec.shape} on a {spec.background} background"


def all_combinations() -> list[tuple[str, str, str]]:
    """Every drawable (colour, shape, background): the colour always differs from the ground."""
    return [
        (c, s, b)
        for c in COLOURS
        for s in SHAPES
        for b in BACKGROUNDS
        if COLOURS[c] != BACKGROUNDS[b]
    ]


def train_combinations() -> list[tuple[str, str, str]]:
    return [combo for combo in all_combinations() if combo not in HELD_OUT]


def held_out_combinations() -> list[tuple[str, str, str]]:
    return sorted(HELD_OUT)


def random_spec(
    rng: np.random.Generator, combinations: Sequence[tuple[str, str, str]]
) -> ShapeSpec:
    """A random placement of a random combination, kept fully inside the picture."""
    colour, shape, background = combinations[int(rng.integers(len(combinations)))]
    radius = float(rng.uniform(MIN_RADIUS, MAX_RADIUS))
    margin = radius + 2.0 / IMAGE_SIZE
    cx, cy = (float(v) for v in rng.uniform(margin, 1.0 - margin, size=2))
    return ShapeSpec(colour, shape, background, cx, cy, radius)


def sample_specs(
    n: int, seed: int, combinations: Sequence[tuple[str, str, str]] | None = None
) -> list[ShapeSpec]:
    """n seeded random specs over `combinations` (default: the training combinations)."""
    rng = np.random.default_rng(seed)
    combos = train_combinations() if combinations is None else list(combinations)
    return [random_spec(rng, combos) for _ in range(n)]


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices (x, y) in pixels of a square, upright triangle or star around (cx, cy)."""
    if shape == "square":
        h = r * _SQUARE_HALF_SIDE
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # Equilateral, pointing up, centred on its bounding box vertically.
        side = r * math.sqrt(3.0)
        height = side * math.sqrt(3.0) / 2.0
        top, bottom = cy - height / 2.0, cy + height / 2.0
        return [(cx, top), (cx + side / 2.0, bottom), (cx - side / 2.0, bottom)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * _STAR_INNER
            angle = -math.pi / 2.0 + k * math.pi / 5.0
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def render(spec: ShapeSpec, size: int = IMAGE_SIZE) -> np.ndarray:
    """The picture of `spec` as uint8 [size, size, 3]."""
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[spec.background])
    draw = ImageDraw.Draw(image)
    fill = COLOURS[spec.colour]
    cx, cy, r = spec.cx * big, spec.cy * big, spec.radius * big
    if spec.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(shape_polygon(spec.shape, cx, cy, r), fill=fill)
    return np.asarray(image.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


def render_batch(specs: Iterable[ShapeSpec], size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [N, size, size, 3]."""
    return np.stack([render(spec, size) for spec in specs])
