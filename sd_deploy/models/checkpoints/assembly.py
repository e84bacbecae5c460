"""Building the modules: allocate nothing until every key is accounted for, then fill.

Modules are created on the meta device, each of their tensors is paired with a `Source` (a
file key, its shape, how to read it), missing/unexpected/mis-shaped keys are reported in one
line, and only then is each module allocated once (fp32, uninitialised) and filled tensor by
tensor, casting fp16/bf16 as it goes. Loading a full-size fp16 SD 1.5 file peaks at about
1.15x the fp32 model size (tools/measure_load_memory.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sd_deploy.errors import CheckpointError
from sd_deploy.models.checkpoints.messages import first_keys, one_line
from sd_deploy.models.checkpoints.readers import Reader
from sd_deploy.models.loaded import build_modules
from sd_deploy.models.presets import ModelConfig


@dataclass
class Source:
    """Where one module tensor comes from: a file key, its shape there, how to read it."""

    key: str  # the file key named in messages
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


def plain(reader: Reader, key: str) -> Source:
    """A file tensor as it is."""
    return Source(key, reader.shapes[key], lambda: reader.get(key))


def sliced(reader: Reader, key: str, index: int, parts: int) -> Source | None:
    """One of `parts` equal slices along dim 0 (a third of OpenCLIP's in_proj), or None."""
    shape = reader.shapes[key]
    if not shape or shape[0] % parts:
        return None
    n = shape[0] // parts

    def load() -> torch.Tensor:
        return reader.get(key)[index * n : (index + 1) * n]

    return Source(key, (n, *shape[1:]), load)


def as_conv1x1(source: Source, expected: tuple[int, ...]) -> Source:
    """Linear [O,I] weights stored for a 1x1 conv [O,I,1,1] (VAE attention)."""
    if len(expected) == 4 and len(source.shape) == 2 and expected == (*source.shape, 1, 1):
        load = source.load
        return Source(source.key, expected, lambda: load().reshape(expected))
    return source


@dataclass
class Component:
    """One module to build: its meta-device instance and where each tensor comes from."""

    name: str
    module: nn.Module
    sources: dict[str, Source] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # file keys looked for, not found
    unexpected: list[str] = field(default_factory=list)
    wrong_shapes: list[str] = field(default_factory=list)


def meta_modules(config: ModelConfig) -> dict[str, nn.Module]:
    """The modules (three, four for SDXL) on the meta device: their keys and shapes, no memory.

    The config may come from a file (safetensors metadata, diffusers config.json): sizes are
    bounded first (a million layers would take hours to build, even on the meta device), and
    a size combination the modules refuse is a CheckpointError, not a torch traceback."""
    check_sizes(config)
    try:
        with torch.device("meta"):
            return build_modules(config)
    except MemoryError:
        raise
    except Exception as e:  # torch / transformers refusing the sizes (negative, indivisible)
        raise CheckpointError(
            f"the architecture the file describes cannot be built: {one_line(e)}"
        ) from e


MAX_SIZE = 1 << 17  # any channel count, width, vocabulary or position count
MAX_COUNT = 64  # levels, blocks per level, layers, heads
MAX_BLOCKS = 1024  # UNet levels x res blocks x transformer depth
_COUNTS = ("channel_mult", "ch_mult", "num_res_blocks", "transformer_depth", "num_hidden_layers",
           "num_heads", "num_attention_heads", "attention_resolutions")  # fmt: skip


def check_sizes(config: ModelConfig) -> None:
    """Refuse absurd sizes in a config read from a file, before any module is built."""
    parts: dict[str, Any] = {
        "unet": config.unet,
        "vae": config.vae,
        "text_encoder": config.text_encoder,
    }
    if getattr(config, "text_encoder_2", None) is not None:
        parts["text_encoder_2"] = config.text_encoder_2
    for part, cfg in parts.items():
        for f in fields(cfg):
            value = getattr(cfg, f.name)
            values = value if isinstance(value, tuple | list) else (value,)
            hi = MAX_COUNT if f.name in _COUNTS else MAX_SIZE
            bad = len(values) > MAX_COUNT or any(
                (isinstance(v, int) and not isinstance(v, bool) and not -1 <= v <= hi)
                or (isinstance(v, float) and not math.isfinite(v))
                for v in values
            )
            if bad:
                raise CheckpointError(
                    f"the file's {part} config has {f.name}={_shown(value)}: not a size this "
                    f"loader builds (at most {hi})"
                )
    unet = config.unet
    depth = unet.transformer_depth
    deepest = max(depth) if isinstance(depth, tuple | list) and depth else depth
    blocks = len(unet.channel_mult) * unet.num_res_blocks * max(deepest, 1)
    if not isinstance(blocks, int) or blocks > MAX_BLOCKS:
        raise CheckpointError(
            f"the file's unet config has {blocks} blocks (levels x res blocks x transformer "
            f"depth); at most {MAX_BLOCKS} are built"
        )


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """The module's state-dict keys and shapes: what a checkpoint has to provide."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def resolve(
    component: Component,
    lookup: Callable[[str, tuple[int, ...]], Source | str],
) -> None:
    """Fill a component's sources; `lookup` gives a source or the file key it looked for."""
    for key, shape in expected_shapes(component.module).items():
        if key.endswith("embeddings.position_ids"):
            # A persistent buffer in some transformers versions: always 0..76, never read
            # from files (some merged SD 1.x checkpoints carry damaged float copies).
            component.sources[key] = Source(key, shape, partial(_positions, shape))
            continue
        found = lookup(key, shape)
        if isinstance(found, str):
            component.missing.append(found)
            continue
        if found.shape != shape:
            component.wrong_shapes.append(
                f"{found.key} is {list(found.shape)}, expected {list(shape)}"
            )
        component.sources[key] = found


def _positions(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.arange(shape[-1]).expand(shape)


def _check(components: list[Component], path: Path, config: ModelConfig, how: str) -> None:
    """One line naming the file and the first few missing, unexpected and mis-shaped keys."""
    problems = []
    for kind, label in (
        ("missing", "missing key"),
        ("unexpected", "unexpected key"),
        ("wrong_shapes", "wrong shape"),
    ):
        items = [item for c in components for item in getattr(c, kind)]
        if items:
            problems.append(f"{len(items)} {label}{'s' * (len(items) > 1)} ({first_keys(items)})")
    if problems:
        raise CheckpointError(
            f"{path} does not match the {config.family} architecture ({how}): "
            + "; ".join(problems)
        )


def _reset_nonpersistent_buffers(module: nn.Module) -> None:
    persistent = set(module.state_dict())
    for name, buffer in module.named_buffers():
        if name in persistent:
            continue
        if name.endswith("position_ids"):  # transformers' CLIP: arange over positions
            buffer.copy_(_positions(tuple(buffer.shape)))
        else:  # pragma: no cover - a new module type needs handling here
            raise RuntimeError(f"cannot initialise non-persistent buffer {name}")


def _materialize(component: Component, path: Path) -> nn.Module:
    """Allocate the module (fp32, uninitialised) and copy each tensor in, casting as needed."""
    module = component.module.to_empty(device="cpu")
    with torch.no_grad():
        _reset_nonpersistent_buffers(module)
        for key, target in module.state_dict(keep_vars=True).items():
            source = component.sources[key]
            tensor = source.load()
            if target.is_floating_point() and not tensor.is_floating_point():
                raise CheckpointError(
                    f"{path}: tensor {source.key} has dtype {tensor.dtype}, expected floats"
                )
            target.copy_(tensor)
            del tensor
    return module


def build(
    config: ModelConfig,
    components: list[Component],
    path: Path,
    how: str,
    materialize: Collection[str] | None = None,
) -> dict[str, Any]:
    """Check every component's plan, then materialise the modules one at a time, by name.

    materialize: the modules to fill (None: all); the others stay on the meta device (their
    architecture without memory: what exporting one graph of a large model needs)."""
    _check(components, path, config, how)
    built = {}
    for component in components:
        if materialize is None or component.name in materialize:
            built[component.name] = _materialize(component, path)
        else:
            built[component.name] = component.module
        component.sources.clear()
    return built
