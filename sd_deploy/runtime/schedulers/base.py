"""What the numpy samplers share: the training noise schedule, timestep spacing, the base class.

Every sampler computes in float64 and returns arrays in the dtype of the sample it was given,
so a float16 UNet output does not cost precision in the update itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from sd_deploy.errors import RequestError

# Stable Diffusion 1.x/2.x training schedule; a manifest's scheduler dict overrides any of these.
DEFAULT_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": False,
}
SPACINGS = ("leading", "trailing", "linspace")
# diffusers options that change the schedule or the update in ways not implemented here:
# refusing them beats silently sampling from the wrong distribution.
_UNSUPPORTED = ("rescale_betas_zero_snr", "thresholding")


def make_alphas_cumprod(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Any = None,
) -> np.ndarray:
    """alpha_bar_t = prod(1 - beta_s, s <= t) for t = 0 .. T-1, the training noise schedule."""
    T = num_train_timesteps
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float64)
    elif beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, T)
    elif beta_schedule == "scaled_linear":  # SD: linear in sqrt(beta)
        betas = np.linspace(beta_start**0.5, beta_end**0.5, T) ** 2
    elif beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine schedule

        def alpha_bar(t: np.ndarray) -> np.ndarray:
            return np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2

        i = np.arange(T)
        betas = np.minimum(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999)
    else:
        raise RequestError(
            f"beta_schedule {beta_schedule!r} is not supported "
            "(use linear, scaled_linear or squaredcos_cap_v2)"
        )
    return np.cumprod(1.0 - betas)


def spaced_timesteps(
    num_steps: int,
    num_train_timesteps: int,
    spacing: str,
    steps_offset: int = 0,
    *,
    skip_zero: bool = False,
) -> np.ndarray:
    """Descending float64 timesteps for `num_steps` steps ("linspace" ones are not rounded).

    Spacing as in "Common Diffusion Noise Schedules and Sample Steps are Flawed", table 2.
    skip_zero: DPM-Solver and UniPC lay out num_steps + 1 points and drop t = 0, since their
    last step lands on sigma 0 instead of evaluating the model there.
    """
    n, T, extra = num_steps, num_train_timesteps, int(skip_zero)
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n + extra)[extra:]
    elif spacing == "leading":
        ts = np.arange(extra, n + extra, dtype=np.float64) * (T // (n + extra)) + steps_offset
    elif spacing == "trailing":
        # diffusers' np.arange(T, 0, -T / n) yields n + 1 points for some n (61, 103, ...)
        # through float rounding, the last one becoming t = -1; keep the first n.
        return np.round(np.arange(T, 0, -T / n))[:n].astype(np.float64) - 1
    else:
        raise RequestError(
            f"timestep_spacing {spacing!r} is not supported (use {', '.join(SPACINGS)})"
        )
    return ts[::-1].astype(np.float64)


def predict_x0_eps(
    model_output: np.ndarray,
    sample: np.ndarray,
    alpha: float,
    sigma: float,
    prediction_type: str,
) -> tuple[np.ndarray, np.ndarray]:
    """(x0, eps) from the model output, for sample = alpha * x0 + sigma * eps."""
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha, model_output
    if prediction_type == "v_prediction":  # v = alpha * eps - sigma * x0
        return alpha * sample - sigma * model_output, alpha * model_output + sigma * sample
    return model_output, (sample - alpha * model_output) / sigma  # "sample": x0 itself


def ve_to_vp(sigma: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) of the variance-preserving x_t where sigma_t / alpha_t = sigma."""
    alpha = 1.0 / (sigma**2 + 1.0) ** 0.5
    return alpha, sigma * alpha


class Scheduler:
    """Base of the samplers: reads the config, holds the noise schedule and the step counter.

    Subclasses implement set_timesteps and step; `timesteps` and `init_noise_sigma` are valid
    after set_timesteps. `config` is a diffusers-style scheduler dict; keys a sampler does not
    use are ignored.
    """

    order: ClassVar[int] = 1  # model evaluations per entry of num_inference_steps
    prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        cfg = {**DEFAULT_CONFIG, **(config or {})}
        self.config = cfg
        for key in _UNSUPPORTED:
            if cfg.get(key):
                raise RequestError(f"scheduler option {key}=true is not supported")
        self.num_train_timesteps = int(cfg["num_train_timesteps"])
        self.prediction_type = str(cfg["prediction_type"])
        self.timestep_spacing = str(cfg["timestep_spacing"])
        self.steps_offset = int(cfg["steps_offset"])
        if self.prediction_type not in self.prediction_types:
            raise RequestError(
                f"{type(self).__name__} does not support prediction_type "
                f"{self.prediction_type!r} (supports {', '.join(self.prediction_types)})"
            )
        if self.timestep_spacing not in SPACINGS:
            raise RequestError(
                f"timestep_spacing {self.timestep_spacing!r} is not supported "
                f"(use {', '.join(SPACINGS)})"
            )
        self.alphas_cumprod = make_alphas_cumprod(
            self.num_train_timesteps,
            float(cfg["beta_start"]),
            float(cfg["beta_end"]),
            str(cfg["beta_schedule"]),
            cfg.get("trained_betas"),
        )
        self.num_inference_steps = 0
        self.timesteps: np.ndarray = np.zeros(0, dtype=np.int64)
        self.init_noise_sigma = 1.0
        self._step_index: int | None = None
        self._begin_index: int | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        raise NotImplementedError

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        generator: np.random.Generator | None = None,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        """One denoising step from `timestep`; returns the previous (less noisy) sample."""
        raise NotImplementedError

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        """The UNet input for `sample` at `timestep`; identity but for the k-diffusion samplers."""
        return sample

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        """Forward diffusion of `original` to `timestep` (img2img)."""
        a = self.alphas_cumprod[int(timestep)]
        x = np.sqrt(a) * np.asarray(original, np.float64) + np.sqrt(1 - a) * noise
        return x.astype(original.dtype)

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start stepping at timesteps[begin_index] (img2img starts part-way through)."""
        self._begin_index = begin_index

    # -- helpers for subclasses -------------------------------------------------------------

    def _reset(self, num_inference_steps: int) -> None:
        """Validate the step count and forget any previous run's state."""
        n = num_inference_steps
        if not isinstance(n, (int, np.integer)) or not 1 <= n <= self.num_train_timesteps:
            raise RequestError(
                f"number of steps must be an integer in 1..{self.num_train_timesteps}, got {n!r}"
            )
        self.num_inference_steps = int(n)
        self._step_index = None
        self._begin_index = None

    def _index_for(self, timestep: float) -> int:
        """Position of `timestep` in the schedule (compared as the UNet sees it, float32)."""
        hits = np.flatnonzero(self.timesteps.astype(np.float32) == np.float32(timestep))
        if hits.size == 0:
            raise ValueError(f"timestep {timestep} is not in this scheduler's timesteps")
        return int(hits[0])

    def _current_index(self, timestep: float) -> int:
        """Index of the step being taken: counted from the first call (or the begin index)."""
        if self._step_index is None:
            self._step_index = (
                self._begin_index if self._begin_index is not None else self._index_for(timestep)
            )
        return self._step_index

    def _noise_index(self, timestep: float) -> int:
        """Index whose noise level add_noise uses (diffusers' rule for sigma-indexed samplers)."""
        if self._begin_index is None:
            return self._index_for(timestep)
        return self._step_index if self._step_index is not None else self._begin_index

    @staticmethod
    def _noise(
        shape: tuple[int, ...],
        generator: np.random.Generator | None,
        noise: np.ndarray | None,
    ) -> np.ndarray:
        """The explicit `noise` if given, else a standard normal draw from `generator`."""
        if noise is not None:
            return np.asarray(noise, dtype=np.float64)
        rng = generator if generator is not None else np.random.default_rng()
        return rng.standard_normal(shape, dtype=np.float32).astype(np.float64)
