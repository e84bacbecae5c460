"""PLMS: the pseudo linear multistep half of PNDM (Liu et al. 2022), as diffusers'
PNDMScheduler(skip_prk_steps=True), the sampler SD 1.x shipped with.

It extrapolates the noise prediction from up to four previous ones (Adams-Bashforth) and
applies it with the DDIM transfer. The first step is done twice (an improved-Euler start), so
`timesteps` has num_inference_steps + 1 entries with the second one repeated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .base import Scheduler, spaced_timesteps


class PNDMScheduler(Scheduler):
    prediction_types = ("epsilon", "v_prediction")

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self.final_alpha_cumprod = (
            1.0 if self.config["set_alpha_to_one"] else float(self.alphas_cumprod[0])
        )
        self._stride = 1
        self._counter = 0
        self._ets: list[np.ndarray] = []
        self._first_sample: np.ndarray | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._reset(num_inference_steps)
        ts = spaced_timesteps(
            self.num_inference_steps,
            self.num_train_timesteps,
            self.timestep_spacing,
            self.steps_offset,
        )
        ts = np.round(ts).astype(np.int64)
        self.timesteps = np.concatenate([ts[:1], ts[1:2], ts[1:]])
        self._stride = self.num_train_timesteps // self.num_inference_steps
        self._counter = 0
        self._ets = []
        self._first_sample = None

    # PLMS keeps its own step counter: set_begin_index (img2img) changes nothing, as in
    # diffusers, whose PNDMScheduler has no begin index either.

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        generator: np.random.Generator | None = None,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        t = int(timestep)
        x = np.asarray(sample, np.float64)
        out = np.asarray(model_output, np.float64)
        # Like DDIM, diffusers steps back a fixed T // n whatever the spacing.
        prev_t = t - self._stride
        if self._counter == 1:
            # Second half of the start: redo the first step from its sample with the mean of
            # both predictions (this call's output is not kept in the history).
            prev_t, t = t, t + self._stride
            assert self._first_sample is not None
            x, self._first_sample = self._first_sample, None
            e = (out + self._ets[-1]) / 2
        else:
            self._ets = [*self._ets[-3:], out]
            e1 = self._ets[-1]
            if len(self._ets) == 1:
                self._first_sample = x
                e = e1
            elif len(self._ets) == 2:
                e = (3 * e1 - self._ets[-2]) / 2
            elif len(self._ets) == 3:
                e = (23 * e1 - 16 * self._ets[-2] + 5 * self._ets[-3]) / 12
            else:
                e = (55 * e1 - 59 * self._ets[-2] + 37 * self._ets[-3] - 9 * self._ets[-4]) / 24
        self._counter += 1

        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        if self.prediction_type == "v_prediction":
            # diffusers extrapolates the raw v outputs and converts the result at this step.
            e = a_t**0.5 * e + (1 - a_t) ** 0.5 * x
        # PNDM's transfer function (eq. 11 of the paper) is the deterministic DDIM update.
        x0 = (x - (1 - a_t) ** 0.5 * e) / a_t**0.5
        prev = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * e
        return prev.astype(sample.dtype)
