"""UniPC (Zhao et al. 2023), as diffusers' UniPCMultistepScheduler with its defaults: data
prediction, B(h) = e^h - 1 ("bh2"), order 2, lowering the order over the last steps.

Each step first corrects the previous step's result with the new model output (UniC, no
extra model call), then predicts the next sample from the history (UniP).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .base import Scheduler, predict_x0_eps, spaced_timesteps, ve_to_vp


class UniPCMultistepScheduler(Scheduler):
    def __init__(self, config: Mapping[str, Any] | None = None, *, solver_order: int = 2) -> None:
        super().__init__(config)
        self.solver_order = solver_order
        a = self.alphas_cumprod
        self.train_sigmas = ((1 - a) / a) ** 0.5
        self.sigmas = np.zeros(1)
        self._reset_history()

    def _reset_history(self) -> None:
        self._x0s: list[np.ndarray] = []  # data predictions, newest last
        self._last_sample: np.ndarray | None = None
        self._order = 1  # order of the last prediction, which the corrector matches

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._reset(num_inference_steps)
        ts = spaced_timesteps(
            self.num_inference_steps,
            self.num_train_timesteps,
            self.timestep_spacing,
            self.steps_offset,
            skip_zero=True,
        )
        self.timesteps = np.round(ts).astype(np.int64)
        sigmas = np.interp(self.timesteps, np.arange(self.num_train_timesteps), self.train_sigmas)
        self.sigmas = np.append(sigmas, 0.0)
        self._reset_history()

    def _update(
        self, x: np.ndarray, s0: int, t: int, order: int, x0_t: np.ndarray | None
    ) -> np.ndarray:
        """From x at sigmas[s0] to sigmas[t] with the last `order` data predictions (those
        at s0, s0 - 1, ...): the predictor if x0_t is None, else the corrector that also
        uses x0_t, the data prediction at t."""
        sigma_s = ve_to_vp(self.sigmas[s0])[1]
        alpha_t, sigma_t = ve_to_vp(self.sigmas[t])
        ratio = self.sigmas[t] / self.sigmas[s0]  # e^(-h), h the step in lambda = -log(sigma)
        h_phi_1 = ratio - 1.0  # e^(-h) - 1; also B(h) for bh2
        m0 = self._x0s[-1]
        result = (sigma_t / sigma_s) * x - alpha_t * h_phi_1 * m0
        if order == 1:
            if x0_t is None:
                return result
            return result - alpha_t * h_phi_1 * 0.5 * (x0_t - m0)
        n_prev = order - 1  # history terms besides m0

        hh = np.log(ratio)  # -h
        rks = np.array(
            [np.log(self.sigmas[s0] / self.sigmas[s0 - k]) / -hh for k in range(1, n_prev + 1)]
            + [1.0]
        )
        d1s = [(self._x0s[-(k + 1)] - m0) / rks[k - 1] for k in range(1, n_prev + 1)]
        # b_k = k! * phi_(k+1)(-h) / B(h), the right-hand side of the order conditions
        b = []
        h_phi_k, factorial = h_phi_1 / hh - 1.0, 1
        for k in range(1, order + 1):
            b.append(h_phi_k * factorial / h_phi_1)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial
        R = np.stack([rks ** (k - 1) for k in range(1, order + 1)])
        if x0_t is None:
            rhos = np.array([0.5]) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
            terms = sum(r * d for r, d in zip(rhos, d1s, strict=True))
        else:
            rhos = np.linalg.solve(R, np.array(b))
            terms = sum(r * d for r, d in zip(rhos[:-1], d1s, strict=True))
            terms = terms + rhos[-1] * (x0_t - m0)
        return result - alpha_t * h_phi_1 * terms

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        generator: np.random.Generator | None = None,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        i = self._current_index(timestep)
        alpha, sigma = ve_to_vp(self.sigmas[i])
        x = np.asarray(sample, np.float64)
        x0 = predict_x0_eps(
            np.asarray(model_output, np.float64), x, alpha, sigma, self.prediction_type
        )[0]
        if i > 0 and self._last_sample is not None:
            x = self._update(self._last_sample, i - 1, i, self._order, x0)  # UniC
        self._x0s = [*self._x0s, x0][-self.solver_order :]
        # warm up over the first steps; lower the order over the last ones
        self._order = min(self.solver_order, len(self.timesteps) - i, len(self._x0s))
        self._last_sample = x
        prev = self._update(x, i, i + 1, self._order, None)  # UniP
        self._step_index = i + 1
        return prev.astype(sample.dtype)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        alpha, sigma = ve_to_vp(self.sigmas[self._noise_index(timestep)])
        return (alpha * np.asarray(original, np.float64) + sigma * noise).astype(original.dtype)
