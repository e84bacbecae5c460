"""DDIM (Song et al. 2020, "Denoising Diffusion Implicit Models"), as diffusers' DDIMScheduler.

eta = 0 is the deterministic sampler SD was released with; eta = 1 is DDPM-like ancestral noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .base import Scheduler, predict_x0_eps, spaced_timesteps


class DDIMScheduler(Scheduler):
    def __init__(self, config: Mapping[str, Any] | None = None, *, eta: float = 0.0) -> None:
        super().__init__(config)
        self.eta = float(eta)
        self.clip_sample = bool(self.config["clip_sample"])
        self.clip_sample_range = float(self.config["clip_sample_range"])
        # alpha_bar "before" t = 0: 1 (a clean image) or, as SD's config says, alpha_bar_0.
        self.final_alpha_cumprod = (
            1.0 if self.config["set_alpha_to_one"] else float(self.alphas_cumprod[0])
        )
        self._stride = 1

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._reset(num_inference_steps)
        ts = spaced_timesteps(
            self.num_inference_steps,
            self.num_train_timesteps,
            self.timestep_spacing,
            self.steps_offset,
        )
        self.timesteps = np.round(ts).astype(np.int64)
        self._stride = self.num_train_timesteps // self.num_inference_steps

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        generator: np.random.Generator | None = None,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        t = int(timestep)
        # diffusers steps back a fixed T // n whatever the spacing, so with "trailing" or
        # "linspace" the target is not always the next entry of `timesteps`; kept for parity.
        prev_t = t - self._stride
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        x = np.asarray(sample, np.float64)
        out = np.asarray(model_output, np.float64)
        x0, eps = predict_x0_eps(out, x, a_t**0.5, (1 - a_t) ** 0.5, self.prediction_type)
        if self.clip_sample:
            x0 = np.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        # eq. 12 of the paper with sigma_t = eta * sqrt(posterior variance)
        std = self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if self.eta > 0:
            prev = prev + std * self._noise(x.shape, generator, noise)
        return prev.astype(sample.dtype)
