"""Euler (Karras et al. 2022, algorithm 2 without churn), as diffusers' EulerDiscreteScheduler.

k-diffusion samplers work on x / alpha_t, whose noise level is sigma = sqrt((1 - alpha_bar) /
alpha_bar); the UNet still wants the variance-preserving input, hence scale_model_input.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .base import Scheduler, predict_x0_eps, spaced_timesteps, ve_to_vp


class EulerDiscreteScheduler(Scheduler):
    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        a = self.alphas_cumprod
        self.train_sigmas = ((1 - a) / a) ** 0.5  # sigma of each training timestep
        self.sigmas = np.zeros(1)

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._reset(num_inference_steps)
        self.timesteps = spaced_timesteps(
            self.num_inference_steps,
            self.num_train_timesteps,
            self.timestep_spacing,
            self.steps_offset,
        )
        # "linspace" timesteps are fractional: interpolate sigma between training steps.
        steps = np.arange(self.num_train_timesteps)
        sigmas = np.interp(self.timesteps, steps, self.train_sigmas)
        self.sigmas = np.append(sigmas, 0.0)
        # diffusers scales the initial noise by sqrt(sigma_max^2 + 1) for "leading" spacing
        # (whose first timestep is not the noisiest), by sigma_max otherwise.
        sigma_max = float(self.sigmas.max())
        if self.timestep_spacing == "leading":
            self.init_noise_sigma = (sigma_max**2 + 1) ** 0.5
        else:
            self.init_noise_sigma = sigma_max

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        sigma = self.sigmas[self._current_index(timestep)]
        return (np.asarray(sample, np.float64) / (sigma**2 + 1) ** 0.5).astype(sample.dtype)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        sigma = self.sigmas[self._noise_index(timestep)]
        return (np.asarray(original, np.float64) + sigma * noise).astype(original.dtype)

    def _denoised(self, model_output: np.ndarray, x: np.ndarray, sigma: float) -> np.ndarray:
        """The x0 prediction, from the model output at the k-diffusion sample x."""
        alpha, sigma_vp = ve_to_vp(sigma)
        out = np.asarray(model_output, np.float64)
        return predict_x0_eps(out, alpha * x, alpha, sigma_vp, self.prediction_type)[0]

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        generator: np.random.Generator | None = None,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        i = self._current_index(timestep)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = np.asarray(sample, np.float64)
        derivative = (x - self._denoised(model_output, x, sigma)) / sigma  # dx / dsigma
        self._step_index = i + 1
        return (x + derivative * (sigma_next - sigma)).astype(sample.dtype)
