"""TensorRT optimization profiles: the min/opt/max shapes each plan is built for.

A profile comes from the ranges the manifest says a component was exported for,
narrowed by the `sd-build` flags (`--batch MIN:OPT:MAX`, `--height`, `--width`) or
collapsed to one shape by `--static`. Symbolic graph shapes are resolved with the
same helpers as the exporter and the runtime (`sd_deploy.runtime.shapes`), so the
UNet's and text encoder's `cfg_batch` axis spans one unguided image (min) to twice
the image batch (opt and max, classifier-free guidance).

Pure Python: no TensorRT needed.
"""

from __future__ import annotations

from collections.abc import Mapping

from sd_deploy.errors import BuildError, UserError
from sd_deploy.runtime import shapes
from sd_deploy.runtime.manifest import ComponentSpec, ShapeRange, ShapeRanges

# input name -> {"min": shape, "opt": shape, "max": shape}; the JSON form too.
ProfileShapes = dict[str, dict[str, list[int]]]

PROFILE_KEYS = ("min", "opt", "max")


def static_ranges(ranges: ShapeRanges) -> ShapeRanges:
    """Every range collapsed to its opt value (min = opt = max)."""
    return ShapeRanges(
        **{
            name: ShapeRange(r.opt, r.opt, r.opt)
            for name, r in (
                ("batch", ranges.batch),
                ("height", ranges.height),
                ("width", ranges.width),
            )
        }
    )


def build_ranges(
    spec: ComponentSpec,
    batch: str | None = None,
    height: str | None = None,
    width: str | None = None,
    static: bool = False,
) -> ShapeRanges:
    """The exported ranges of `spec` narrowed by the flags; refuses values outside them."""
    try:
        ranges = shapes.narrow(spec.shape_ranges, batch, height, width)
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
    profile = shapes.profile_shapes(inputs, ranges, vae_scale_factor)
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
            if len(shape) != len(lo) or any(
                s < a or s > b for s, a, b in zip(shape, lo, hi, strict=True)
            ):
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


def format_profile(profile: Mapping[str, Mapping[str, list[int]]]) -> str:
    """'sample 1x4x4x4..8x4x16x16, timestep 1..8' for messages and logs."""

    def dims(shape: list[int]) -> str:
        return "x".join(str(d) for d in shape) or "scalar"

    return ", ".join(
        f"{name} {dims(list(s['min']))}..{dims(list(s['max']))}" for name, s in profile.items()
    )
