"""Latent Consistency Model sampling (Luo et al. 2023), as diffusers' LCMScheduler.

Only for LCM-distilled UNets (or an LCM-LoRA merged in): each step jumps to the consistency
function's x0 estimate and re-noises it to the next timestep. Timesteps come from the
distillation schedule (original_inference_steps points), so timestep_spacing and
steps_offset do not apply; 1-8 steps are typical.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from sd_deploy.errors import RequestError

from .base import Scheduler, predict_x0_eps

SIGMA_DATA = 0.5  # of the consistency-model boundary condition


class LCMScheduler(Scheduler):
    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self.original_inference_steps = int(self.config.get("original_inference_steps", 50))
        self.timestep_scaling = float(self.config.get("timestep_scaling", 10.0))
        self.clip_sample = bool(self.config["clip_sample"])
        self.clip_sample_range = float(self.config["clip_sample_range"])

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._reset(num_inference_steps)
        n, orig = self.num_inference_steps, self.original_inference_steps
        if n > orig:
            raise RequestError(f"LCM takes at most {orig} steps (its distillation schedule)")
        # the distillation schedule, descending, then n of its points evenly by index
        origin = (np.arange(orig, 0, -1) * (self.num_train_timesteps // orig) - 1).astype(np.int64)
        self.timesteps = origin[np.floor(np.linspace(0, orig, n, endpoint=False)).astype(np.int64)]

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        generator: np.random.Generator | None = None,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        i = self._current_index(timestep)
        t = int(timestep)
        last = i == self.num_inference_steps - 1
        a_t = float(self.alphas_cumprod[t])
        x = np.asarray(sample, np.float64)
        out = np.asarray(model_output, np.float64)
        x0, _ = predict_x0_eps(out, x, a_t**0.5, (1 - a_t) ** 0.5, self.prediction_type)
        if self.clip_sample:
            x0 = np.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        # c_skip and c_out make the consistency function the identity at t = 0
        scaled = t * self.timestep_scaling
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
        denoised = c_out * x0 + c_skip * x
        self._step_index = i + 1
        if last:
            return denoised.astype(sample.dtype)
        a_prev = float(self.alphas_cumprod[self.timesteps[i + 1]])
        prev = a_prev**0.5 * denoised + (1 - a_prev) ** 0.5 * self._noise(x.shape, generator, noise)
        return prev.astype(sample.dtype)
