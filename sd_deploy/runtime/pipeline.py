"""txt2img / img2img from an engine dir, in numpy: the part services embed.

    pipe = Pipeline("engines/", backend="auto")
    result = pipe.generate(GenerationRequest(prompt="a red circle", seed=1))
    result.images          # [B, H, W, 3] uint8
    result.parameters[i]   # what image i was made with (its own seed, sampler, ...)

Thread safety: a Pipeline holds backend sessions and no per-request state, but the
sessions of some backends are not safe to run concurrently; use one Pipeline per
thread (or serialise calls). Requests never share random state: image i of a
request with seed s is drawn from its own generator seeded s + i, so any image can
be reproduced alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sd_deploy.engine_dir import shapes
from sd_deploy.engine_dir.manifest import Manifest, read_manifest
from sd_deploy.errors import NonFiniteOutputError, RequestError
from sd_deploy.runtime.backends import Backend, ComponentSession, select_backend
from sd_deploy.runtime.images import prepare_init_image, to_uint8
from sd_deploy.runtime.schedulers import img2img_timesteps, make_scheduler
from sd_deploy.runtime.tokenizer import CLIPTokenizer

# step index (0-based), total steps, timestep
ProgressCallback = Callable[[int, int, float], None]


@dataclass
class GenerationRequest:
    """One call's worth of work. None means "the engine dir's default"."""

    prompt: str | Sequence[str]
    negative_prompt: str | Sequence[str] = ""
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None
    seed: int | None = None
    batch: int = 1
    init_image: np.ndarray | Image.Image | None = None
    strength: float = 0.8
    # Starting latents [B,C,h,w] instead of seeded noise: parity tests and benchmarks
    # feed PyTorch and the engines the same noise this way.
    initial_noise: np.ndarray | None = None


@dataclass
class GenerationResult:
    images: np.ndarray  # [B, H, W, 3] uint8
    parameters: list[dict[str, Any]]
    # Seconds spent inside each component's backend calls, plus the whole call.
    timings: dict[str, float] = field(default_factory=dict)

    def pil_images(self) -> list[Image.Image]:
        return [Image.fromarray(image) for image in self.images]


def _as_list(value: str | Sequence[str], batch: int, what: str) -> list[str]:
    if isinstance(value, str):
        return [value] * batch
    values = list(value)
    if len(values) == 1:
        return values * batch
    if len(values) != batch:
        raise RequestError(f"{len(values)} {what}s for a batch of {batch}")
    return values


class Pipeline:
    """Stable Diffusion from an engine dir on one backend."""

    def __init__(
        self,
        engine_dir: str | Path,
        backend: str | Backend = "auto",
        keep_loaded: bool = True,
        threads: int | None = None,
        graph_cache: bool = True,
    ) -> None:
        """`keep_loaded=False` frees each component as soon as a generation is done with
        it, so at most one is resident at a time: the lowest peak memory for one-shot use
        (sd-run), at the price of reloading every component on the next call. When `backend`
        is a name, `threads` and `graph_cache` go to ONNX Runtime (select_backend)."""
        self.engine_dir = Path(engine_dir)
        self.keep_loaded = keep_loaded
        self.manifest: Manifest = read_manifest(self.engine_dir)
        if isinstance(backend, str):
            self.backend, self.backend_reason = select_backend(
                backend, self.engine_dir, self.manifest, threads=threads, graph_cache=graph_cache
            )
        else:
            self.backend, self.backend_reason = backend, "given"
        tok = self.manifest.tokenizer
        self.tokenizer = CLIPTokenizer.from_dir(
            self.engine_dir / tok.path, max_length=tok.max_length, pad_token_id=tok.pad_token_id
        )
        self._sessions: dict[str, ComponentSession] = {}
        self.timings: dict[str, float] = {}

    # -- components ---------------------------------------------------------------------

    def session(self, name: str) -> ComponentSession:
        """The component's session, loaded on first use (vae_encoder only for img2img)."""
        if name not in self._sessions:
            spec = self.manifest.components.get(name)
            if spec is None:
                raise RequestError(
                    f"{self.engine_dir} has no {name} (export it: sd-export --component {name})"
                )
            start = time.perf_counter()
            self._sessions[name] = self.backend.open(self.engine_dir, spec)
            self.timings[f"load_{name}"] = time.perf_counter() - start
        return self._sessions[name]

    def load_all(self) -> None:
        """Load every component now (otherwise loading happens on first use)."""
        for name in self.manifest.components:
            self.session(name)

    def run(
        self, name: str, timings: dict[str, float], last: bool = False, **inputs: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Run a component with inputs cast to its declared dtypes; refuse NaN/Inf outputs.

        `last`: the generation needs the component no more after this call, so its
        scratch memory goes back and, unless components stay loaded, the component too."""
        start = time.perf_counter()
        session = self.session(name)
        timings["load"] = timings.get("load", 0.0) + time.perf_counter() - start
        feeds = {
            s.name: np.ascontiguousarray(inputs[s.name], dtype=s.dtype) for s in session.spec.inputs
        }
        start = time.perf_counter()
        outputs = session.run(feeds, release_scratch=last)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
        if last:
            self.done_with(name)
        for key, value in outputs.items():
            if not np.isfinite(value).all():
                raise NonFiniteOutputError(
                    f"{name} produced NaN/Inf in {key} (fp16 overflow? try the fp32 export)"
                )
        return outputs

    def done_with(self, name: str) -> None:
        """This generation needs `name` no more: free it unless components stay loaded."""
        if not self.keep_loaded and name in self._sessions:
            self._sessions.pop(name).close()

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()

    # -- generation -----------------------------------------------------------------------

    def resolve(self, request: GenerationRequest) -> dict[str, Any]:
        """Fill defaults from the manifest and refuse impossible requests before any work."""
        m, sched = self.manifest.model, self.manifest.scheduler
        height = request.height
        width = request.width
        if request.init_image is not None and (height is None or width is None):
            h0, w0 = np.asarray(request.init_image).shape[:2]
            height = height or h0 // 8 * 8
            width = width or w0 // 8 * 8
        p: dict[str, Any] = {
            "height": int(height or m.default_height),
            "width": int(width or m.default_width),
            "steps": request.steps if request.steps is not None else sched.get("default_steps", 30),
            "guidance": float(
                request.guidance
                if request.guidance is not None
                else sched.get("default_guidance", 7.5)
            ),
            "sampler": request.sampler or sched.get("default_sampler", "euler_a"),
            "seed": int(request.seed)
            if request.seed is not None
            else int(np.random.SeedSequence().entropy % (2**31)),  # type: ignore[operator]
            "batch": int(request.batch),
        }
        if not isinstance(p["steps"], int) or p["steps"] < 1:
            raise RequestError(f"steps must be an integer >= 1, got {p['steps']!r}")
        if not np.isfinite(p["guidance"]) or p["guidance"] < 0:
            raise RequestError(f"guidance must be >= 0, got {p['guidance']}")
        if p["batch"] < 1:
            raise RequestError(f"batch must be >= 1, got {p['batch']}")
        if request.init_image is not None and not 0.0 < request.strength <= 1.0:
            raise RequestError(f"strength must be in (0, 1], got {request.strength}")
        make_scheduler(p["sampler"], sched)  # unknown sampler -> one-line error listing names
        needed = ["text_encoder", "unet", "vae_decoder"]
        if request.init_image is not None:
            needed.append("vae_encoder")
        for name in needed:
            spec = self.manifest.components.get(name)
            if spec is None:
                raise RequestError(
                    f"{self.engine_dir} has no {name} (export it: sd-export --component {name})"
                )
            shapes.check_request(spec.shape_ranges, p["batch"], p["height"], p["width"], name)
        self.backend.check_request(p["batch"], p["height"], p["width"], p["guidance"] > 1.0)
        return p

    def generate(
        self, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> GenerationResult:
        """Make `request.batch` images; see the module docstring for reproducibility."""
        start = time.perf_counter()
        p = self.resolve(request)
        batch, guided = p["batch"], p["guidance"] > 1.0
        prompts = _as_list(request.prompt, batch, "prompt")
        negatives = _as_list(request.negative_prompt, batch, "negative prompt")
        timings: dict[str, float] = {}
        m = self.manifest.model
        latent_shape = (
            m.latent_channels,
            p["height"] // m.vae_scale_factor,
            p["width"] // m.vae_scale_factor,
        )
        rngs = [np.random.default_rng(p["seed"] + i) for i in range(batch)]

        def noise() -> np.ndarray:
            return np.stack([r.standard_normal(latent_shape, dtype=np.float32) for r in rngs])

        # Encoded apart so that a truncation warning's "prompt i" is the caller's index.
        ids = self.tokenizer.encode(prompts)
        if guided:
            ids = np.concatenate([self.tokenizer.encode(negatives), ids])
        context = self.run("text_encoder", timings, last=True, input_ids=ids)["text_embeddings"]

        scheduler = make_scheduler(p["sampler"], self.manifest.scheduler)
        if request.init_image is None:
            scheduler.set_timesteps(p["steps"])
            timesteps = scheduler.timesteps
            if request.initial_noise is not None:
                latents = np.asarray(request.initial_noise, np.float32)
                if latents.shape != (batch, *latent_shape):
                    want = (batch, *latent_shape)
                    raise RequestError(f"initial noise has shape {latents.shape}, expected {want}")
            else:
                latents = noise()
            latents = latents * np.float32(scheduler.init_noise_sigma)
        else:
            image = prepare_init_image(request.init_image, p["width"], p["height"])
            batched = np.repeat(image, batch, axis=0)
            enc = self.run("vae_encoder", timings, last=True, images=batched)
            init = (
                enc["latent_mean"].astype(np.float32)
                + enc["latent_std"].astype(np.float32) * noise()
            )
            timesteps, _ = img2img_timesteps(scheduler, p["steps"], request.strength)
            start_noise = request.initial_noise if request.initial_noise is not None else noise()
            latents = scheduler.add_noise(init, np.asarray(start_noise, np.float32), timesteps[0])
            p["strength"] = request.strength

        for i, t in enumerate(timesteps):
            model_in = scheduler.scale_model_input(latents, t)
            if guided:
                model_in = np.concatenate([model_in, model_in])
            out = self.run(
                "unet",
                timings,
                last=i == len(timesteps) - 1,
                sample=model_in,
                timestep=np.full(model_in.shape[0], t, np.float32),
                encoder_hidden_states=context,
            )["model_output"].astype(np.float32)
            if guided:
                uncond, cond = np.split(out, 2)
                out = uncond + np.float32(p["guidance"]) * (cond - uncond)
            latents = scheduler.step(out, t, latents, noise=noise()).astype(np.float32)
            if progress is not None:
                progress(i, len(timesteps), float(t))

        images = self.run("vae_decoder", timings, last=True, latent=latents)["images"]
        timings["total"] = time.perf_counter() - start
        # Tokenizer, scheduler math, noise, casts: the runtime's own cost per call.
        timings["outside_backend"] = timings["total"] - sum(
            v for k, v in timings.items() if k in self.manifest.components or k == "load"
        )
        params = [
            {
                **p,
                "prompt": prompts[i],
                "negative_prompt": negatives[i],
                "seed": p["seed"] + i,
                "init_image": request.init_image is not None,
                "model": self.manifest.model.family,
                "backend": self.backend.name,
            }
            for i in range(batch)
        ]
        return GenerationResult(to_uint8(images), params, timings)
