"""The numpy pipeline: parity with PyTorch, reproducibility, img2img, and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from sd_deploy.benchmarks.torch_backend import TorchBackend
from sd_deploy.errors import NonFiniteOutputError, RequestError
from sd_deploy.metrics import psnr
from sd_deploy.runtime.backends.base import Backend, ComponentSession
from sd_deploy.runtime.pipeline import GenerationRequest, Pipeline

SAMPLERS = ["euler_a", "ddim", "dpmpp_2m_karras", "unipc", "plms"]


def as_float(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float64) / 255.0


@pytest.fixture(scope="module")
def ort_fp32(tiny_engine_fp32):
    return Pipeline(tiny_engine_fp32, backend="onnxruntime-cpu")


@pytest.fixture(scope="module")
def torch_pipe(tiny_engine_fp32, tiny_models):
    return Pipeline(tiny_engine_fp32, backend=TorchBackend(tiny_models))


def noisy_request(**kw) -> GenerationRequest:
    # Random-weight tiny models give near-flat images; a strong init-image signal makes
    # the comparison sensitive (PSNR of flat images would be high whatever happened).
    defaults = dict(prompt=["a red circle", "a blue star"], seed=7, steps=6, batch=2, guidance=5.0)
    defaults.update(kw)
    return GenerationRequest(**defaults)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_fp32_onnxruntime_matches_pytorch(sampler, ort_fp32, torch_pipe):
    req = noisy_request(sampler=sampler)
    got, want = ort_fp32.generate(req), torch_pipe.generate(req)
    # 40 dB on 8-bit images: at most ~1 grey level of difference on average.
    assert psnr(as_float(got.images), as_float(want.images)) >= 40.0
    assert got.parameters == [dict(p, backend="onnxruntime") for p in want.parameters]


def test_fp16_graphs_stay_within_measured_bound(tiny_engine_fp16, torch_pipe):
    pipe = Pipeline(tiny_engine_fp16, backend="onnxruntime-cpu")
    for sampler in ("euler_a", "dpmpp_2m_karras"):
        req = noisy_request(sampler=sampler)
        value = psnr(as_float(pipe.generate(req).images), as_float(torch_pipe.generate(req).images))
        # Measured ~55-60 dB on tiny; 35 dB leaves room for fp16 rounding, not for bugs.
        assert value >= 35.0, (sampler, value)


def test_pipeline_is_sensitive_to_a_real_difference(ort_fp32, torch_pipe):
    """The parity check can fail: a different seed is far below 40 dB on the same model."""
    a = ort_fp32.generate(noisy_request(seed=1)).images
    b = torch_pipe.generate(noisy_request(seed=2)).images
    assert psnr(as_float(a), as_float(b)) < 40.0


def test_image_i_of_a_batch_is_reproducible_alone(ort_fp32):
    batch = ort_fp32.generate(noisy_request(sampler="euler_a", seed=10, prompt="a cat"))
    alone = ort_fp32.generate(noisy_request(sampler="euler_a", seed=11, batch=1, prompt="a cat"))
    np.testing.assert_array_equal(batch.images[1], alone.images[0])
    assert batch.parameters[1]["seed"] == 11


def test_initial_noise_and_guidance_one(ort_fp32, torch_pipe):
    noise = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    req = GenerationRequest(prompt="x", guidance=1.0, steps=4, initial_noise=noise, seed=0)
    a, b = ort_fp32.generate(req), torch_pipe.generate(req)
    assert psnr(as_float(a.images), as_float(b.images)) >= 40.0
    with pytest.raises(RequestError, match="initial noise has shape"):
        ort_fp32.generate(GenerationRequest(prompt="x", initial_noise=noise[:, :2]))


def test_img2img_matches_pytorch_and_uses_the_image(ort_fp32, torch_pipe):
    rng = np.random.default_rng(3)
    image = (rng.uniform(0, 255, (64, 64, 3))).astype(np.uint8)
    req = noisy_request(init_image=image, strength=0.5, sampler="ddim", steps=10)
    got = ort_fp32.generate(req)
    assert psnr(as_float(got.images), as_float(torch_pipe.generate(req).images)) >= 40.0
    assert got.parameters[0]["strength"] == 0.5
    other = noisy_request(init_image=255 - image, strength=0.5, sampler="ddim", steps=10)
    assert not np.array_equal(ort_fp32.generate(other).images, got.images)


def test_progress_callback_counts_steps(ort_fp32):
    seen = []
    ort_fp32.generate(
        noisy_request(steps=5, sampler="ddim"), progress=lambda i, n, t: seen.append((i, n))
    )
    assert seen == [(i, 5) for i in range(5)]


def test_timings_separate_backend_from_runtime_work(ort_fp32):
    t = ort_fp32.generate(noisy_request(steps=3)).timings
    assert {"text_encoder", "unet", "vae_decoder", "total", "outside_backend"} <= set(t)
    assert 0 <= t["outside_backend"] < t["total"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(steps=0), "steps must be an integer >= 1"),
        (dict(guidance=-1.0), "guidance must be >= 0"),
        (dict(sampler="k_euler"), "unknown sampler 'k_euler'; choose one of: ddim"),
        (dict(height=60), "height 60 is not a multiple of 8"),
        (dict(width=1024), "width 1024 is outside the 32..128"),
        (dict(batch=5), "batch 5 is outside the 1..4"),
        (dict(batch=0), "batch must be >= 1"),
        (dict(init_image=np.zeros((64, 64, 3), np.uint8), strength=0.0), "strength must be in"),
        (dict(init_image=np.zeros((64, 64, 3), np.uint8), strength=1.5), "strength must be in"),
        (dict(prompt=["a", "b", "c"]), "3 prompts for a batch of 2"),
    ],
)
def test_bad_requests_are_one_line_errors(change, message, ort_fp32):
    with pytest.raises(RequestError) as info:
        ort_fp32.generate(noisy_request(**change))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


class NaNBackend(Backend):
    """Wraps a backend and poisons one component's output."""

    name = "nan"

    def __init__(self, inner: Backend, poisoned: str) -> None:
        self.inner, self.poisoned = inner, poisoned

    def open(self, engine_dir, spec) -> ComponentSession:
        session = self.inner.open(engine_dir, spec)
        poisoned = self.poisoned

        class Poisoned(ComponentSession):
            def run(self, feeds, release_scratch=False):
                out = session.run(feeds, release_scratch)
                if spec.name == poisoned:
                    key = next(iter(out))
                    out[key] = out[key].copy()
                    out[key].flat[0] = np.nan
                return out

        return Poisoned(spec)


@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae_decoder"])
def test_non_finite_output_names_the_component(component, tiny_engine_fp32, tiny_models):
    pipe = Pipeline(tiny_engine_fp32, backend=NaNBackend(TorchBackend(tiny_models), component))
    with pytest.raises(NonFiniteOutputError, match=f"^{component} produced NaN/Inf"):
        pipe.generate(noisy_request(steps=2))


class CountingBackend(Backend):
    """Wraps a backend; records how many sessions are open at once and every call."""

    name = "counting"

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.open_now: set[str] = set()
        self.most_open = 0
        self.opened: list[str] = []
        self.calls: list[tuple[str, bool]] = []  # (component, release_scratch)

    def open(self, engine_dir, spec):
        session = self.inner.open(engine_dir, spec)
        counter = self
        self.open_now.add(spec.name)
        self.most_open = max(self.most_open, len(self.open_now))
        self.opened.append(spec.name)

        class Counted(ComponentSession):
            def run(self, feeds, release_scratch=False):
                counter.calls.append((spec.name, release_scratch))
                return session.run(feeds, release_scratch)

            def close(self):
                session.close()
                counter.open_now.discard(spec.name)

        return Counted(spec)


@pytest.mark.parametrize("init_image", [False, True])
def test_one_shot_pipeline_holds_one_component_at_a_time(init_image, tiny_engine_fp32, ort_fp32):
    image = np.zeros((64, 64, 3), np.uint8) if init_image else None
    request = noisy_request(steps=3, init_image=image)
    counting = CountingBackend(ort_fp32.backend)
    one_shot = Pipeline(tiny_engine_fp32, backend=counting, keep_loaded=False)
    first = one_shot.generate(request)
    assert counting.most_open == 1 and not counting.open_now
    encoder = ["vae_encoder"] if init_image else []
    assert counting.opened == ["text_encoder", *encoder, "unet", "vae_decoder"]
    # A second call reloads what it needs and draws the same images as a kept-loaded pipeline.
    again = one_shot.generate(request)
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.images, ort_fp32.generate(request).images)


@pytest.mark.parametrize("keep_loaded", [False, True])
def test_each_components_last_call_releases_its_scratch(keep_loaded, tiny_engine_fp32, ort_fp32):
    counting = CountingBackend(ort_fp32.backend)
    pipe = Pipeline(tiny_engine_fp32, backend=counting, keep_loaded=keep_loaded)
    request = noisy_request(steps=3, init_image=np.zeros((64, 64, 3), np.uint8), strength=1.0)
    pipe.generate(request)
    # Only the last UNet step hands the arena back: the steps before reuse it.
    assert counting.calls == [
        ("text_encoder", True),
        ("vae_encoder", True),
        ("unet", False),
        ("unet", False),
        ("unet", True),
        ("vae_decoder", True),
    ]
    assert (counting.open_now == set(pipe.manifest.components)) == keep_loaded
