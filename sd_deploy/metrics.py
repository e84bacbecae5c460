"""Parity metrics shared by export validation, tests and sd-bench (numpy only)."""

from __future__ import annotations

import numpy as np


def relative_l2(got: np.ndarray, want: np.ndarray) -> float:
    """||got - want|| / ||want|| in float64; 0 when both are zero."""
    got64, want64 = np.asarray(got, np.float64), np.asarray(want, np.float64)
    denom = float(np.linalg.norm(want64))
    diff = float(np.linalg.norm(got64 - want64))
    return diff / denom if denom else diff


def max_abs_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))


def cosine_similarity(got: np.ndarray, want: np.ndarray) -> float:
    a, b = np.asarray(got, np.float64).ravel(), np.asarray(want, np.float64).ravel()
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / denom if denom else 1.0


def psnr(got: np.ndarray, want: np.ndarray, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, peak]; inf when identical."""
    mse = float(np.mean((np.asarray(got, np.float64) - np.asarray(want, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak * peak / mse)


def ssim(got: np.ndarray, want: np.ndarray, peak: float = 1.0, window: int = 7) -> float:
    """Mean SSIM of two HxWxC (or HxW) images with a uniform 7x7 window (skimage's default)."""
    x, y = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2

    def box(a: np.ndarray) -> np.ndarray:
        # Mean over window x window patches via an integral image ("valid" region).
        s = np.pad(a, ((1, 0), (1, 0), (0, 0))).cumsum(0).cumsum(1)
        w = window
        return (s[w:, w:] - s[:-w, w:] - s[w:, :-w] + s[:-w, :-w]) / (w * w)

    mx, my = box(x), box(y)
    n = window * window
    cov = n / (n - 1)  # sample covariance, as skimage
    vx = (box(x * x) - mx * mx) * cov
    vy = (box(y * y) - my * my) * cov
    vxy = (box(x * y) - mx * my) * cov
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())
