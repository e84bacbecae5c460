"""DPM-Solver++(2M) (Lu et al. 2022), as diffusers' DPMSolverMultistepScheduler with its
defaults: data prediction, second order from the previous step's x0, midpoint form, first
order on the first step and on the last (which lands on sigma 0).

With use_karras_sigmas the noise levels follow Karras et al.'s rho = 7 ramp ("DPM++ 2M Karras").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .base import Scheduler, predict_x0_eps, spaced_timesteps, ve_to_vp


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """n noise levels from sigma_max to sigma_min, dense near sigma_min (Karras et al. eq. 5)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, interpolating linearly in log sigma."""
    log_sigmas = np.log(train_sigmas)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return low + w


class DPMSolverMultistepScheduler(Scheduler):
    def __init__(
        self, config: Mapping[str, Any] | None = None, *, use_karras_sigmas: bool = False
    ) -> None:
        super().__init__(config)
        self.use_karras_sigmas = use_karras_sigmas
        a = self.alphas_cumprod
        self.train_sigmas = ((1 - a) / a) ** 0.5
        self.sigmas = np.zeros(1)
        self._prev_x0: np.ndarray | None = None  # data prediction of the previous step

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._reset(num_inference_steps)
        n = self.num_inference_steps
        if self.use_karras_sigmas:
            sigmas = karras_sigmas(float(self.train_sigmas[0]), float(self.train_sigmas[-1]), n)
            ts = sigma_to_t(sigmas, self.train_sigmas)
            # diffusers rounds these, except for the cosine schedule, which it truncates.
            if self.config["beta_schedule"] != "squaredcos_cap_v2":
                ts = np.round(ts)
            self.timesteps = ts.astype(np.int64)
        else:
            ts = spaced_timesteps(
                n,
                self.num_train_timesteps,
                self.timestep_spacing,
                self.steps_offset,
                skip_zero=True,
            )
            self.timesteps = np.round(ts).astype(np.int64)
            sigmas = np.interp(
                self.timesteps, np.arange(self.num_train_timesteps), self.train_sigmas
            )
        self.sigmas = np.append(sigmas, 0.0)
        self._prev_x0 = None

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        generator: np.random.Generator | None = None,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        i = self._current_index(timestep)
        s0, t = self.sigmas[i], self.sigmas[i + 1]  # k-diffusion sigmas, from and to
        (alpha_s0, sigma_s0), (alpha_t, sigma_t) = ve_to_vp(s0), ve_to_vp(t)
        x = np.asarray(sample, np.float64)
        out = np.asarray(model_output, np.float64)
        x0 = predict_x0_eps(out, x, alpha_s0, sigma_s0, self.prediction_type)[0]
        # In log-SNR lambda = -log(sigma), step size h = lambda_t - lambda_s0; exp(-h) = t / s0.
        # The last step (t = 0, h = inf) and a step without history are first order.
        if self._prev_x0 is None or i == len(self.timesteps) - 1:
            d = x0
        else:
            h = np.log(s0 / t)
            r = np.log(self.sigmas[i - 1] / s0) / h  # h_(i-1) / h
            d = x0 + 0.5 * (x0 - self._prev_x0) / r
        prev = (sigma_t / sigma_s0) * x + alpha_t * (1 - t / s0) * d
        self._prev_x0 = x0
        self._step_index = i + 1
        return prev.astype(sample.dtype)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        alpha, sigma = ve_to_vp(self.sigmas[self._noise_index(timestep)])
        return (alpha * np.asarray(original, np.float64) + sigma * noise).astype(original.dtype)
