"""The engine directory contract: manifest.json, read and written in one place.

Everything the runtime needs to turn an engine directory into images is in the
manifest or in files it names, so a C++ service can use an engine dir by reading
this JSON alone. Schema version 1 is documented field by field in docs/engine-dir.md.

Pure Python (json, dataclasses): the exporter writes with it, the runtime and the
TensorRT builder read with it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sd_deploy.engine_dir.atomic import write_atomic
from sd_deploy.engine_dir.layout import MANIFEST_NAME, REQUIRED_COMPONENTS
from sd_deploy.engine_dir.manifest_checks import check_manifest_data
from sd_deploy.errors import EngineDirError

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype name, symbolic shape.

    Shape entries are ints (fixed) or strings naming a dynamic axis, e.g.
    ["batch", 4, "latent_height", "latent_width"].
    """

    name: str
    dtype: str
    shape: list[int | str]


@dataclass(frozen=True)
class ShapeRange:
    """min / opt / max of one image-level dimension (batch, height or width in pixels)."""

    min: int
    opt: int
    max: int

    def contains(self, value: int) -> bool:
        return self.min <= value <= self.max

    def as_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


# Tokens per text-encoder call (BOS + 75 + EOS): the unit of the UNet's context length.
CONTEXT_CHUNK = 77
CONTEXT_CHUNK_RANGE = ShapeRange(CONTEXT_CHUNK, CONTEXT_CHUNK, CONTEXT_CHUNK)
RANGE_NAMES = ("batch", "height", "width", "context_length")


@dataclass(frozen=True)
class ShapeRanges:
    """Image batch and pixel size ranges a component was exported (and is built) for.

    The UNet runs cond and uncond in one call, so its own batch axis spans
    batch.min .. 2 * batch.max; `profile_shapes` in each component spells that out.
    """

    batch: ShapeRange
    height: ShapeRange
    width: ShapeRange
    # Tokens of the UNet's text context (encoder_hidden_states axis 1): 77 per prompt chunk,
    # so multiples of 77. Engine dirs from before long prompts lack it: one chunk.
    context_length: ShapeRange = CONTEXT_CHUNK_RANGE

    def to_json(self) -> dict[str, list[int]]:
        return {k: getattr(self, k).as_list() for k in RANGE_NAMES}

    @staticmethod
    def from_json(data: dict[str, Any]) -> ShapeRanges:
        ranges = {k: ShapeRange(*data[k]) for k in ("batch", "height", "width")}
        if "context_length" in data:
            ranges["context_length"] = ShapeRange(*data["context_length"])
        return ShapeRanges(**ranges)


@dataclass
class ComponentSpec:
    """One exported component: its graph files, I/O, ranges, precision and parity."""

    name: str
    onnx: str  # path of model.onnx relative to the engine dir
    files: list[str]  # every file of the graph (model.onnx and its external data)
    precision: str  # "fp32" or "fp16"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    shape_ranges: ShapeRanges
    # Concrete min/opt/max shapes per input, ready for a TensorRT optimization profile.
    profile_shapes: dict[str, dict[str, list[int]]]
    onnx_sha256: str = ""
    validation: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape_ranges"] = self.shape_ranges.to_json()
        return data

    @staticmethod
    def from_json(name: str, data: dict[str, Any]) -> ComponentSpec:
        return ComponentSpec(
            name=name,
            onnx=data["onnx"],
            files=list(data["files"]),
            precision=data["precision"],
            inputs=[TensorSpec(**t) for t in data["inputs"]],
            outputs=[TensorSpec(**t) for t in data["outputs"]],
            shape_ranges=ShapeRanges.from_json(data["shape_ranges"]),
            profile_shapes=data["profile_shapes"],
            onnx_sha256=data.get("onnx_sha256", ""),
            validation=data.get("validation", {}),
        )


@dataclass
class ModelInfo:
    """What kind of model the engines are: what the sampler loop must know."""

    family: str  # "sd15", "sd21", "sd21-base", "tiny", "shapes", ...
    prediction_type: str  # "epsilon" or "v_prediction"
    latent_channels: int
    vae_scale_factor: int  # pixels per latent pixel along each side (8)
    scaling_factor: float  # latent scale; applied inside the VAE graphs
    text_embed_dim: int
    default_height: int
    default_width: int
    # A1111's Clip skip: the largest value the text_encoder graph's `clip_skip` input takes
    # (1: the graph has no such input). fixed_text_layer: SD 2.x, whose layer is built in
    # (the penultimate), so Clip skip does not apply. Absent from older manifests: 1, False.
    clip_skip_max: int = 1
    fixed_text_layer: bool = False
    # SDXL (absent from other manifests: the defaults, no extra conditioning). The UNet's
    # context is text_encoder's hidden states then text_encoder_2's, concatenated on the last
    # axis (text_embed_dim = both widths). pooled_embed_dim: width of the unet's `text_embeds`
    # input (text_encoder_2's `text_embeds` output of the positive / negative prompt's first
    # chunk). time_ids: what each column of the unet's `time_ids` input holds, in order.
    # zero_negative_for_empty_prompt: an empty negative prompt conditions on zeros (context
    # and pooled), not on the encoded empty string, as SDXL's reference sampling does.
    pooled_embed_dim: int = 0
    time_ids: list[str] = field(default_factory=list)
    zero_negative_for_empty_prompt: bool = False


@dataclass
class TokenizerInfo:
    """Where the CLIP BPE files are and how prompts are padded."""

    path: str  # folder relative to the engine dir holding vocab.json and merges.txt
    max_length: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int  # SD 1.x pads with EOS (49407), SD 2.x with 0


@dataclass
class Manifest:
    """The whole manifest.json of an engine dir (schema_version 1)."""

    model: ModelInfo
    tokenizer: TokenizerInfo
    scheduler: dict[str, Any]  # diffusers-style scheduler config + defaults for sd-run
    components: dict[str, ComponentSpec]
    provenance: dict[str, Any]
    # How tensors enter and leave the graphs (value ranges, scaling), in words and
    # fields, so a C++ caller needs no Python to drive them.
    io_conventions: dict[str, str]
    schema_version: int = SCHEMA_VERSION
    # SDXL's second tokenizer (same CLIP BPE files, OpenCLIP's padding with 0); None otherwise.
    tokenizer_2: TokenizerInfo | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "model": asdict(self.model),
            "tokenizer": asdict(self.tokenizer),
            **({"tokenizer_2": asdict(self.tokenizer_2)} if self.tokenizer_2 else {}),
            "scheduler": self.scheduler,
            "io_conventions": self.io_conventions,
            "provenance": self.provenance,
            "components": {n: c.to_json() for n, c in self.components.items()},
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> Manifest:
        return Manifest(
            schema_version=data["schema_version"],
            model=ModelInfo(**data["model"]),
            tokenizer=TokenizerInfo(**data["tokenizer"]),
            tokenizer_2=TokenizerInfo(**data["tokenizer_2"]) if data.get("tokenizer_2") else None,
            scheduler=dict(data["scheduler"]),
            io_conventions=dict(data.get("io_conventions", {})),
            provenance=dict(data.get("provenance", {})),
            components={n: ComponentSpec.from_json(n, c) for n, c in data["components"].items()},
        )

    def write(self, engine_dir: Path) -> Path:
        path = Path(engine_dir) / MANIFEST_NAME
        write_atomic(path, json.dumps(self.to_json(), indent=2) + "\n")
        return path


def read_manifest(
    engine_dir: str | Path, require: tuple[str, ...] = REQUIRED_COMPONENTS
) -> Manifest:
    """Read and check an engine dir's manifest; every problem is one EngineDirError line."""
    root = Path(engine_dir)
    if not root.exists():
        raise EngineDirError(f"engine dir {root} does not exist (create one with sd-export)")
    if not root.is_dir():
        raise EngineDirError(f"engine dir {root} is not a directory")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise EngineDirError(
            f"{root} has no {MANIFEST_NAME}: not an engine dir, or an export did not finish"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineDirError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict) or "schema_version" not in data:
        raise EngineDirError(f"{path} has no schema_version: not an sd-deploy manifest")
    version = data["schema_version"]
    if version != SCHEMA_VERSION:
        raise EngineDirError(
            f"{path} has schema_version {version!r}; this sd-deploy reads version "
            f"{SCHEMA_VERSION} (re-export with this version's sd-export)"
        )
    check_manifest_data(data, path)
    try:
        manifest = Manifest.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineDirError(f"{path} is malformed: missing or bad field {exc}") from None
    missing = [c for c in require if c not in manifest.components]
    if missing:
        raise EngineDirError(
            f"{root} lacks component(s) {', '.join(missing)} "
            f"(export them with sd-export --component {missing[0]})"
        )
    for comp in manifest.components.values():
        for rel in comp.files:
            if not (root / rel).is_file():
                raise EngineDirError(
                    f"{root} is incomplete: {rel} named by the manifest is missing"
                )
    if manifest.tokenizer_2 is not None and "text_encoder_2" not in manifest.components:
        if "text_encoder" in require:
            raise EngineDirError(
                f"{root} lacks component text_encoder_2, SDXL's second text encoder "
                "(export it with sd-export --component text_encoder_2)"
            )
    for info in (manifest.tokenizer, manifest.tokenizer_2):
        if info is None:
            continue
        tok = root / info.path
        for name in ("vocab.json", "merges.txt"):
            if not (tok / name).is_file():
                raise EngineDirError(f"{root} is incomplete: {info.path}/{name} is missing")
    return manifest
