"""The numpy samplers against diffusers' schedulers of the same name, step by step.

Both sides run their own closed loop from the same initial noise: a fixed nonlinear function
of (model input, t) stands in for the UNet, so a wrong timestep, sigma, coefficient or
history entry changes the next sample and is fed forward as in a real run. Every step's
scaled model input and previous sample are compared, and the timesteps and init_noise_sigma.

Tolerance: relative L2 error <= 1e-5 throughout. Our samplers compute in float64; diffusers
computes in float32, which rounds each of the ~10 operations of a step (6e-8 each); over up
to 20 (50) steps, with multistep histories of up to 4 outputs, that gives at most 1.6e-6
here (2.6e-6 against untouched diffusers), while a real difference (a timestep off by one,
a coefficient off by 1%, a missing history term) moves the samples by 1e-4 or more.

One float32 effect is larger than that and lies in the reference's schedule, not in the
sampler: diffusers builds alpha_bar with float32 torch.linspace and cumprod. Where
alpha_bar ~ 1 (t <= 1), 1 - alpha_bar ~ 1e-3 keeps only ~4 significant digits in float32, so
diffusers' own sigma(t=0) is 1.3e-5 (relative) from its exact value; a 1-step "linspace" Euler
run (sigma(0) is then init_noise_sigma) cannot agree to 1e-5 with any exact implementation.
Hence the step-by-step grid gives diffusers the exact float64 schedule (built here,
independently of the package; every sampler formula stays diffusers'), and separately:
  * test_schedule_matches_diffusers checks our alpha_bar against diffusers' float32 one at
    float32 precision (cumprod of 1000 float32 factors: 9e-7 measured, bound 2e-6);
  * test_pristine_diffusers_matches checks every sampler against untouched diffusers at the
    settings people run (epsilon / v, every spacing, 20 and 50 steps), still at 1e-5.
"""

from __future__ import annotations

import importlib
import inspect
import math
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from sd_deploy.errors import RequestError
from sd_deploy.runtime.schedulers import (
    SAMPLER_NAMES,
    SAMPLERS,
    img2img_timesteps,
    make_scheduler,
)
from sd_deploy.runtime.schedulers.ddim import DDIMScheduler
from sd_deploy.runtime.schedulers.unipc import UniPCMultistepScheduler

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# diffusers calls np.array on torch tensors, which numpy 2 flags; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

RTOL = 1e-5
STEPS = (1, 3, 7, 20)
SPACINGS = ("leading", "trailing", "linspace")
SHAPE = (2, 4, 8, 8)

# our name -> (diffusers module, class, options that make it that sampler). Imported from the
# modules: without scipy, diffusers' top level exports a placeholder LMSDiscreteScheduler.
REFERENCE: dict[str, tuple[str, str, dict[str, Any]]] = {
    "ddim": ("scheduling_ddim", "DDIMScheduler", {}),
    "plms": ("scheduling_pndm", "PNDMScheduler", {"skip_prk_steps": True}),
    "ddpm": ("scheduling_ddpm", "DDPMScheduler", {}),
    "euler": ("scheduling_euler_discrete", "EulerDiscreteScheduler", {}),
    "euler_a": ("scheduling_euler_ancestral_discrete", "EulerAncestralDiscreteScheduler", {}),
    "lms": ("scheduling_lms_discrete", "LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("scheduling_dpmsolver_multistep", "DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": (
        "scheduling_dpmsolver_multistep",
        "DPMSolverMultistepScheduler",
        {"use_karras_sigmas": True},
    ),
    "unipc": ("scheduling_unipc_multistep", "UniPCMultistepScheduler", {}),
    "lcm": ("scheduling_lcm", "LCMScheduler", {}),
}
# prediction types diffusers implements (PNDM and Euler ancestral lack "sample")
PREDICTIONS = {
    name: ("epsilon", "v_prediction")
    if name in ("plms", "euler_a")
    else ("epsilon", "v_prediction", "sample")
    for name in REFERENCE
}


def diffusers_module(name: str) -> Any:
    return importlib.import_module(f"diffusers.schedulers.{REFERENCE[name][0]}")


_W = np.random.default_rng(1234).standard_normal(SHAPE)


def fake_unet(x: np.ndarray, t: float) -> np.ndarray:
    """A fixed smooth function of (model input, timestep), Lipschitz < 1 in x."""
    x = np.asarray(x, np.float64)
    s = float(t) / 1000.0
    out = 0.6 * np.tanh(x) + 0.3 * np.cos(3 * s) * np.roll(x, 1, axis=1) + 0.5 * np.sin(7 * s + _W)
    return out.astype(np.float32)


def rel_err(ours: np.ndarray, ref: Any) -> float:
    ref = ref.numpy() if hasattr(ref, "numpy") else np.asarray(ref)
    ref = ref.astype(np.float64)
    return float(np.linalg.norm(np.asarray(ours, np.float64) - ref) / np.linalg.norm(ref))


def sd_config(**overrides: Any) -> dict[str, Any]:
    """SD 1.5's scheduler config as a manifest carries it, with a key no scheduler knows."""
    config = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "default_steps": 30,  # sd-run's default, not a scheduler option
    }
    config.update(overrides)
    return config


def exact_alphas_cumprod(config: dict[str, Any]) -> np.ndarray:
    """The training schedule in float64, written out from the papers' formulas."""
    T, b0, b1 = config["num_train_timesteps"], config["beta_start"], config["beta_end"]
    kind = config["beta_schedule"]
    if kind == "linear":
        betas = [b0 + (b1 - b0) * i / (T - 1) for i in range(T)]
    elif kind == "scaled_linear":
        betas = [(b0**0.5 + (b1**0.5 - b0**0.5) * i / (T - 1)) ** 2 for i in range(T)]
    else:  # squaredcos_cap_v2

        def f(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]
    return np.cumprod(1 - np.array(betas))


def reference(
    name: str, config: dict[str, Any], *, exact_schedule: bool = True, **options: Any
) -> Any:
    """diffusers' scheduler for `name`, built from the config (never from the hub); with
    exact_schedule its float32 alpha_bar is replaced by the float64 one (see the top)."""
    _, cls_name, sampler_options = REFERENCE[name]
    cls = getattr(diffusers_module(name), cls_name)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in config.items() if k in accepted}
    sched = cls(**{**kwargs, **sampler_options, **options})
    if exact_schedule:
        alphas_cumprod = torch.from_numpy(exact_alphas_cumprod(config))
        sched.alphas_cumprod = alphas_cumprod
        if hasattr(sched, "final_alpha_cumprod"):  # cached from alpha_bar in __init__
            one = torch.tensor(1.0, dtype=torch.float64)
            sched.final_alpha_cumprod = one if sched.config.set_alpha_to_one else alphas_cumprod[0]
    return sched


@pytest.fixture(autouse=True)
def ref_noise(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """Make diffusers' stochastic schedulers draw `state.noise` instead of torch.randn, and
    give LMSDiscreteScheduler a quadrature when scipy is missing."""
    state = SimpleNamespace(noise=None, draws=0)

    def fake_randn(shape: Any, generator: Any = None, device: Any = None, dtype: Any = None) -> Any:
        assert state.noise is not None, "diffusers drew noise where the test expected none"
        assert tuple(shape) == state.noise.shape
        state.draws += 1
        return torch.from_numpy(state.noise).to(dtype or torch.float32)

    for name in ("ddim", "ddpm", "euler_a", "lcm"):
        monkeypatch.setattr(diffusers_module(name), "randn_tensor", fake_randn)

    lms = diffusers_module("lms")
    if not hasattr(lms, "integrate"):
        # diffusers integrates a Lagrange polynomial of degree <= 3 with scipy's quad; an
        # 8-point Gauss-Legendre rule is exact for it (as quad's 21-point rule is).
        nodes, weights = np.polynomial.legendre.leggauss(8)

        def quad(f: Any, a: Any, b: Any, **_: Any) -> tuple[float, float]:
            a, b = float(a), float(b)
            xs = (b - a) / 2 * nodes + (a + b) / 2
            return (b - a) / 2 * sum(w * float(f(x)) for w, x in zip(weights, xs, strict=True)), 0.0

        monkeypatch.setattr(lms, "integrate", SimpleNamespace(quad=quad), raising=False)
    return state


def run_both(
    ours: Any,
    ref: Any,
    noise_state: SimpleNamespace,
    *,
    timesteps: tuple[Any, Any] | None = None,
    start: np.ndarray | None = None,
    ref_step_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
) -> float:
    """Run both samplers over their (already set) timesteps and return the largest relative
    error of anything compared. `start`: the initial sample (default: scaled noise)."""
    rng = np.random.default_rng(seed)
    ours_ts, ref_ts = timesteps or (ours.timesteps, ref.timesteps)
    np.testing.assert_array_equal(
        np.asarray(ours_ts).astype(np.float32), ref_ts.numpy().astype(np.float32)
    )
    errors = [abs(float(ours.init_noise_sigma) / float(ref.init_noise_sigma) - 1)]
    if start is None:
        start = rng.standard_normal(SHAPE).astype(np.float32)
        x_ours = (start * ours.init_noise_sigma).astype(np.float32)
        x_ref = torch.from_numpy(start) * ref.init_noise_sigma
    else:
        x_ours, x_ref = start, torch.from_numpy(start.copy())
    for t_ours, t_ref in zip(ours_ts, ref_ts, strict=True):
        in_ours = ours.scale_model_input(x_ours, t_ours)
        in_ref = ref.scale_model_input(x_ref, t_ref)
        assert in_ours.dtype == np.float32
        errors.append(rel_err(in_ours, in_ref))
        noise_state.noise = noise = rng.standard_normal(SHAPE).astype(np.float32)
        x_ours = ours.step(fake_unet(in_ours, t_ours), t_ours, x_ours, noise=noise)
        out_ref = torch.from_numpy(fake_unet(in_ref.numpy(), float(t_ref)))
        x_ref = ref.step(out_ref, t_ref, x_ref, **(ref_step_kwargs or {})).prev_sample
        noise_state.noise = None
        assert x_ours.dtype == np.float32
        errors.append(rel_err(x_ours, x_ref))
    return max(errors)


def compare(
    name: str, config: dict[str, Any], steps: int, state: Any, *, exact_schedule: bool = True
) -> float:
    """Run `name` for `steps` steps on both sides and assert the bound; return the error."""
    ours = make_scheduler(name, config)
    ref = reference(name, config, exact_schedule=exact_schedule)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    err = run_both(ours, ref, state, seed=steps)
    assert err <= RTOL, f"{name}, {steps} steps: relative error {err:.2e}"
    return err


def grid() -> list[Any]:
    return [
        pytest.param(name, prediction, spacing, id=f"{name}-{prediction}-{spacing}")
        for name in REFERENCE
        for prediction in PREDICTIONS[name]
        # LCM's timesteps come from its distillation schedule; it ignores the spacing.
        for spacing in (("leading",) if name == "lcm" else SPACINGS)
    ]


@pytest.mark.parametrize(("name", "prediction", "spacing"), grid())
def test_matches_diffusers(name: str, prediction: str, spacing: str, ref_noise: Any) -> None:
    config = sd_config(prediction_type=prediction, timestep_spacing=spacing)
    draws = 0
    for steps in STEPS:
        compare(name, config, steps, ref_noise)
        draws += steps - (name == "lcm")  # LCM returns its x0 estimate at the last step
    if name in ("euler_a", "lcm"):
        assert ref_noise.draws == draws  # the noise really went in on both sides
    if name == "ddpm":
        assert ref_noise.draws > 0


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_pristine_diffusers_matches(spacing: str, prediction: str, ref_noise: Any) -> None:
    """Untouched diffusers (its own float32 schedule) at the step counts people use."""
    config = sd_config(prediction_type=prediction, timestep_spacing=spacing)
    for name in SAMPLER_NAMES:
        for steps in (20, 50) if name != "lcm" else (4, 8):
            compare(name, config, steps, ref_noise, exact_schedule=False)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_with_eta_matches_diffusers(spacing: str, prediction: str, ref_noise: Any) -> None:
    config = sd_config(prediction_type=prediction, timestep_spacing=spacing)
    for steps in STEPS:
        ours, ref = DDIMScheduler(config, eta=0.7), reference("ddim", config)
        ours.set_timesteps(steps)
        ref.set_timesteps(steps)
        draws = ref_noise.draws
        err = run_both(ours, ref, ref_noise, ref_step_kwargs={"eta": 0.7}, seed=steps)
        assert err <= RTOL, f"{steps} steps: relative error {err:.2e}"
        assert ref_noise.draws - draws == steps


@pytest.mark.parametrize("spacing", SPACINGS)
def test_unipc_order_3_matches_diffusers(spacing: str, ref_noise: Any) -> None:
    """Order 3 solves the order conditions instead of using UniPC's order-2 constants."""
    config = sd_config(prediction_type="v_prediction", timestep_spacing=spacing)
    for steps in (3, 7, 20):
        ours = UniPCMultistepScheduler(config, solver_order=3)
        ref = reference("unipc", config, solver_order=3)
        ours.set_timesteps(steps)
        ref.set_timesteps(steps)
        err = run_both(ours, ref, ref_noise, seed=steps)
        assert err <= RTOL, f"{steps} steps: relative error {err:.2e}"


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_schedule_matches_diffusers(schedule: str) -> None:
    config = sd_config(beta_schedule=schedule)
    if schedule == "linear":
        config.update(beta_start=0.0001, beta_end=0.02)
    ours = make_scheduler("ddim", config).alphas_cumprod
    exact = exact_alphas_cumprod(config)
    np.testing.assert_allclose(ours, exact, rtol=1e-12)
    pristine = reference("ddim", config, exact_schedule=False).alphas_cumprod.numpy()
    # float32 cumprod of 1000 factors: 9e-7 measured. The cosine schedule's betas reach
    # 0.999, where 1 - beta keeps 4 float32 digits: 1.3e-5 measured at its tail.
    rtol = 3e-5 if schedule == "squaredcos_cap_v2" else 2e-6
    np.testing.assert_allclose(pristine, exact, rtol=rtol)


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("ddim", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}),
        ("ddim", {"clip_sample": True, "set_alpha_to_one": True, "prediction_type": "sample"}),
        ("ddpm", {"clip_sample": True, "beta_schedule": "squaredcos_cap_v2"}),
        ("plms", {"set_alpha_to_one": True, "beta_schedule": "linear"}),
        ("euler", {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"}),
        ("euler_a", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}),
        # diffusers truncates (not rounds) Karras timesteps for the cosine schedule
        ("dpmpp_2m_karras", {"beta_schedule": "squaredcos_cap_v2"}),
        ("unipc", {"beta_schedule": "linear", "steps_offset": 0}),
        ("lcm", {"clip_sample": True, "prediction_type": "sample"}),
        # at SD's defaults (t >= 19, scaling 10) c_skip < 1e-5; make the boundary condition count
        ("lcm", {"timestep_scaling": 0.05, "original_inference_steps": 100}),
    ],
)
def test_other_configs_match_diffusers(
    name: str, overrides: dict[str, Any], ref_noise: Any
) -> None:
    config = sd_config(**overrides)
    for steps in (4, 15):
        compare(name, config, steps, ref_noise)


@pytest.mark.parametrize("name", list(REFERENCE))
@pytest.mark.parametrize(
    ("steps", "strength", "spacing"),
    [(20, 0.6, "leading"), (7, 0.3, "trailing"), (3, 1.0, "linspace")],
)
def test_img2img_matches_diffusers(
    name: str, steps: int, strength: float, spacing: str, ref_noise: Any
) -> None:
    check_img2img(name, steps, strength, spacing, ref_noise)


def test_img2img_starts_at_the_begin_index_when_timesteps_repeat(ref_noise: Any) -> None:
    """Rounded Karras timesteps repeat at the low end (50 steps: ..., 2, 1, 1, 0): starting
    at the second 1 must use its own sigma, not the first one's, so lookup by value is not
    enough; diffusers and we go by the begin index."""
    ours = make_scheduler("dpmpp_2m_karras", sd_config())
    ours.set_timesteps(50)
    assert ours.timesteps[47] == ours.timesteps[48]
    check_img2img("dpmpp_2m_karras", 50, 0.05, "leading", ref_noise)  # starts at 48


def check_img2img(name: str, steps: int, strength: float, spacing: str, ref_noise: Any) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline

    config = sd_config(timestep_spacing=spacing)
    ours, ref = make_scheduler(name, config), reference(name, config)
    ts_ours, start = img2img_timesteps(ours, steps, strength)
    ref.set_timesteps(steps)
    pipe = SimpleNamespace(scheduler=ref)
    ts_ref, n_ref = StableDiffusionImg2ImgPipeline.get_timesteps(pipe, steps, strength, "cpu")
    np.testing.assert_array_equal(
        np.asarray(ts_ours, np.float32), ts_ref.numpy().astype(np.float32)
    )
    assert start == (steps - n_ref) * ours.order == len(ours.timesteps) - len(ts_ours)

    rng = np.random.default_rng(7)
    image = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    noisy = ours.add_noise(image, noise, ts_ours[0])
    noisy_ref = ref.add_noise(
        torch.from_numpy(image), torch.from_numpy(noise), ts_ref[:1].repeat(SHAPE[0])
    )
    assert noisy.dtype == np.float32
    assert rel_err(noisy, noisy_ref) <= RTOL
    assert rel_err(noisy, image) > 0.01  # it did add noise

    if name == "lms" and start > 0:
        return  # diffusers' LMS warm-up is wrong after set_begin_index: see the next test
    err = run_both(ours, ref, ref_noise, timesteps=(ts_ours, ts_ref), start=noisy)
    assert err <= RTOL


def test_lms_img2img_starts_first_order() -> None:
    """After set_begin_index our LMS grows its order from 1, so its first step is Euler's.

    diffusers' LMSDiscreteScheduler takes the order min(step_index + 1, 4) and pairs those
    coefficients with the one derivative it has: not a linear multistep method.
    """
    config = sd_config()
    ours = make_scheduler("lms", config)
    ts, start = img2img_timesteps(ours, 20, 0.5)
    euler = reference("euler", config)
    euler.set_timesteps(20)
    euler.set_begin_index(start)
    x = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32) * 3
    t = ts[0]
    ours_out = ours.step(fake_unet(ours.scale_model_input(x, t), t), t, x)
    x_ref = torch.from_numpy(x)
    out_ref = fake_unet(euler.scale_model_input(x_ref, torch.tensor(t)).numpy(), t)
    euler_out = euler.step(torch.from_numpy(out_ref), torch.tensor(t), x_ref).prev_sample
    assert rel_err(ours_out, euler_out) <= RTOL


def test_registry_covers_every_sampler() -> None:
    assert SAMPLER_NAMES == tuple(REFERENCE)
    assert set(SAMPLERS) == set(SAMPLER_NAMES)
    for spec in SAMPLERS.values():
        assert spec.description and "\n" not in spec.description


def test_unknown_sampler_is_a_request_error() -> None:
    with pytest.raises(RequestError) as info:
        make_scheduler("euler_ancestral", sd_config())
    message = str(info.value)
    assert "\n" not in message and "euler_ancestral" in message
    for name in SAMPLER_NAMES:
        assert name in message


@pytest.mark.parametrize(
    ("name", "overrides", "steps"),
    [
        ("euler_a", {"prediction_type": "sample"}, 10),  # diffusers does not implement it
        ("plms", {"prediction_type": "sample"}, 10),
        ("ddim", {"prediction_type": "flow"}, 10),
        ("euler", {"timestep_spacing": "karras"}, 10),
        ("ddim", {"beta_schedule": "sigmoid"}, 10),
        ("unipc", {"rescale_betas_zero_snr": True}, 10),
        ("ddim", {}, 0),
        ("ddim", {}, 1001),
        ("lcm", {}, 51),  # beyond the distillation schedule
    ],
)
def test_bad_requests_are_request_errors(name: str, overrides: dict[str, Any], steps: int) -> None:
    with pytest.raises(RequestError):
        make_scheduler(name, sd_config(**overrides)).set_timesteps(steps)


def test_img2img_strength_leaving_no_step_is_a_request_error() -> None:
    sched = make_scheduler("euler", sd_config())
    with pytest.raises(RequestError):
        img2img_timesteps(sched, 10, 0.05)  # int(10 * 0.05) == 0 steps
    with pytest.raises(RequestError):
        img2img_timesteps(sched, 10, 1.5)
    ts, start = img2img_timesteps(sched, 10, 0.1)
    assert (len(ts), start) == (1, 9)


@pytest.mark.parametrize("steps", [61, 103, 499])
def test_trailing_spacing_has_exactly_n_timesteps(steps: int) -> None:
    """np.arange(1000, 0, -1000 / n) has n + 1 points for these n; diffusers then runs an
    extra step at t = -1 (alphas_cumprod[-1], the noisiest level). Ours stops at n."""
    config = sd_config(timestep_spacing="trailing")
    ours, ref = make_scheduler("ddim", config), reference("ddim", config)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert len(ref.timesteps) == steps + 1 and int(ref.timesteps[-1]) == -1
    assert len(ours.timesteps) == steps and ours.timesteps.min() >= 0
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps[:-1].numpy())


@pytest.mark.parametrize("name", ["ddpm", "euler_a", "lcm"])
def test_stochastic_samplers_follow_the_generator(name: str) -> None:
    def run(seed: int) -> np.ndarray:
        sched = make_scheduler(name, sd_config())
        sched.set_timesteps(4)
        rng = np.random.default_rng(seed)
        x = (rng.standard_normal(SHAPE) * sched.init_noise_sigma).astype(np.float32)
        for t in sched.timesteps:
            out = fake_unet(sched.scale_model_input(x, t), t)
            x = sched.step(out, t, x, generator=rng)
        return x

    np.testing.assert_array_equal(run(1), run(1))
    assert rel_err(run(1), run(2)) > 1e-3


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_float16_in_float16_out(name: str) -> None:
    sched = make_scheduler(name, sd_config())
    sched.set_timesteps(3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE).astype(np.float16)
    for t in sched.timesteps:
        model_in = sched.scale_model_input(x, t)
        x = sched.step(fake_unet(model_in, t).astype(np.float16), t, x, generator=rng)
        assert model_in.dtype == x.dtype == np.float16
    assert np.isfinite(x).all()


def test_runtime_imports_without_torch() -> None:
    code = (
        "import sys, sd_deploy.runtime.schedulers as s; s.make_scheduler('unipc', {});"
        "bad = [m for m in ('torch', 'diffusers', 'scipy') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
