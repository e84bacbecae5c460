"""diffusers' StableDiffusionPipeline on the same weights: the baseline users already run.

Our ldm-layout state dicts go through diffusers' own single-file conversion
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, configs from
`create_*_diffusers_config_from_ldm`) into `UNet2DConditionModel` / `AutoencoderKL`,
constructed on the meta device and loaded with `assign=True`, so on the CPU they share the
reference's weight tensors instead of copying them. The text encoder is our
`CLIPTextModel` itself. The pipeline is fed `prompt_embeds` / `negative_prompt_embeds`
from it and `latents=` the benchmark's initial noise, with the diffusers scheduler of the
same sampler built from the manifest's scheduler config, so its images are comparable
with everyone else's (deterministic samplers only: a stochastic one draws its step noise
from torch's generator, which nothing else shares).

Two uses: `DiffusersBackend` runs the diffusers modules behind the runtime's Backend
interface (per-component parity and latency on the same inputs as every backend), and
`DiffusersPipelineRunner` runs `StableDiffusionPipeline.__call__` end to end with hooks
timing each UNet and VAE call.

diffusers is optional: `diffusers_unavailable()` says why it cannot run.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sd_deploy.benchmarks.timing import CallLog, cuda_synchronize
from sd_deploy.benchmarks.torch_backend import TorchSession
from sd_deploy.engine_dir.manifest import ComponentSpec
from sd_deploy.models import LoadedModels, ModelConfig
from sd_deploy.runtime.backends.base import Backend, ComponentSession

# our sampler name -> (diffusers scheduler module, class, options that make it that sampler).
# Imported from the modules: without scipy, diffusers' top level exports a placeholder
# LMSDiscreteScheduler.
DIFFUSERS_SCHEDULERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "ddim": ("scheduling_ddim", "DDIMScheduler", {}),
    "plms": ("scheduling_pndm", "PNDMScheduler", {"skip_prk_steps": True}),
    "ddpm": ("scheduling_ddpm", "DDPMScheduler", {}),
    "euler": ("scheduling_euler_discrete", "EulerDiscreteScheduler", {}),
    "euler_a": ("scheduling_euler_ancestral_discrete", "EulerAncestralDiscreteScheduler", {}),
    "lms": ("scheduling_lms_discrete", "LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("scheduling_dpmsolver_multistep", "DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": (
        "scheduling_dpmsolver_multistep",
        "DPMSolverMultistepScheduler",
        {"use_karras_sigmas": True},
    ),
    "unipc": ("scheduling_unipc_multistep", "UniPCMultistepScheduler", {}),
    "lcm": ("scheduling_lcm", "LCMScheduler", {}),
}
# Samplers that add fresh noise each step: diffusers draws it from torch, we from numpy.
STOCHASTIC_SAMPLERS = frozenset({"euler_a", "ddpm", "lcm"})


def diffusers_unavailable() -> str | None:
    """Why the diffusers baseline cannot run here, or None when it can."""
    if importlib.util.find_spec("diffusers") is None:
        return "diffusers not installed (pip install diffusers)"
    return None


def import_diffusers_pipeline() -> None:
    """Import diffusers' SD pipeline and converters now, without transformers' import chatter.

    transformers warns on import that torchvision is missing (for image processors the
    benchmark never uses); its verbosity is lowered for the import and restored after.
    """
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        importlib.import_module("diffusers.loaders.single_file_utils")
        importlib.import_module("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")
    finally:
        hf_logging.set_verbosity(level)


def diffusers_version() -> str:
    import diffusers

    return str(diffusers.__version__)


def ldm_original_config(config: ModelConfig) -> dict[str, Any]:
    """The parts of an ldm yaml (v1-inference.yaml style) diffusers' converters read."""
    u, v = config.unet, config.vae
    unet_params: dict[str, Any] = {
        "in_channels": u.in_channels,
        "out_channels": u.out_channels,
        "model_channels": u.model_channels,
        "channel_mult": list(u.channel_mult),
        "num_res_blocks": u.num_res_blocks,
        "attention_resolutions": list(u.attention_resolutions),
        "context_dim": u.context_dim,
        "transformer_depth": u.transformer_depth,
        "use_linear_in_transformer": u.use_linear_in_transformer,
    }
    if u.num_head_channels == -1:
        unet_params["num_heads"] = u.num_heads
    else:
        unet_params["num_head_channels"] = u.num_head_channels
    ddconfig = {
        "in_channels": v.in_channels,
        "out_ch": v.out_channels,
        "ch": v.ch,
        "ch_mult": list(v.ch_mult),
        "num_res_blocks": v.num_res_blocks,
        "z_channels": v.z_channels,
    }
    return {
        "model": {
            "params": {
                "scale_factor": v.scaling_factor,
                "unet_config": {"params": unet_params},
                "first_stage_config": {"params": {"embed_dim": v.embed_dim, "ddconfig": ddconfig}},
            }
        }
    }


def diffusers_configs(
    config: ModelConfig, checkpoint: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """diffusers' UNet2DConditionModel / AutoencoderKL configs for `config`, made by diffusers'
    own single-file code from the ldm config (and the checkpoint's shapes, where given)."""
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )

    original = ldm_original_config(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet_config = create_unet_diffusers_config_from_ldm(original, checkpoint)
        vae_config = create_vae_diffusers_config_from_ldm(original, checkpoint)
    unet_config["upcast_attention"] = config.unet.upcast_attention  # no effect in fp32
    return unet_config, vae_config


def convert_to_diffusers(models: LoadedModels) -> tuple[Any, Any]:
    """(UNet2DConditionModel, AutoencoderKL) holding `models`' weights, via diffusers' converters.

    The modules share the reference's tensors (meta construction + assign): no second copy.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    checkpoint = {"model.diffusion_model." + k: v for k, v in models.unet.state_dict().items()}
    checkpoint.update({"first_stage_model." + k: v for k, v in models.vae.state_dict().items()})
    unet_config, vae_config = diffusers_configs(models.config, checkpoint)
    unet: Any
    vae: Any
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
    unet.load_state_dict(
        convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True, assign=True
    )
    vae.load_state_dict(
        convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True, assign=True
    )
    return unet.eval().requires_grad_(False), vae.eval().requires_grad_(False)


def make_diffusers_scheduler(sampler: str, scheduler_config: Mapping[str, Any]) -> Any:
    """The diffusers scheduler of our sampler `sampler`, from the manifest's scheduler config."""
    module_name, class_name, options = DIFFUSERS_SCHEDULERS[sampler]
    module = importlib.import_module(f"diffusers.schedulers.{module_name}")
    cls = getattr(module, class_name)
    accepted = inspect.signature(cls.__init__).parameters
    config = {k: v for k, v in scheduler_config.items() if k in accepted}
    return cls(**{**config, **options})


class DiffusersBackend(Backend):
    """diffusers' UNet and VAE (and our shared CLIP text model) behind the Backend interface.

    Each session computes what the engine dir's graph of the same name computes (see
    `sd_deploy.exporter.components`), with diffusers' modules.
    """

    name = "diffusers"

    def __init__(
        self, models: LoadedModels, device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        self.models = models
        self.device = torch.device(device)
        self.dtype = dtype
        self.unet, self.vae = convert_to_diffusers(models)
        if self.unet.dtype != dtype or self.unet.device != self.device:  # else share, no copy
            self.unet.to(device=self.device, dtype=dtype)
            self.vae.to(device=self.device, dtype=dtype)
        text_model: Any = models.text_encoder.model
        if text_model.dtype != dtype or text_model.device != self.device:
            # Never convert the shared reference module in place.
            text_model = copy.deepcopy(text_model).to(device=self.device, dtype=dtype)
        self.text_model = text_model
        self.scaling_factor = float(self.vae.config.scaling_factor)

    def describe(self) -> str:
        dtype = str(self.dtype).split(".")[-1]
        where = f"PyTorch {torch.__version__}, {self.device.type}, {dtype}"
        return f"diffusers {diffusers_version()} ({where})"

    def encode_text(self, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        # What StableDiffusionPipeline.encode_prompt does with the tokenizer's ids; A1111's
        # Clip skip N is its clip_skip N - 1: hidden state -N through the final layer norm.
        ids = input_ids.long().to(self.device)
        if clip_skip <= 1:
            return self.text_model(ids).last_hidden_state.to(self.dtype)
        hidden = self.text_model(ids, output_hidden_states=True).hidden_states[-clip_skip]
        return self.text_model.text_model.final_layer_norm(hidden).to(self.dtype)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        # What the pipeline does after sampling: vae.decode(latents / scaling_factor), then
        # VaeImageProcessor's denormalize (x / 2 + 0.5).clamp(0, 1).
        image = self.vae.decode(latent / self.scaling_factor, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(images * 2.0 - 1.0).latent_dist
        return dist.mean * self.scaling_factor, dist.std * self.scaling_factor

    def open(self, engine_dir: Path, spec: ComponentSpec) -> ComponentSession:
        forwards: dict[str, Callable[..., tuple[torch.Tensor, ...]]] = {
            # The graph's optional clip_skip input: int32 [1].
            "text_encoder": lambda ids, clip_skip=None: (
                self.encode_text(ids, 1 if clip_skip is None else int(clip_skip.reshape(-1)[0])),
            ),
            "unet": lambda sample, t, context: (
                self.unet(sample, t, encoder_hidden_states=context, return_dict=False)[0],
            ),
            "vae_decoder": lambda latent: (self.decode(latent),),
            "vae_encoder": self.encode,
        }
        return TorchSession(spec, forwards[spec.name], self.device, self.dtype)


class DiffusersPipelineRunner:
    """`StableDiffusionPipeline.__call__` end to end, timing each component call into `log`."""

    def __init__(
        self, backend: DiffusersBackend, sampler: str, scheduler_config: Mapping[str, Any]
    ):
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
            StableDiffusionPipeline,
        )

        self.backend = backend
        self.sampler = sampler
        self.log = CallLog()
        pipeline_class: Any = StableDiffusionPipeline  # its annotations forbid the Nones below
        self.pipe = pipeline_class(
            vae=backend.vae,
            text_encoder=backend.text_model,
            tokenizer=None,
            unet=backend.unet,
            scheduler=make_diffusers_scheduler(sampler, scheduler_config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        self.pipe.set_progress_bar_config(disable=True)
        self._add_timers()

    def _add_timers(self) -> None:
        starts: dict[str, float] = {}

        def pre(module: Any, args: Any) -> None:
            cuda_synchronize()
            starts["unet"] = time.perf_counter()

        def post(module: Any, args: Any, output: Any) -> None:
            cuda_synchronize()
            self.log.add("unet", time.perf_counter() - starts["unet"])

        self.pipe.unet.register_forward_pre_hook(pre)
        self.pipe.unet.register_forward_hook(post)
        decode = self.pipe.vae.decode

        def timed_decode(*args: Any, **kwargs: Any) -> Any:
            cuda_synchronize()
            start = time.perf_counter()
            out = decode(*args, **kwargs)
            cuda_synchronize()
            self.log.add("vae_decoder", time.perf_counter() - start)
            return out

        self.pipe.vae.decode = timed_decode

    def generate(
        self,
        input_ids: np.ndarray,
        initial_noise: np.ndarray,
        steps: int,
        guidance: float,
        height: int,
        width: int,
        seed: int,
        progress: Callable[[], None] | None = None,
    ) -> np.ndarray:
        """uint8 [B,H,W,3] images; `input_ids` are [negatives; prompts] when guided."""
        b = self.backend
        batch = initial_noise.shape[0]
        cuda_synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            embeds = b.encode_text(torch.from_numpy(np.asarray(input_ids)))
        cuda_synchronize()
        self.log.add("text_encoder", time.perf_counter() - start)
        negative = embeds[:batch] if embeds.shape[0] == 2 * batch else None
        positive = embeds[batch:] if negative is not None else embeds
        latents = torch.from_numpy(np.asarray(initial_noise, np.float32)).to(b.device, b.dtype)

        def on_step(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if progress is not None:
                progress()
            return kwargs

        images = self.pipe(
            prompt_embeds=positive,
            negative_prompt_embeds=negative,
            latents=latents,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            generator=torch.Generator(b.device).manual_seed(seed),
            output_type="np",
            return_dict=False,
            callback_on_step_end=on_step,
        )[0]
        return np.rint(np.clip(np.asarray(images, np.float32), 0, 1) * 255.0).astype(np.uint8)
