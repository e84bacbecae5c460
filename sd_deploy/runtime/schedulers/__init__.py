"""The samplers sd-run offers: numpy ports of diffusers' schedulers, one file each.

    sched = make_scheduler("euler_a", manifest.scheduler)
    sched.set_timesteps(steps)
    x = rng.standard_normal(shape) * sched.init_noise_sigma
    for t in sched.timesteps:
        out = unet(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x, generator=rng)

Each sampler matches the diffusers scheduler of the same name step for step
(tests/runtime/test_schedulers.py), including diffusers' timestep conventions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sd_deploy.errors import RequestError

from .base import DEFAULT_CONFIG, Scheduler
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpmsolver_multistep import DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .lcm import LCMScheduler
from .lms import LMSDiscreteScheduler
from .pndm import PNDMScheduler
from .unipc import UniPCMultistepScheduler

__all__ = [
    "DEFAULT_CONFIG",
    "SAMPLERS",
    "SAMPLER_NAMES",
    "Sampler",
    "Scheduler",
    "img2img_timesteps",
    "make_scheduler",
]


@dataclass(frozen=True)
class Sampler:
    """A user-facing sampler: its class, the options that define it, and a --help line."""

    cls: type[Scheduler]
    description: str
    options: Mapping[str, Any] = field(default_factory=dict)


# Roughly by age; ddim and plms are what SD 2.x and SD 1.x shipped with.
SAMPLERS: dict[str, Sampler] = {
    "ddim": Sampler(DDIMScheduler, "DDIM, deterministic (eta 0); good at 20-50 steps"),
    "plms": Sampler(PNDMScheduler, "PLMS (PNDM without Runge-Kutta warm-up), SD 1.x's default"),
    "ddpm": Sampler(DDPMScheduler, "DDPM ancestral sampling, stochastic; needs hundreds of steps"),
    "euler": Sampler(EulerDiscreteScheduler, "Euler (k-diffusion), deterministic; 20-30 steps"),
    "euler_a": Sampler(
        EulerAncestralDiscreteScheduler, "Euler ancestral, stochastic; varied, 20-30 steps"
    ),
    "lms": Sampler(LMSDiscreteScheduler, "linear multistep (order 4, k-diffusion), deterministic"),
    "dpmpp_2m": Sampler(
        DPMSolverMultistepScheduler, "DPM-Solver++ 2M, deterministic; good at 15-25 steps"
    ),
    "dpmpp_2m_karras": Sampler(
        DPMSolverMultistepScheduler,
        "DPM-Solver++ 2M with Karras sigmas; sharp at 15-25 steps",
        {"use_karras_sigmas": True},
    ),
    "unipc": Sampler(
        UniPCMultistepScheduler, "UniPC (order 2), deterministic; good at 10-20 steps"
    ),
    "lcm": Sampler(
        LCMScheduler, "latent consistency, stochastic; LCM-distilled UNets only, 2-8 steps"
    ),
}
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)


def make_scheduler(name: str, config: Mapping[str, Any] | None = None) -> Scheduler:
    """The sampler `name`, for a diffusers-style scheduler config (unknown keys are ignored)."""
    sampler = SAMPLERS.get(name)
    if sampler is None:
        raise RequestError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLER_NAMES)}")
    return sampler.cls(config, **sampler.options)


def img2img_timesteps(
    sched: Scheduler, num_inference_steps: int, strength: float
) -> tuple[np.ndarray, int]:
    """Set `sched` up for img2img and return (the timesteps to run, their start index).

    As diffusers' StableDiffusionImg2ImgPipeline.get_timesteps: strength 1 runs every step
    from pure noise, strength s the last int(steps * s) of them. This calls set_timesteps and
    set_begin_index; noise the encoded image with sched.add_noise(latents, noise, timesteps[0]).
    """
    if not 0.0 < strength <= 1.0:
        raise RequestError(f"strength must be in (0, 1], got {strength}")
    sched.set_timesteps(num_inference_steps)
    init_steps = min(int(num_inference_steps * strength), num_inference_steps)
    start = max(num_inference_steps - init_steps, 0) * sched.order
    if start >= len(sched.timesteps):
        raise RequestError(
            f"strength {strength} with {num_inference_steps} steps leaves no step to run "
            "(raise the strength or the number of steps)"
        )
    sched.set_begin_index(start)
    return sched.timesteps[start:], start
