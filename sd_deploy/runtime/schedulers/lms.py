"""Linear multistep (k-diffusion's sample_lms, order 4), as diffusers' LMSDiscreteScheduler.

The step integrates the Lagrange polynomial through the last (up to) four derivatives
dx/dsigma over [sigma_i, sigma_i+1]. diffusers integrates numerically with scipy; the
integrand is a polynomial, so here it is integrated exactly (numpy only).
"""

from __future__ import annotations

import numpy as np
from numpy.polynomial import Polynomial

from .euler import EulerDiscreteScheduler

LMS_ORDER = 4


class LMSDiscreteScheduler(EulerDiscreteScheduler):
    _derivatives: list[np.ndarray]

    def set_timesteps(self, num_inference_steps: int) -> None:
        super().set_timesteps(num_inference_steps)
        self._derivatives = []

    def _coefficient(self, i: int, order: int, j: int) -> float:
        """Integral over [sigma_i, sigma_i+1] of the Lagrange basis polynomial of node
        sigma_(i-j), with nodes sigma_i, ..., sigma_(i-order+1)."""
        nodes = self.sigmas[i - np.arange(order)]
        basis = Polynomial([1.0])
        for k, node in enumerate(nodes):
            if k != j:
                basis = basis * Polynomial([-node, 1.0]) / (nodes[j] - node)
        antiderivative = basis.integ()
        return float(antiderivative(self.sigmas[i + 1]) - antiderivative(self.sigmas[i]))

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        generator: np.random.Generator | None = None,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        i = self._current_index(timestep)
        sigma = self.sigmas[i]
        x = np.asarray(sample, np.float64)
        self._derivatives = [
            *self._derivatives[-(LMS_ORDER - 1) :],
            (x - self._denoised(model_output, x, sigma)) / sigma,
        ]
        # The order grows with the history actually held. diffusers uses min(i + 1, 4),
        # which is the same when starting at step 0 but, after set_begin_index (img2img),
        # pairs higher-order coefficients with a history that is not there yet.
        order = len(self._derivatives)
        prev = x
        for j, derivative in enumerate(reversed(self._derivatives)):
            prev = prev + self._coefficient(i, order, j) * derivative
        self._step_index = i + 1
        return prev.astype(sample.dtype)
