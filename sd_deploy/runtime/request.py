"""The plain types a generation call takes and returns: what every wrapper maps.

A C ABI, a Triton model and an HTTP server all turn their own request format into a
`GenerationRequest` (plain str/int/float fields and one optional uint8 array), and a
`GenerationResult` back into theirs. `Pipeline.validate` turns a request into a
`ResolvedRequest`: every default filled from the engine dir, every impossible value
refused, before any work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from sd_deploy.runtime.infotext import format_infotext, generation_fields

# What BackendOptions.precision takes (only OpenVINO computes in other than the graphs' own).
PRECISIONS = ("auto", "fp32", "bf16", "int8")

# (step index, 0-based; number of steps) -> return False to cancel the generation.
ProgressCallback = Callable[[int, int], "bool | None"]


@dataclass(frozen=True)
class BackendOptions:
    """How the chosen backend runs the graphs.

    threads: CPU threads for ONNX Runtime / OpenVINO (None: the library's default, one
        per physical core).
    graph_cache: keep ONNX Runtime's optimized CPU graphs in the engine dir, so later
        loads skip re-optimizing (~6 s for the SD 1.5 UNet).
    cuda_graph: TensorRT records the UNet's steps as a CUDA graph and replays them.
    precision: OpenVINO's compute precision, auto (bf16 where the CPU has AMX or
        AVX512-BF16, else fp32; sd-quantize's int8-weight graphs where present), fp32,
        bf16 or int8 (those graphs required); the other backends run the graphs' own.
    """

    threads: int | None = None
    graph_cache: bool = True
    cuda_graph: bool = False
    precision: str = "auto"


@dataclass
class GenerationRequest:
    """One call's worth of work. None means "the engine dir's default".

    Image i of a request uses seed + i, drawn from its own generator, so any image can be
    made again alone. A seed of None or below 0 (A1111's -1) means a random one, which the
    result's parameters report. `init_image` (HxWx3 uint8 RGB) turns txt2img into img2img,
    `strength` in (0, 1] saying how much of it is repainted. Prompts follow A1111's syntax:
    `(word:1.3)` emphasis and `BREAK` unless `emphasis` is False, any length (in chunks of 75
    tokens, up to the engine dir's context length). `clip_skip` is A1111's Clip skip (None:
    1, the last layer; SD 2.x has a fixed layer and ignores it)."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None
    seed: int | None = None
    batch: int = 1
    init_image: np.ndarray | None = None
    strength: float = 0.8
    clip_skip: int | None = None
    emphasis: bool = True
    # LoRAs applied at run time (engine dirs exported with --lora-ready): each a
    # "FILE[:SCALE]" string or a (file, scale) pair; `<lora:name:scale>` in the prompt too.
    loras: Sequence[Any] = ()
    # SDXL size conditioning (time_ids), (height, width) pixels, as diffusers'
    # original_size / crops_coords_top_left / target_size: None = the image size, crop (0, 0).
    # Other families ignore them.
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None


@dataclass(frozen=True)
class ResolvedRequest:
    """A request with every default filled and every value checked against the engine dir."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    sampler: str
    seed: int
    batch: int
    init_image: np.ndarray | None = field(default=None, compare=False, repr=False)
    strength: float | None = None  # None for txt2img
    clip_skip: int = 1
    emphasis: bool = True
    # (file, scale) of each run-time LoRA, prompt tags included (the prompt keeps no tags)
    loras: tuple[tuple[str, float], ...] = ()
    # SDXL: the UNet's time_ids row (original h, w, crop top, left, target h, w); () otherwise.
    time_ids: tuple[float, ...] = ()

    @property
    def guided(self) -> bool:
        """Classifier-free guidance runs (guidance 1 is the conditional prediction alone)."""
        return self.guidance > 1.0

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can run as one batched generation: same size, steps,
        sampler, guidance, img2img strength and prompt reading (clip skip, emphasis); prompts,
        seeds and init images may differ."""
        return (
            self.width,
            self.height,
            self.steps,
            self.sampler,
            self.guidance,
            self.strength,
            self.clip_skip,
            self.emphasis,
            self.loras,
        )


@dataclass(frozen=True)
class ImageParameters:
    """What one image was made with: enough to make it again."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    sampler: str
    guidance: float
    width: int
    height: int
    strength: float | None
    model: str
    backend: str
    # What the graphs computed in (fp32, fp16, bf16); "" where unknown.
    precision: str = ""
    clip_skip: int = 1
    emphasis: bool = True
    # A1111's Model and Model hash: the checkpoint's file name without extension and the
    # first 10 hex digits of its sha256 (None when the engine dir does not record them).
    model_name: str | None = None
    model_hash: str | None = None
    # LoRAs in effect (merged at export or applied at run time): (name, scale, short hash);
    # the infotext shows them as A1111 does, `<lora:name:scale>` in the prompt + Lora hashes.
    loras: tuple[tuple[str, float, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def infotext(self) -> str:
        """The "parameters" text exactly as AUTOMATIC1111 v1.6.0 writes it into PNGs
        (sd_deploy.runtime.infotext); `sd-run --from-png` reads it back."""
        fields = generation_fields(
            steps=self.steps,
            sampler=self.sampler,
            guidance=self.guidance,
            seed=self.seed,
            width=self.width,
            height=self.height,
            model=self.model_name,
            strength=self.strength,
            clip_skip=self.clip_skip,
            emphasis=self.emphasis,
            lora_hashes={name: short for name, _, short in self.loras if short},
        )
        fields["Model hash"] = self.model_hash
        prompt = self.prompt
        for name, scale, _ in self.loras:
            prompt += f" <lora:{name}:{scale:g}>"
        return format_infotext(prompt.strip(), self.negative_prompt, fields)


@dataclass
class GenerationResult:
    """Images [B, H, W, 3] uint8, one ImageParameters per image, and seconds spent:
    per component inside backend calls, `load`, `total`, and `outside_backend` (the
    runtime's own work: tokenizer, sampler math, noise, casts)."""

    images: np.ndarray
    parameters: list[ImageParameters]
    timings: dict[str, float] = field(default_factory=dict)

    def pil_images(self) -> list[Image.Image]:
        return [Image.fromarray(image) for image in self.images]
