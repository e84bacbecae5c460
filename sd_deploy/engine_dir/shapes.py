"""Shape ranges and optimization profiles: parsing, checking, resolving -- one copy for all.

Graph inputs carry symbolic shapes such as ["cfg_batch", 4, "latent_height",
"latent_width"]. Every symbol is derived from three image-level ranges (batch, height,
width), so the exporter (what it validates), `sd-build` (TensorRT profiles) and the
runtime (refusing a request before any work) resolve shapes with the functions here.

A profile is, per input, concrete min/opt/max shapes. The UNet's and text encoder's
`cfg_batch` axis spans one unguided image (min) to twice the image batch (opt and
max: classifier-free guidance runs cond and uncond in one call).

Pure Python: no TensorRT needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sd_deploy.engine_dir.layout import build_command
from sd_deploy.engine_dir.manifest import (
    CONTEXT_CHUNK,
    ComponentSpec,
    Manifest,
    ShapeRange,
    ShapeRanges,
)
from sd_deploy.errors import BuildError, RequestError, UserError

# Pixel sizes must be multiples of this (the VAE downsamples 8x).
PIXEL_MULTIPLE = 8
DIMENSIONS = ("batch", "height", "width")
# The UNet's context length: prompts of up to 3 chunks (225 text tokens) by default.
DEFAULT_CONTEXT_LENGTH = ShapeRange(CONTEXT_CHUNK, CONTEXT_CHUNK, 3 * CONTEXT_CHUNK)

# input name -> {"min": shape, "opt": shape, "max": shape}; the JSON form too.
ProfileShapes = dict[str, dict[str, list[int]]]
PROFILE_KEYS = ("min", "opt", "max")


# -- image-level ranges ------------------------------------------------------------------


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


def _multiple(name: str) -> int:
    return 1 if name == "batch" else PIXEL_MULTIPLE


def check_ranges(ranges: ShapeRanges) -> ShapeRanges:
    for name in DIMENSIONS:
        check_range(getattr(ranges, name), name, _multiple(name))
    check_range(ranges.context_length, "context-length", CONTEXT_CHUNK)
    return ranges


def default_ranges(default_size: int, max_batch: int = 4) -> ShapeRanges:
    """Half to double the model's native size, batch 1..max_batch (opt 1), and prompts of
    1..3 chunks (context length 77..231, opt 77)."""
    size = ShapeRange(default_size // 2, default_size, default_size * 2)
    return ShapeRanges(
        batch=ShapeRange(1, 1, max_batch),
        height=size,
        width=size,
        context_length=DEFAULT_CONTEXT_LENGTH,
    )


def parse_context_range(text: str) -> ShapeRange:
    """--context-length 'MIN:OPT:MAX' or 'N' in tokens, each a multiple of 77."""
    return check_range(parse_range(text, "context-length"), "context-length", CONTEXT_CHUNK)


def max_context_chunks(ranges: ShapeRanges) -> int:
    """The most 77-token prompt chunks a context in `ranges` holds."""
    return max(1, ranges.context_length.max // CONTEXT_CHUNK)


def override(
    base: ShapeRanges,
    batch: str | None,
    height: str | None,
    width: str | None,
    context_length: str | None = None,
) -> ShapeRanges:
    """Replace some of `base`'s ranges by flag values (N or MIN:OPT:MAX), checked."""
    result = {}
    for name, text in zip(DIMENSIONS, (batch, height, width), strict=True):
        if text is None:
            result[name] = getattr(base, name)
        else:
            result[name] = check_range(parse_range(text, name), name, _multiple(name))
    result["context_length"] = (
        base.context_length if context_length is None else parse_context_range(context_length)
    )
    return ShapeRanges(**result)


def narrow(
    base: ShapeRanges,
    batch: str | None,
    height: str | None,
    width: str | None,
    context_length: str | None = None,
) -> ShapeRanges:
    """Like `override`, refusing values outside what was exported (`base`)."""
    result = override(base, batch, height, width, context_length)
    for name in (*DIMENSIONS, "context_length"):
        old: ShapeRange = getattr(base, name)
        new: ShapeRange = getattr(result, name)
        if new.min < old.min or new.max > old.max:
            flag = name.replace("_", "-")
            raise UserError(
                f"{flag} range {new.min}:{new.opt}:{new.max} is outside the exported range "
                f"{old.min}:{old.opt}:{old.max} (re-export with a wider --{flag})"
            )
    return result


def static_ranges(ranges: ShapeRanges) -> ShapeRanges:
    """Every range collapsed to its opt value (min = opt = max)."""
    opt = {name: getattr(ranges, name).opt for name in (*DIMENSIONS, "context_length")}
    return ShapeRanges(**{name: ShapeRange(v, v, v) for name, v in opt.items()})


def request_ranges(manifest: Manifest, components: Sequence[str]) -> ShapeRanges:
    """The ranges a request must fit: the intersection over the components it runs.

    The text encoder has no height or width, but every component carries the engine
    dir's image ranges, so the intersection is what the engine dir was exported for."""
    specs = [manifest.components[c] for c in components]
    result = {}
    for name in (*DIMENSIONS, "context_length"):
        rs = [getattr(s.shape_ranges, name) for s in specs]
        lo, hi = max(r.min for r in rs), min(r.max for r in rs)
        result[name] = ShapeRange(lo, min(max(rs[0].opt, lo), hi), hi)
    return ShapeRanges(**result)


def check_request(ranges: ShapeRanges, batch: int, height: int, width: int, where: str) -> None:
    """Refuse a request outside `ranges` (what `where` was exported for), before any work."""
    for name, value in (("height", height), ("width", width)):
        if value % PIXEL_MULTIPLE:
            raise RequestError(f"{name} {value} is not a multiple of {PIXEL_MULTIPLE}")
    for name, value in zip(DIMENSIONS, (batch, height, width), strict=True):
        r: ShapeRange = getattr(ranges, name)
        if not r.contains(value):
            raise RequestError(
                f"{name} {value} is outside the {r.min}..{r.max} {where} was exported for "
                f"(re-export with a wider --{name} range)"
            )


# -- symbolic shapes -----------------------------------------------------------------------


def symbol_values(
    batch: int,
    height: int,
    width: int,
    vae_scale_factor: int,
    guided: bool = True,
    context_length: int = CONTEXT_CHUNK,
) -> dict[str, int]:
    """Values of every shape symbol for one request (UNet batch doubles with guidance;
    context_length is 77 x the prompt chunks)."""
    return {
        "batch": batch,
        "cfg_batch": batch * 2 if guided else batch,
        "height": height,
        "width": width,
        "latent_height": height // vae_scale_factor,
        "latent_width": width // vae_scale_factor,
        "context_length": context_length,
    }


def resolve(shape: Sequence[int | str], values: Mapping[str, int]) -> list[int]:
    """Symbolic shape -> concrete shape."""
    try:
        return [d if isinstance(d, int) else values[d] for d in shape]
    except KeyError as exc:
        raise ValueError(f"unknown shape symbol {exc} in {list(shape)}") from None


def shape_outside(shape: Sequence[int], lo: Sequence[int], hi: Sequence[int]) -> bool:
    """Whether a concrete shape falls outside lo..hi (or has another rank): THE range check
    behind every profile test below and the TensorRT session's input check."""
    return len(shape) != len(lo) or any(
        s < a or s > b for s, a, b in zip(shape, lo, hi, strict=False)
    )


# -- optimization profiles -----------------------------------------------------------------


def profile_shapes(
    inputs: Sequence[tuple[str, Sequence[int | str]]], ranges: ShapeRanges, vae_scale_factor: int
) -> ProfileShapes:
    """min/opt/max concrete shapes of each input: a TensorRT optimization profile.

    The UNet batch spans a single unguided image (min) to 2 * max batch (guided), its
    context length ranges.context_length.
    """
    ctx = ranges.context_length
    lo = symbol_values(
        ranges.batch.min, ranges.height.min, ranges.width.min, vae_scale_factor, False, ctx.min
    )
    opt = symbol_values(
        ranges.batch.opt, ranges.height.opt, ranges.width.opt, vae_scale_factor, True, ctx.opt
    )
    hi = symbol_values(
        ranges.batch.max, ranges.height.max, ranges.width.max, vae_scale_factor, True, ctx.max
    )
    return {
        name: {"min": resolve(shape, lo), "opt": resolve(shape, opt), "max": resolve(shape, hi)}
        for name, shape in inputs
    }


def build_ranges(
    spec: ComponentSpec,
    batch: str | None = None,
    height: str | None = None,
    width: str | None = None,
    static: bool = False,
) -> ShapeRanges:
    """The exported ranges of `spec` narrowed by the flags; refuses values outside them."""
    try:
        ranges = narrow(spec.shape_ranges, batch, height, width)
    except UserError as exc:
        raise BuildError(str(exc)) from None
    return static_ranges(ranges) if static else ranges


def component_profile(
    spec: ComponentSpec, ranges: ShapeRanges, vae_scale_factor: int, static: bool = False
) -> ProfileShapes:
    """Concrete min/opt/max shapes of every input of `spec` for `ranges`.

    Dynamic: min is the unguided smallest request, opt and max are guided (the
    `cfg_batch` axis doubles). Static: min = opt = max = the guided opt shape, so a
    static UNet plan serves guided requests of exactly that size.
    """
    inputs = [(t.name, t.shape) for t in spec.inputs]
    profile = profile_shapes(inputs, ranges, vae_scale_factor)
    if static:
        profile = {name: {k: list(s["opt"]) for k in PROFILE_KEYS} for name, s in profile.items()}
    return profile


def wanted_profile(
    spec: ComponentSpec,
    vae_scale_factor: int,
    batch: str | None = None,
    height: str | None = None,
    width: str | None = None,
    static: bool = False,
) -> ProfileShapes:
    """The profile `sd-build` builds `spec` with, given its flags.

    Without flags this is the manifest's own `profile_shapes` (what the exporter
    validated); with flags it is recomputed from the narrowed ranges.
    """
    if batch is None and height is None and width is None and not static:
        return {
            name: {k: list(s[k]) for k in PROFILE_KEYS} for name, s in spec.profile_shapes.items()
        }
    ranges = build_ranges(spec, batch, height, width, static)
    return component_profile(spec, ranges, vae_scale_factor, static)


def check_within(
    profile: Mapping[str, Mapping[str, list[int]]], outer: ProfileShapes, what: str
) -> None:
    """Refuse a profile reaching outside `outer` (the exported one), naming the input."""
    for name, dims in profile.items():
        if name not in outer:
            raise BuildError(f"{what}: input {name!r} is not an input of the exported graph")
        lo, hi = outer[name]["min"], outer[name]["max"]
        for key in PROFILE_KEYS:
            shape = list(dims[key])
            if shape_outside(shape, lo, hi):
                raise BuildError(
                    f"{what}: {name} {key} shape {shape} is outside the exported {lo}..{hi} "
                    "(re-export with wider ranges)"
                )


def profile_difference(built: Mapping[str, Mapping[str, list[int]]], wanted: ProfileShapes) -> str:
    """First difference between two profiles in words, or '' when they are equal."""
    for name in sorted(set(built) | set(wanted)):
        if name not in built:
            return f"input {name} is missing from the built profile"
        if name not in wanted:
            return f"input {name} is not wanted"
        for key in PROFILE_KEYS:
            a, b = list(built[name].get(key, [])), list(wanted[name].get(key, []))
            if a != b:
                return f"{name} {key} shape is {a}, wanted {b}"
    return ""


def request_outside_profiles(
    manifest: Manifest,
    profiles: Mapping[str, Mapping[str, Mapping[str, list[int]]]],
    batch: int,
    height: int,
    width: int,
    guided: bool,
    engine_dir: str,
    context_length: int = CONTEXT_CHUNK,
) -> str:
    """Why an image-level request does not fit built plans' profiles, or '' when it does.

    `context_length`: 77 x the prompt chunks of the request (long prompts need more)."""
    values = symbol_values(
        batch, height, width, manifest.model.vae_scale_factor, guided, context_length
    )
    for component, profile in profiles.items():
        spec = manifest.components[component]
        for tensor in spec.inputs:
            if tensor.name not in profile:
                continue
            shape = resolve(tensor.shape, values)
            lo, hi = profile[tensor.name]["min"], profile[tensor.name]["max"]
            if shape_outside(shape, lo, hi):
                mode = "guided" if guided else "unguided"
                if context_length != CONTEXT_CHUNK:
                    mode += f", a {context_length}-token prompt context"
                return (
                    f"batch {batch} at {width}x{height} ({mode}) needs {component} {tensor.name} "
                    f"{shape}, outside its TensorRT plan's {lo}..{hi} (rebuild with "
                    f"{build_command(engine_dir, component)} and a wider --batch/--height/--width, "
                    "or without --static)"
                )
    return ""
