"""The numpy pipeline: parity with PyTorch, reproducibility, img2img, and refusals."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from sd_deploy.benchmarks.torch_backend import TorchBackend
from sd_deploy.errors import ErrorCode, GenerationCancelled, NonFiniteOutputError, RequestError
from sd_deploy.metrics import psnr
from sd_deploy.runtime import GenerationRequest, Pipeline, ResolvedRequest
from sd_deploy.runtime.backends.base import Backend, ComponentSession

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
    defaults = dict(prompt="a red circle", seed=7, steps=6, batch=2, guidance=5.0)
    defaults.update(kw)
    return GenerationRequest(**defaults)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_fp32_onnxruntime_matches_pytorch(sampler, ort_fp32, torch_pipe):
    req = noisy_request(sampler=sampler)
    got, want = ort_fp32.generate(req), torch_pipe.generate(req)
    # 40 dB on 8-bit images: at most ~1 grey level of difference on average.
    assert psnr(as_float(got.images), as_float(want.images)) >= 40.0
    assert got.parameters == [
        dataclasses.replace(p, backend="onnxruntime") for p in want.parameters
    ]


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
    assert batch.parameters[1].seed == 11


def test_initial_noise_and_guidance_one(ort_fp32, torch_pipe):
    noise = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    req = GenerationRequest(prompt="x", guidance=1.0, steps=4, seed=0)
    a = ort_fp32.generate_from_noise(req, noise)
    b = torch_pipe.generate_from_noise(req, noise)
    assert psnr(as_float(a.images), as_float(b.images)) >= 40.0
    with pytest.raises(RequestError, match="initial noise has shape"):
        ort_fp32.generate_from_noise(GenerationRequest(prompt="x"), noise[:, :2])


def test_img2img_matches_pytorch_and_uses_the_image(ort_fp32, torch_pipe):
    rng = np.random.default_rng(3)
    image = (rng.uniform(0, 255, (64, 64, 3))).astype(np.uint8)
    req = noisy_request(init_image=image, strength=0.5, sampler="ddim", steps=10)
    got = ort_fp32.generate(req)
    assert psnr(as_float(got.images), as_float(torch_pipe.generate(req).images)) >= 40.0
    assert got.parameters[0].strength == 0.5
    other = noisy_request(init_image=255 - image, strength=0.5, sampler="ddim", steps=10)
    assert not np.array_equal(ort_fp32.generate(other).images, got.images)


def test_progress_callback_counts_steps(ort_fp32):
    seen = []
    ort_fp32.generate(
        noisy_request(steps=5, sampler="ddim"), progress=lambda i, n: seen.append((i, n))
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
        (dict(guidance=-1.0), "guidance must be a finite number >= 0"),
        (dict(guidance=float("nan")), "guidance must be a finite number >= 0"),
        (dict(steps=2.5), "steps must be an integer >= 1"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(width="64"), "width must be an integer"),
        (dict(sampler="k_euler"), "unknown sampler 'k_euler'; choose one of: ddim"),
        (dict(height=60), "height 60 is not a multiple of 8"),
        (dict(width=1024), "width 1024 is outside the 32..128 the engine dir"),
        (dict(width=8), "width 8 is outside the 32..128 the engine dir"),
        (dict(batch=5), "batch 5 is outside the 1..4"),
        (dict(batch=0), "batch must be >= 1"),
        (dict(init_image=np.zeros((64, 64, 3), np.uint8), strength=0.0), "strength must be in"),
        (dict(init_image=np.zeros((64, 64, 3), np.uint8), strength=1.5), "strength must be in"),
        (dict(prompt=["a", "b"]), "prompt must be a string, got list"),
        (dict(init_image=np.zeros((64, 64), np.uint8)), "init_image must be an HxWx3 uint8"),
        (dict(init_image=np.zeros((64, 64, 3), np.float32)), "init_image must be an HxWx3"),
    ],
)
def test_bad_requests_are_one_line_errors(change, message, ort_fp32):
    with pytest.raises(RequestError) as info:
        ort_fp32.generate(noisy_request(**change))
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert info.value.code == ErrorCode.INVALID_ARGUMENT
    with pytest.raises(RequestError):  # validate refuses the same, before any work
        ort_fp32.validate(noisy_request(**change))


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


def test_validate_fills_every_default(ort_fp32):
    resolved = ort_fp32.validate(GenerationRequest(prompt="a cat"))
    m, sched = ort_fp32.manifest.model, ort_fp32.manifest.scheduler
    assert isinstance(resolved, ResolvedRequest)
    assert (resolved.width, resolved.height) == (m.default_width, m.default_height)
    assert resolved.steps == sched["default_steps"]
    assert resolved.sampler == sched["default_sampler"]
    assert resolved.strength is None and resolved.init_image is None
    assert isinstance(resolved.seed, int) and resolved.seed >= 0


@pytest.mark.parametrize("seed", [None, -1, -5])
def test_negative_or_missing_seed_means_random_and_is_reported(seed, ort_fp32):
    a = ort_fp32.generate(noisy_request(seed=seed, steps=2, batch=1))
    b = ort_fp32.generate(noisy_request(seed=seed, steps=2, batch=1))
    assert a.parameters[0].seed >= 0 and a.parameters[0].seed != b.parameters[0].seed
    again = ort_fp32.generate(noisy_request(seed=a.parameters[0].seed, steps=2, batch=1))
    np.testing.assert_array_equal(again.images, a.images)


def test_generate_many_batches_compatible_requests_and_matches_each_alone(
    tiny_engine_fp32, ort_fp32
):
    counting = CountingBackend(ort_fp32.backend)
    pipe = Pipeline(tiny_engine_fp32, backend=counting)
    requests = [
        noisy_request(prompt="a red circle", negative_prompt="blur", seed=3, batch=1),
        noisy_request(prompt="a blue star", seed=40, batch=2),
        noisy_request(prompt="a square", seed=9, batch=1, steps=4),  # another group
        noisy_request(prompt="a green star", seed=5, batch=1),
    ]
    results = pipe.generate_many(requests)
    unet_calls = [c for c, _ in counting.calls if c == "unet"]
    # Two groups: 6 steps for the three compatible requests (4 images), 4 for the other.
    assert len(unet_calls) == 6 + 4
    for request, result in zip(requests, results, strict=True):
        alone = ort_fp32.generate(request)
        assert result.images.shape == alone.images.shape
        assert result.parameters == [
            dataclasses.replace(p, backend="counting") for p in alone.parameters
        ]
        # ONNX Runtime CPU is batch-invariant here: the same bytes (docs/runtime-api.md).
        np.testing.assert_array_equal(result.images, alone.images)


def test_generate_many_splits_where_the_batch_range_ends(tiny_engine_fp32, ort_fp32):
    counting = CountingBackend(ort_fp32.backend)
    pipe = Pipeline(tiny_engine_fp32, backend=counting)
    limit = pipe.manifest.components["unet"].shape_ranges.batch.max
    requests = [noisy_request(seed=i, batch=1, steps=2) for i in range(limit + 1)]
    results = pipe.generate_many(requests)
    assert [r.parameters[0].seed for r in results] == list(range(limit + 1))
    assert len([c for c, _ in counting.calls if c == "unet"]) == 2 * 2


def test_generate_many_validates_everything_first(tiny_engine_fp32, ort_fp32):
    counting = CountingBackend(ort_fp32.backend)
    pipe = Pipeline(tiny_engine_fp32, backend=counting)
    with pytest.raises(RequestError, match="steps must be"):
        pipe.generate_many([noisy_request(), noisy_request(steps=0)])
    assert counting.calls == []


def test_progress_returning_false_cancels_at_the_next_step(ort_fp32):
    seen = []

    def progress(i, n):
        seen.append(i)
        return i < 2

    with pytest.raises(GenerationCancelled, match="after step 3") as info:
        ort_fp32.generate(noisy_request(steps=6), progress=progress)
    assert seen == [0, 1, 2] and info.value.code == ErrorCode.CANCELLED
    # The pipeline is not wedged: the next call runs whole.
    assert ort_fp32.generate(noisy_request(steps=2)).images.shape[0] == 2


def test_cancel_event_stops_the_generation(ort_fp32):
    event = threading.Event()
    seen = []

    def progress(i, n):
        seen.append(i)
        if i == 1:
            event.set()

    with pytest.raises(GenerationCancelled, match="before step 3"):
        ort_fp32.generate(noisy_request(steps=6), progress=progress, cancel=event)
    assert seen == [0, 1]
