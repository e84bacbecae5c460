"""Parity against PyTorch fp32 on the inputs a real run produces.

The PyTorch reference pipeline runs once with a `RecordingBackend`: every component call's
inputs and outputs are kept -- the text embeddings of the benchmark's real prompts, the
latents and timesteps of an actual sampling trajectory, the final latent the VAE decodes.
Each backend then runs those exact inputs and is compared per component (relative L2,
max abs error, cosine similarity), and its whole pipeline, started from the same initial
noise, is compared on the final images (PSNR, SSIM).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sd_deploy.engine_dir.manifest import ComponentSpec
from sd_deploy.metrics import cosine_similarity, max_abs_error, psnr, relative_l2, ssim
from sd_deploy.runtime.backends.base import Backend, ComponentSession


@dataclass
class ComponentCall:
    """One component call of the reference run: its inputs and PyTorch's outputs."""

    component: str
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    label: str = ""  # e.g. "step 3/10, t=541"


@dataclass
class Captured:
    """Every component call of one reference run, in order, by component."""

    calls: dict[str, list[ComponentCall]] = field(default_factory=dict)

    def add(self, call: ComponentCall) -> None:
        self.calls.setdefault(call.component, []).append(call)

    def samples(self, unet_samples: int = 3) -> list[ComponentCall]:
        """The calls parity checks: every text/VAE call, UNet steps spread over the trajectory.

        The first step (pure noise, highest t), the last (nearly clean latent, lowest t) and
        evenly spaced ones between: errors that depend on the noise level show up.
        """
        chosen: list[ComponentCall] = []
        for name, calls in self.calls.items():
            if name == "unet" and len(calls) > unet_samples:
                picks = np.unique(np.linspace(0, len(calls) - 1, unet_samples).round().astype(int))
                chosen.extend(calls[i] for i in picks)
            else:
                chosen.extend(calls)
        return chosen


class _RecordingSession(ComponentSession):
    def __init__(self, inner: ComponentSession, owner: RecordingBackend) -> None:
        super().__init__(inner.spec)
        self.inner = inner
        self.owner = owner

    def run(
        self, feeds: Mapping[str, np.ndarray], release_scratch: bool = False
    ) -> dict[str, np.ndarray]:
        outputs = self.inner.run(feeds, release_scratch)
        if not self.owner.recording:
            return outputs
        name, captured = self.spec.name, self.owner.captured
        label = ""
        if name == "unet":
            step = len(captured.calls.get("unet", [])) + 1
            label = f"step {step}, t={float(np.asarray(feeds['timestep']).ravel()[0]):g}"
        captured.add(
            ComponentCall(
                name,
                {k: np.array(v, copy=True) for k, v in feeds.items()},
                {k: np.array(v, copy=True) for k, v in outputs.items()},
                label,
            )
        )
        return outputs

    def close(self) -> None:
        self.inner.close()


class RecordingBackend(Backend):
    """Wraps the reference backend; while `recording` is set, keeps every call in `captured`.

    Switch `recording` off for timed runs so copying arrays is not part of the measurement.
    """

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.captured = Captured()
        self.recording = True

    def describe(self) -> str:
        return self.inner.describe()

    def open(self, engine_dir: Path, spec: ComponentSpec) -> ComponentSession:
        return _RecordingSession(self.inner.open(engine_dir, spec), self)


def compare_arrays(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    return {
        "rel_l2": relative_l2(got, want),
        "max_abs": max_abs_error(got, want),
        "cosine": cosine_similarity(got, want),
    }


RunComponent = Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]]


def component_parity(run: RunComponent, samples: list[ComponentCall]) -> dict[str, Any]:
    """Run each sample's inputs through `run` and compare with the reference outputs.

    Returns, per component, the worst figures over its samples and outputs (largest
    relative L2 and max abs, smallest cosine) plus each sample's figures.
    """
    result: dict[str, Any] = {}
    for call in samples:
        got = run(call.component, call.inputs)
        per_output = {name: compare_arrays(got[name], want) for name, want in call.outputs.items()}
        worst = {
            "rel_l2": max(v["rel_l2"] for v in per_output.values()),
            "max_abs": max(v["max_abs"] for v in per_output.values()),
            "cosine": min(v["cosine"] for v in per_output.values()),
        }
        entry = result.setdefault(
            call.component, {"rel_l2": 0.0, "max_abs": 0.0, "cosine": 1.0, "samples": []}
        )
        entry["rel_l2"] = max(entry["rel_l2"], worst["rel_l2"])
        entry["max_abs"] = max(entry["max_abs"], worst["max_abs"])
        entry["cosine"] = min(entry["cosine"], worst["cosine"])
        entry["samples"].append({"label": call.label, **worst, "outputs": per_output})
    return result


def image_parity(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    """PSNR (dB, over the batch) and mean SSIM of uint8 [B,H,W,3] images, plus pixel errors."""
    a = np.asarray(got, np.float64) / 255.0
    b = np.asarray(want, np.float64) / 255.0
    diff = np.abs(np.asarray(got, np.int16) - np.asarray(want, np.int16))
    return {
        "psnr_db": psnr(a, b),
        "ssim": float(np.mean([ssim(x, y) for x, y in zip(a, b, strict=True)])),
        "max_abs_levels": int(diff.max()),
        "mean_abs_levels": float(diff.mean()),
        "differing_pixels_pct": float((diff.max(axis=-1) > 0).mean() * 100.0),
    }


def image_contrast(images: np.ndarray) -> float:
    """Std of the pixel values in 8-bit levels: near 0 means flat images, whose PSNR says little."""
    return float(np.asarray(images, np.float64).std())
