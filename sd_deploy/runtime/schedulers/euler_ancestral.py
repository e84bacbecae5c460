"""Euler ancestral (k-diffusion's sample_euler_ancestral, eta = 1), as diffusers'
EulerAncestralDiscreteScheduler: an Euler step down to sigma_down, then fresh noise of
sigma_up, so each step re-draws part of the noise. Same sigmas as Euler; stochastic.
"""

from __future__ import annotations

import numpy as np

from .euler import EulerDiscreteScheduler


class EulerAncestralDiscreteScheduler(EulerDiscreteScheduler):
    prediction_types = ("epsilon", "v_prediction")

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
        # split sigma_next^2 = sigma_down^2 + sigma_up^2 so the marginal stays right
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x = np.asarray(sample, np.float64)
        derivative = (x - self._denoised(model_output, x, sigma)) / sigma
        prev = x + derivative * (sigma_down - sigma)
        if sigma_up > 0:  # the last step (to sigma 0) adds none
            prev = prev + sigma_up * self._noise(x.shape, generator, noise)
        self._step_index = i + 1
        return prev.astype(sample.dtype)
