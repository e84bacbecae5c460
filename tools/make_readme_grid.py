"""Draw docs/images/default_model_grid.png: what the default model makes of a few prompts.

    .venv/bin/python tools/make_readme_grid.py [--out docs/images/default_model_grid.png]

The images come from the deployed path: the packaged default model exported to fp32 ONNX
(in a temporary folder) and run by the numpy runtime on ONNX Runtime CPU, with the model's
default sampler, steps and guidance. Each prompt is written under its image; prompts marked
"*" are held-out combinations the model never saw in training.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sd_deploy.models import shapes_check, shapes_data  # noqa: E402

PROMPTS: list[tuple[str, str, str]] = [
    ("red", "star", "white"),
    ("green", "circle", "black"),
    ("blue", "triangle", "gray"),
    ("yellow", "square", "black"),
    ("purple", "circle", "white"),
    ("orange", "triangle", "black"),
    ("white", "square", "gray"),
    ("orange", "star", "gray"),
    ("blue", "star", "black"),
    ("black", "circle", "white"),
    ("red", "triangle", "black"),
    ("green", "square", "gray"),
]
COLUMNS = 4
SCALE = 3  # 64 px images drawn at 192 px (nearest), so the pixels stay honest
CAPTION_HEIGHT = 40
LEGEND_HEIGHT = 22
PAD = 8


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def generate(prompts: list[str], seed: int) -> np.ndarray:
    from sd_deploy.engine_dir import shapes
    from sd_deploy.exporter import export_engine_dir
    from sd_deploy.models import load_models
    from sd_deploy.runtime.pipeline import GenerationRequest, Pipeline

    models = load_models()
    size = shapes.ShapeRange(32, 64, 128)
    ranges = shapes.ShapeRanges(
        batch=shapes.ShapeRange(1, 1, len(prompts)), height=size, width=size
    )
    with tempfile.TemporaryDirectory() as tmp:
        engine = Path(tmp) / "default-fp32"
        export_engine_dir(models, engine, fp16=False, ranges=ranges, progress=False)
        pipe = Pipeline(engine, backend="onnxruntime-cpu")
        try:
            result = pipe.generate(GenerationRequest(prompt=prompts, batch=len(prompts), seed=seed))
        finally:
            pipe.close()
    return result.images


def grid(images: np.ndarray, labels: list[tuple[str, str]]) -> Image.Image:
    cell = 64 * SCALE
    rows = -(-len(images) // COLUMNS)
    width = COLUMNS * cell + (COLUMNS + 1) * PAD
    height = rows * (cell + CAPTION_HEIGHT) + (rows + 1) * PAD + LEGEND_HEIGHT
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(14)
    for i, (image, (line1, line2)) in enumerate(zip(images, labels, strict=True)):
        r, c = divmod(i, COLUMNS)
        x = PAD + c * (cell + PAD)
        y = PAD + r * (cell + CAPTION_HEIGHT + PAD)
        canvas.paste(Image.fromarray(image).resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        draw.text((x + cell // 2, y + cell + 3), line1, fill=(0, 0, 0), font=font, anchor="ma")
        draw.text((x + cell // 2, y + cell + 20), line2, fill=(90, 90, 90), font=font, anchor="ma")
    legend = "* held out: a combination the model never saw in training"
    draw.text((PAD, height - LEGEND_HEIGHT), legend, fill=(90, 90, 90), font=font)
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, default=REPO / "docs" / "images" / "default_model_grid.png"
    )
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    prompts = [f"a {c} {s} on a {b} background" for c, s, b in PROMPTS]
    images = generate(prompts, args.seed)
    scores = shapes_check.score(images, PROMPTS)
    print(scores.summary())
    labels = []
    for c, s, b in PROMPTS:
        mark = " *" if (c, s, b) in shapes_data.HELD_OUT else ""
        labels.append((f"a {c} {s}{mark}", f"on a {b} background"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid(images, labels).save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
