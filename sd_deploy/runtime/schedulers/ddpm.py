"""DDPM ancestral sampling (Ho et al. 2020), as diffusers' DDPMScheduler with its default
"fixed_small" variance: sample the posterior q(x_prev | x_t, x0) around the predicted x0.

Made for ~1000 steps; with few steps it is noisy, but it is the reference the others approximate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .base import Scheduler, predict_x0_eps, spaced_timesteps


class DDPMScheduler(Scheduler):
    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self.clip_sample = bool(self.config["clip_sample"])
        self.clip_sample_range = float(self.config["clip_sample_range"])

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._reset(num_inference_steps)
        ts = spaced_timesteps(
            self.num_inference_steps,
            self.num_train_timesteps,
            self.timestep_spacing,
            self.steps_offset,
        )
        self.timesteps = np.round(ts).astype(np.int64)

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        generator: np.random.Generator | None = None,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        t = int(timestep)
        i = self._index_for(t)
        prev_t = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else 1.0
        beta = 1 - a_t / a_prev  # the beta of the whole stride t -> prev_t
        x = np.asarray(sample, np.float64)
        out = np.asarray(model_output, np.float64)
        x0, _ = predict_x0_eps(out, x, a_t**0.5, (1 - a_t) ** 0.5, self.prediction_type)
        if self.clip_sample:
            x0 = np.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        # posterior mean and variance, eqs. 6-7 of the paper
        mean = (a_prev**0.5 * beta / (1 - a_t)) * x0 + (
            (1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)
        ) * x
        if t > 0:
            variance = max((1 - a_prev) / (1 - a_t) * beta, 1e-20)
            mean = mean + variance**0.5 * self._noise(x.shape, generator, noise)
        return mean.astype(sample.dtype)
