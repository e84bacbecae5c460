"""Shape ranges: parsing them, checking them, and turning them into concrete shapes.

Graph inputs carry symbolic shapes such as ["cfg_batch", 4, "latent_height",
"latent_width"]. Every symbol is derived from three image-level ranges (batch,
height, width), so the exporter, the TensorRT profile builder and the runtime all
resolve shapes with the same few lines here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sd_deploy.errors import RequestError, UserError
from sd_deploy.runtime.manifest import ShapeRange, ShapeRanges

# Pixel sizes must be multiples of this (the VAE downsamples 8x).
PIXEL_MULTIPLE = 8


def parse_range(text: str, what: str) -> ShapeRange:
    """'MIN:OPT:MAX' or a single 'N' (static) -> ShapeRange; bad text is a one-line error."""
    parts = str(text).split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"{what} range {text!r} is not N or MIN:OPT:MAX of integers") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise UserError(f"{what} range {text!r} is not N or MIN:OPT:MAX")
    return ShapeRange(*values)


def check_range(r: ShapeRange, what: str, multiple: int = 1) -> ShapeRange:
    """Reject non-positive, inverted or misaligned ranges with a message naming the flag."""
    if r.min < 1:
        raise UserError(f"{what} range {r.min}:{r.opt}:{r.max} must be positive")
    if not r.min <= r.opt <= r.max:
        raise UserError(f"{what} range {r.min}:{r.opt}:{r.max} is inverted: need MIN <= OPT <= MAX")
    bad = [v for v in (r.min, r.opt, r.max) if v % multiple]
    if bad:
        raise UserError(
            f"{what} range {r.min}:{r.opt}:{r.max} has {bad[0]}, not a multiple of {multiple}"
        )
    return r


def check_ranges(ranges: ShapeRanges) -> ShapeRanges:
    check_range(ranges.batch, "batch")
    check_range(ranges.height, "height", PIXEL_MULTIPLE)
    check_range(ranges.width, "width", PIXEL_MULTIPLE)
    return ranges


def default_ranges(default_size: int, max_batch: int = 4) -> ShapeRanges:
    """Half to double the model's native size, batch 1..max_batch (opt 1)."""
    size = ShapeRange(default_size // 2, default_size, default_size * 2)
    return ShapeRanges(batch=ShapeRange(1, 1, max_batch), height=size, width=size)


def override(
    base: ShapeRanges, batch: str | None, height: str | None, width: str | None
) -> ShapeRanges:
    """Replace some of `base`'s ranges by flag values (N or MIN:OPT:MAX), checked."""
    result = {}
    for name, text in (("batch", batch), ("height", height), ("width", width)):
        if text is None:
            result[name] = getattr(base, name)
        else:
            multiple = 1 if name == "batch" else PIXEL_MULTIPLE
            result[name] = check_range(parse_range(text, name), name, multiple)
    return ShapeRanges(**result)


def narrow(
    base: ShapeRanges, batch: str | None, height: str | None, width: str | None
) -> ShapeRanges:
    """Like `override`, refusing values outside what was exported (`base`)."""
    result = override(base, batch, height, width)
    for name in ("batch", "height", "width"):
        old: ShapeRange = getattr(base, name)
        new: ShapeRange = getattr(result, name)
        if new.min < old.min or new.max > old.max:
            raise UserError(
                f"{name} range {new.min}:{new.opt}:{new.max} is outside the exported range "
                f"{old.min}:{old.opt}:{old.max} (re-export with a wider --{name})"
            )
    return result


def symbol_values(
    batch: int, height: int, width: int, vae_scale_factor: int, guided: bool = True
) -> dict[str, int]:
    """Values of every shape symbol for one request (UNet batch doubles with guidance)."""
    return {
        "batch": batch,
        "cfg_batch": batch * 2 if guided else batch,
        "height": height,
        "width": width,
        "latent_height": height // vae_scale_factor,
        "latent_width": width // vae_scale_factor,
    }


def resolve(shape: Sequence[int | str], values: Mapping[str, int]) -> list[int]:
    """Symbolic shape -> concrete shape."""
    try:
        return [d if isinstance(d, int) else values[d] for d in shape]
    except KeyError as exc:
        raise ValueError(f"unknown shape symbol {exc} in {list(shape)}") from None


def profile_shapes(
    inputs: Sequence[tuple[str, Sequence[int | str]]], ranges: ShapeRanges, vae_scale_factor: int
) -> dict[str, dict[str, list[int]]]:
    """min/opt/max concrete shapes of each input: a TensorRT optimization profile.

    The UNet batch spans a single unguided image (min) to 2 * max batch (guided).
    """
    lo = symbol_values(
        ranges.batch.min, ranges.height.min, ranges.width.min, vae_scale_factor, False
    )
    opt = symbol_values(ranges.batch.opt, ranges.height.opt, ranges.width.opt, vae_scale_factor)
    hi = symbol_values(ranges.batch.max, ranges.height.max, ranges.width.max, vae_scale_factor)
    return {
        name: {"min": resolve(shape, lo), "opt": resolve(shape, opt), "max": resolve(shape, hi)}
        for name, shape in inputs
    }


def check_request(ranges: ShapeRanges, batch: int, height: int, width: int, component: str) -> None:
    """Refuse a request the engines were not exported/built for, before any work."""
    for name, value in (("height", height), ("width", width)):
        if value % PIXEL_MULTIPLE:
            raise RequestError(f"{name} {value} is not a multiple of {PIXEL_MULTIPLE}")
    for name, value in (("batch", batch), ("height", height), ("width", width)):
        r: ShapeRange = getattr(ranges, name)
        if not r.contains(value):
            raise RequestError(
                f"{name} {value} is outside the {r.min}..{r.max} the {component} engine was "
                f"exported for (re-export with a wider --{name} range)"
            )
