"""txt2img / img2img from an engine dir, in numpy: the part services embed.

    pipe = Pipeline("engines/", backend="auto")
    result = pipe.generate(GenerationRequest(prompt="a red circle", seed=1))
    result.images          # [B, H, W, 3] uint8
    result.parameters[i]   # what image i was made with (its own seed, sampler, ...)

Thread safety: a Pipeline holds backend sessions and no per-request state, but the
sessions of some backends are not safe to run concurrently; use one Pipeline per
thread, or serialise calls to one. Requests never share random state: image i of a
request with seed s is drawn from its own generator seeded s + i, so any image can be
reproduced alone, and `generate_many` can batch several callers' requests together.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sd_deploy.engine_dir import shapes
from sd_deploy.engine_dir.layout import export_command, needed_components
from sd_deploy.engine_dir.manifest import Manifest, read_manifest
from sd_deploy.errors import GenerationCancelled, NonFiniteOutputError, RequestError
from sd_deploy.runtime.backends import Backend, ComponentSession, select_backend
from sd_deploy.runtime.images import prepare_init_image, to_uint8
from sd_deploy.runtime.infotext import model_display_name, model_short_hash
from sd_deploy.runtime.lora import PipelineLoras, extract_lora_tags, resolve_request_loras
from sd_deploy.runtime.prompts import PromptEncoder, encode_chunks
from sd_deploy.runtime.request import (
    BackendOptions,
    GenerationRequest,
    GenerationResult,
    ImageParameters,
    ProgressCallback,
    ResolvedRequest,
)
from sd_deploy.runtime.schedulers import img2img_timesteps, make_scheduler
from sd_deploy.runtime.tokenizer import CLIPTokenizer

# numpy's generators take any non-negative int; A1111 seeds are 32-bit, ours may be 63-bit.
MAX_SEED = 2**63 - 1

log = logging.getLogger("sd_deploy")


@dataclass(frozen=True)
class _Row:
    """One image of a batched generation: its own prompt pair, seed and init image."""

    prompt: str
    negative_prompt: str
    seed: int
    init_image: np.ndarray | None
    time_ids: tuple[float, ...] = ()  # SDXL's size conditioning


def _rows(requests: Sequence[ResolvedRequest]) -> list[_Row]:
    return [
        _Row(r.prompt, r.negative_prompt, r.seed + i, r.init_image, r.time_ids)
        for r in requests
        for i in range(r.batch)
    ]


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


class Pipeline:
    """Stable Diffusion from an engine dir on one backend."""

    def __init__(
        self,
        engine_dir: str | Path,
        backend: str | Backend = "auto",
        options: BackendOptions | None = None,
        keep_loaded: bool = True,
    ) -> None:
        """`backend`: a name (`sd-run --help` lists them; "auto" picks and says why) or a
        Backend object. `keep_loaded=False` frees each component as soon as a generation is
        done with it, so at most one is resident at a time: the lowest peak memory for
        one-shot use (sd-run), at the price of reloading every component on the next call."""
        self.engine_dir = Path(engine_dir)
        self.keep_loaded = keep_loaded
        self.options = options or BackendOptions()
        self.manifest: Manifest = read_manifest(self.engine_dir)
        if isinstance(backend, str):
            self.backend, self.backend_reason = select_backend(
                backend, self.engine_dir, self.manifest, self.options
            )
        else:
            self.backend, self.backend_reason = backend, "given"
        tok = self.manifest.tokenizer
        self.tokenizer = CLIPTokenizer.from_dir(
            self.engine_dir / tok.path, max_length=tok.max_length, pad_token_id=tok.pad_token_id
        )
        unet = self.manifest.components.get("unet")
        # Prompt chunks the UNet's context takes (1 for engine dirs from before long prompts).
        self.max_prompt_chunks = 1 if unet is None else shapes.max_context_chunks(unet.shape_ranges)
        # SDXL: two text towers (text_encoder_2 padded as tokenizer_2 says; both use the same
        # CLIP BPE files), a pooled embedding and size conditioning into the UNet.
        self.sdxl = self.manifest.model.pooled_embed_dim > 0
        text = self.manifest.components.get("text_encoder")
        self._has_clip_skip = text is not None and any(i.name == "clip_skip" for i in text.inputs)
        prov = self.manifest.provenance
        self._model_name = model_display_name(prov.get("source")) or self.manifest.model.family
        self._model_hash = model_short_hash(prov.get("source_sha256"))
        self._sessions: dict[str, ComponentSession] = {}
        self.timings: dict[str, float] = {}  # seconds each component took to load
        # Run-time LoRAs (--lora-ready engine dirs): patched sessions per LoRA set (LRU).
        # `lora_dirs`: where `<lora:name:scale>` prompt tags look for name.safetensors.
        self.lora = PipelineLoras(
            self.engine_dir,
            self.backend,
            self.manifest.components.__getitem__,
            self._session,
            workers=self.options.threads or len(os.sched_getaffinity(0)),
        )
        self.lora_dirs: list[Path] = [Path.cwd()]
        self._merged_loras = [dict(x) for x in prov.get("loras") or ()]

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- components ---------------------------------------------------------------------

    def _session(self, name: str) -> ComponentSession:
        """The component's session, loaded on first use (vae_encoder only for img2img); the
        active run-time LoRA set's session for the unet / text_encoder it patches."""
        patched = self.lora.session(name)
        if patched is not None:
            return patched
        if name not in self._sessions:
            spec = self.manifest.components.get(name)
            if spec is None:
                raise RequestError(
                    f"{self.engine_dir} has no {name} (export it: {export_command(name)})"
                )
            start = time.perf_counter()
            self._sessions[name] = self.backend.open(self.engine_dir, spec)
            self.timings[f"load_{name}"] = time.perf_counter() - start
        return self._sessions[name]

    def load_all(self) -> None:
        """Load every component now (otherwise loading happens on first use)."""
        for name in self.manifest.components:
            self._session(name)

    def run_component(self, name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one component on its own, inputs cast to the manifest's dtypes and outputs
        checked for NaN/Inf: the lower-level call parity checks and benchmarks use."""
        return self._run(name, {}, False, inputs)

    def _run(
        self, name: str, timings: dict[str, float], last: bool, inputs: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Run a component with inputs cast to its declared dtypes; refuse NaN/Inf outputs.

        `last`: the generation needs the component no more after this call, so its
        scratch memory goes back and, unless components stay loaded, the component too."""
        start = time.perf_counter()
        session = self._session(name)
        timings["load"] = timings.get("load", 0.0) + time.perf_counter() - start
        feeds = {
            s.name: np.ascontiguousarray(inputs[s.name], dtype=s.dtype) for s in session.spec.inputs
        }
        start = time.perf_counter()
        outputs = session.run(feeds, release_scratch=last)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
        if last and not self.keep_loaded:
            start = time.perf_counter()
            if self._sessions.get(name) is session:
                self._sessions.pop(name).close()
            else:
                self.lora.release(name)
            # Freeing is the library's work (OpenVINO unmapping a 3.4 GB UNet: seconds on
            # a loaded machine), counted with loading, not as the runtime's own.
            timings["load"] = timings.get("load", 0.0) + time.perf_counter() - start
        for key, value in outputs.items():
            if not np.isfinite(value).all():
                raise NonFiniteOutputError(
                    f"{name} produced NaN/Inf in {key} (fp16 overflow? try the fp32 export)"
                )
        return outputs

    def _graph_precision(self) -> str:
        """The UNet graph's precision as exported: what most of the compute is in."""
        unet = self.manifest.components.get("unet")
        return unet.precision if unet is not None else ""

    def close(self) -> None:
        self.lora.close()
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()

    # -- requests ---------------------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> ResolvedRequest:
        """Fill defaults from the manifest and refuse impossible requests before any work."""
        m, sched = self.manifest.model, self.manifest.scheduler
        if not isinstance(request.prompt, str):
            raise RequestError(f"prompt must be a string, got {type(request.prompt).__name__}")
        if not isinstance(request.negative_prompt, str):
            raise RequestError(
                f"negative_prompt must be a string, got {type(request.negative_prompt).__name__}"
            )
        init = None
        if request.init_image is not None:
            init = np.asarray(request.init_image)
            if init.dtype != np.uint8 or init.ndim != 3 or init.shape[2] != 3 or not init.size:
                raise RequestError(
                    f"init_image must be an HxWx3 uint8 RGB array, got {init.dtype} {init.shape}"
                )
        height, width = request.height, request.width
        if init is not None:
            height = height or init.shape[0] // 8 * 8
            width = width or init.shape[1] // 8 * 8
        height = m.default_height if height is None else height
        width = m.default_width if width is None else width
        steps = sched.get("default_steps", 30) if request.steps is None else request.steps
        guidance = (
            sched.get("default_guidance", 7.5) if request.guidance is None else request.guidance
        )
        sampler = request.sampler or sched.get("default_sampler", "euler_a")
        for what, value in (("width", width), ("height", height), ("batch", request.batch)):
            if not _is_int(value):
                raise RequestError(f"{what} must be an integer, got {value!r}")
        if not _is_int(steps) or steps < 1:
            raise RequestError(f"steps must be an integer >= 1, got {steps!r}")
        if not isinstance(guidance, int | float) or not np.isfinite(guidance) or guidance < 0:
            raise RequestError(f"guidance must be a finite number >= 0, got {guidance!r}")
        if request.batch < 1:
            raise RequestError(f"batch must be >= 1, got {request.batch}")
        seed = request.seed
        if seed is not None and not _is_int(seed):
            raise RequestError(f"seed must be an integer, got {seed!r}")
        if seed is None or seed < 0:
            seed = int(np.random.SeedSequence().entropy % (2**31))  # type: ignore[operator]
        if seed + request.batch - 1 > MAX_SEED:
            raise RequestError(f"seed must be at most {MAX_SEED - request.batch + 1}, got {seed}")
        strength = None
        if init is not None:
            if not isinstance(request.strength, int | float) or not 0.0 < request.strength <= 1.0:
                raise RequestError(f"strength must be in (0, 1], got {request.strength!r}")
            strength = float(request.strength)
        make_scheduler(sampler, sched)  # unknown sampler -> one-line error listing names
        clip_skip = self._check_clip_skip(request.clip_skip)
        if not isinstance(request.emphasis, bool | np.bool_):
            raise RequestError(f"emphasis must be True or False, got {request.emphasis!r}")
        self._check_size(int(request.batch), int(height), int(width), float(guidance) > 1.0, init)
        prompt, tags = extract_lora_tags(request.prompt)
        loras = resolve_request_loras(request.loras, tags, self.lora_dirs, self._merged_loras)
        self.lora.check(loras)  # a bad LoRA fails here, before any work
        time_ids = self._time_ids(request, int(height), int(width)) if self.sdxl else ()
        return ResolvedRequest(
            prompt=prompt,
            negative_prompt=request.negative_prompt,
            width=int(width),
            height=int(height),
            steps=int(steps),
            guidance=float(guidance),
            sampler=sampler,
            seed=int(seed),
            batch=int(request.batch),
            init_image=init,
            strength=strength,
            clip_skip=clip_skip,
            emphasis=bool(request.emphasis),
            loras=tuple((str(spec.path), spec.scale) for spec in loras),
            time_ids=time_ids,
        )

    @staticmethod
    def _time_ids(request: GenerationRequest, height: int, width: int) -> tuple[float, ...]:
        """SDXL's time_ids row: original size, crop top-left, target size (diffusers'
        defaults: the image size and (0, 0))."""
        values: list[float] = []
        for what, pair in (
            ("original_size", request.original_size or (height, width)),
            ("crop_top_left", request.crop_top_left),
            ("target_size", request.target_size or (height, width)),
        ):
            if (
                not isinstance(pair, tuple | list)
                or len(pair) != 2
                or not all(_is_int(v) and 0 <= v <= 16384 for v in pair)
            ):
                raise RequestError(f"{what} must be two integers (height, width), got {pair!r}")
            values.extend(float(v) for v in pair)
        return tuple(values)

    def _check_clip_skip(self, clip_skip: object) -> int:
        """A1111's Clip skip: 1 (last layer) .. the text encoder's layers; SD 2.x ignores it."""
        if clip_skip is None:
            return 1
        if not _is_int(clip_skip) or int(clip_skip) < 1:  # type: ignore[call-overload]
            raise RequestError(f"clip_skip must be an integer >= 1, got {clip_skip!r}")
        value = int(clip_skip)  # type: ignore[call-overload]
        if value == 1:
            return 1
        m = self.manifest.model
        if m.fixed_text_layer:
            log.warning(
                "clip skip %d ignored: %s conditions on a fixed text-encoder layer (SD 2.x's "
                "penultimate), as in A1111",
                value,
                m.family,
            )
            return 1
        if not self._has_clip_skip:
            raise RequestError(
                f"clip skip {value}: the text encoder of {self.engine_dir} was exported without "
                f"a clip_skip input (re-export it: {export_command('text_encoder')})"
            )
        if value > m.clip_skip_max:
            raise RequestError(
                f"clip skip {value} is more than the text encoder's {m.clip_skip_max} layers"
            )
        return value

    def _check_size(
        self, batch: int, height: int, width: int, guided: bool, init: np.ndarray | None
    ) -> None:
        """Refuse a batch or size outside what the engine dir (and the backend) can run."""
        needed = needed_components(init is not None, self.sdxl)
        for name in needed:
            if name not in self.manifest.components:
                raise RequestError(
                    f"{self.engine_dir} has no {name} (export it: {export_command(name)})"
                )
        ranges = shapes.request_ranges(self.manifest, needed)
        shapes.check_request(ranges, batch, height, width, f"the engine dir {self.engine_dir}")
        self.backend.check_request(batch, height, width, guided)

    # -- generation -----------------------------------------------------------------------

    def generate(
        self,
        request: GenerationRequest,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        """Make `request.batch` images. `progress(step, steps)` is called after each step;
        returning False (or setting `cancel`) stops at the next step with
        GenerationCancelled."""
        start = time.perf_counter()
        resolved = self.validate(request)
        result = self._generate(resolved, _rows([resolved]), progress, cancel, None)
        result.timings["total"] = time.perf_counter() - start
        return result

    def generate_many(
        self,
        requests: Sequence[GenerationRequest],
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> list[GenerationResult]:
        """One result per request, in order. Requests with the same `batch_key()` (size,
        steps, sampler, guidance, strength) run as one batched generation, split only where
        the engines' batch range ends; each request keeps its own prompts and seeds, so each
        image is the one the request gives alone (to within the backend's batch invariance:
        docs/runtime-api.md). Every request is validated before any work."""
        start = time.perf_counter()
        resolved = [self.validate(r) for r in requests]
        groups: dict[tuple[object, ...], list[int]] = {}
        for index, r in enumerate(resolved):
            groups.setdefault(r.batch_key(), []).append(index)
        results: list[GenerationResult | None] = [None] * len(resolved)
        for indices in groups.values():
            for chunk in self._fit_batches([resolved[i] for i in indices], indices):
                batch = [resolved[i] for i in chunk]
                merged = self._generate(batch[0], _rows(batch), progress, cancel, None)
                offset = 0
                for i in chunk:
                    n = resolved[i].batch
                    results[i] = GenerationResult(
                        merged.images[offset : offset + n],
                        merged.parameters[offset : offset + n],
                        dict(merged.timings),
                    )
                    offset += n
        total = time.perf_counter() - start
        done = [result for result in results if result is not None]
        for result in done:
            result.timings["total"] = total
        return done

    def _fit_batches(
        self, group: Sequence[ResolvedRequest], indices: Sequence[int]
    ) -> list[list[int]]:
        """Split a group of compatible requests into batches the engines can take whole."""
        first = group[0]
        needed = needed_components(first.init_image is not None, self.sdxl)
        limit = shapes.request_ranges(self.manifest, needed).batch.max
        while limit > 1:  # a backend's own limit (a TensorRT profile) may be lower
            try:
                self.backend.check_request(limit, first.height, first.width, first.guided)
                break
            except RequestError:
                limit -= 1
        chunks: list[list[int]] = [[]]
        size = 0
        for index, r in zip(indices, group, strict=True):
            if chunks[-1] and size + r.batch > limit:
                chunks.append([])
                size = 0
            chunks[-1].append(index)
            size += r.batch
        return chunks

    def generate_from_noise(
        self,
        requests: GenerationRequest | Sequence[GenerationRequest],
        initial_noise: np.ndarray,
        progress: ProgressCallback | None = None,
    ) -> GenerationResult:
        """Requests of one `batch_key()` as one batch starting from given latents [B, C, h, w]
        instead of seeded noise: parity tests and benchmarks feed PyTorch and the engines the
        same noise this way (later noise, for ancestral samplers and img2img, still comes
        from the seeds)."""
        start = time.perf_counter()
        if isinstance(requests, GenerationRequest):
            requests = [requests]
        resolved = [self.validate(r) for r in requests]
        if len({r.batch_key() for r in resolved}) != 1:
            raise RequestError("requests given one initial noise must agree on size and sampling")
        result = self._generate(resolved[0], _rows(resolved), progress, None, initial_noise)
        result.timings["total"] = time.perf_counter() - start
        return result

    def _generate(
        self,
        common: ResolvedRequest,
        rows: Sequence[_Row],
        progress: ProgressCallback | None,
        cancel: threading.Event | None,
        initial_noise: np.ndarray | None,
    ) -> GenerationResult:
        """The sampler loop over `rows`, which share `common`'s size, steps, sampler,
        guidance and strength."""
        start = time.perf_counter()
        batch, guided = len(rows), common.guided
        timings: dict[str, float] = {}
        m = self.manifest.model
        latent_shape = (
            m.latent_channels,
            common.height // m.vae_scale_factor,
            common.width // m.vae_scale_factor,
        )
        rngs = [np.random.default_rng(row.seed) for row in rows]

        def noise() -> np.ndarray:
            return np.stack([r.standard_normal(latent_shape, dtype=np.float32) for r in rngs])

        def stop_requested(step: int) -> None:
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled(f"generation cancelled before step {step + 1}")

        if initial_noise is not None:
            initial_noise = np.asarray(initial_noise, np.float32)
            if initial_noise.shape != (batch, *latent_shape):
                want = (batch, *latent_shape)
                raise RequestError(
                    f"initial noise has shape {initial_noise.shape}, expected {want}"
                )

        stop_requested(0)
        applied = self.lora.select_pairs(common.loras)
        loras = tuple(
            (x["name"], float(x["scale"]), x.get("short_hash", "")) for x in self._merged_loras
        )
        loras += tuple((a.name, a.scale, a.short_hash) for a in applied)
        context, unet_extra = self._context(common, rows, guided, timings)

        scheduler = make_scheduler(common.sampler, self.manifest.scheduler)
        if common.strength is None:
            scheduler.set_timesteps(common.steps)
            timesteps = scheduler.timesteps
            latents = initial_noise if initial_noise is not None else noise()
            latents = latents * np.float32(scheduler.init_noise_sigma)
        else:
            images = np.concatenate(
                [
                    prepare_init_image(row.init_image, common.width, common.height)
                    for row in rows
                    if row.init_image is not None
                ]
            )
            enc = self._run("vae_encoder", timings, True, {"images": images})
            init = (
                enc["latent_mean"].astype(np.float32)
                + enc["latent_std"].astype(np.float32) * noise()
            )
            timesteps, _ = img2img_timesteps(scheduler, common.steps, common.strength)
            start_noise = initial_noise if initial_noise is not None else noise()
            latents = scheduler.add_noise(init, start_noise, timesteps[0])

        for i, t in enumerate(timesteps):
            stop_requested(i)
            model_in = scheduler.scale_model_input(latents, t)
            if guided:
                model_in = np.concatenate([model_in, model_in])
            out = self._run(
                "unet",
                timings,
                i == len(timesteps) - 1,
                {
                    "sample": model_in,
                    "timestep": np.full(model_in.shape[0], t, np.float32),
                    "encoder_hidden_states": context,
                    **unet_extra,
                },
            )["model_output"].astype(np.float32)
            if guided:
                uncond, cond = np.split(out, 2)
                out = uncond + np.float32(common.guidance) * (cond - uncond)
            latents = scheduler.step(out, t, latents, noise=noise()).astype(np.float32)
            if progress is not None and progress(i, len(timesteps)) is False:
                raise GenerationCancelled(f"generation cancelled after step {i + 1}")

        images = self._run("vae_decoder", timings, True, {"latent": latents})["images"]
        timings["total"] = time.perf_counter() - start
        # Tokenizer, scheduler math, noise, casts: the runtime's own cost per call.
        timings["outside_backend"] = timings["total"] - sum(
            v for k, v in timings.items() if k in self.manifest.components or k == "load"
        )
        params = [
            ImageParameters(
                prompt=row.prompt,
                negative_prompt=row.negative_prompt,
                seed=row.seed,
                steps=common.steps,
                sampler=common.sampler,
                guidance=common.guidance,
                width=common.width,
                height=common.height,
                strength=common.strength,
                model=m.family,
                backend=self.backend.name,
                precision=self.backend.compute_precision() or self._graph_precision(),
                clip_skip=common.clip_skip,
                emphasis=common.emphasis,
                model_name=self._model_name,
                model_hash=self._model_hash,
                loras=loras,
            )
            for row in rows
        ]
        return GenerationResult(to_uint8(images), params, timings)

    def prompt_encoder(self, emphasis: bool = True) -> PromptEncoder:
        """Reads prompts A1111's way for this engine dir (chunks up to the UNet's range)."""
        tok = self.tokenizer
        return PromptEncoder(
            tok.text_ids,
            bos_id=tok.bos_token_id,
            eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id,
            comma_id=tok.token_id(",</w>"),
            max_chunks=self.max_prompt_chunks,
            emphasis=emphasis,
        )

    def _context(
        self,
        common: ResolvedRequest,
        rows: Sequence[_Row],
        guided: bool,
        timings: dict[str, float],
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The UNet's context [(2 x) rows, 77 x chunks, dim]: negatives first when guided,
        each chunk through the text encoder, weighted, concatenated along the sequence; and
        the UNet's other inputs (SDXL: text_embeds and time_ids, `_sdxl_context`)."""
        if self.sdxl:
            return self._sdxl_context(common, rows, guided, timings)
        encoder = self.prompt_encoder(common.emphasis)
        chunked = encoder.rows(
            [row.prompt for row in rows],
            [row.negative_prompt for row in rows] if guided else None,
        )
        count = chunked[0].num_chunks
        calls = iter(range(count))
        extra = {}
        if self._has_clip_skip:
            extra["clip_skip"] = np.array([common.clip_skip], np.int32)

        def encode(ids: np.ndarray) -> np.ndarray:
            last = next(calls) == count - 1
            feeds = {"input_ids": ids, **extra}
            return self._run("text_encoder", timings, last, feeds)["text_embeddings"]

        return encode_chunks(chunked, encode, emphasis=common.emphasis), {}

    def _sdxl_context(
        self,
        common: ResolvedRequest,
        rows: Sequence[_Row],
        guided: bool,
        timings: dict[str, float],
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """SDXL: each chunk through both towers, their hidden states concatenated on the last
        axis (then weighted as one context, as A1111); `text_embeds` is the second tower's
        pooled embedding of each row's first chunk. With `zero_negative_for_empty_prompt` an
        empty negative prompt conditions on zeros, context and pooled (sgm / diffusers'
        force_zeros_for_empty_prompt). time_ids: one row per image, the same for its
        negative."""
        encoder = self.prompt_encoder(common.emphasis)
        negatives = [row.negative_prompt for row in rows] if guided else None
        chunked = encoder.rows([row.prompt for row in rows], negatives)
        count = chunked[0].num_chunks
        calls = iter(range(count))
        tok_2 = self.manifest.tokenizer_2
        pad_2 = tok_2.pad_token_id if tok_2 is not None else 0
        eos = self.tokenizer.eos_token_id
        pooled: list[np.ndarray] = []

        def encode(ids: np.ndarray) -> np.ndarray:
            last = next(calls) == count - 1
            first = self._run("text_encoder", timings, last, {"input_ids": ids})
            ids_2 = ids.copy()  # OpenCLIP pads after the first EOS with its own pad id
            first_eos = np.argmax(ids == eos, axis=1)
            ids_2[np.arange(ids.shape[1])[None, :] > first_eos[:, None]] = pad_2
            second = self._run("text_encoder_2", timings, last, {"input_ids": ids_2})
            if not pooled:
                pooled.append(second["text_embeds"].astype(np.float32))
            hidden = [first["text_embeddings"], second["text_embeddings"]]
            return np.concatenate([h.astype(np.float32) for h in hidden], axis=-1)

        context = encode_chunks(chunked, encode, emphasis=common.emphasis)
        text_embeds = pooled[0]
        if guided and self.manifest.model.zero_negative_for_empty_prompt:
            n = len(rows)
            empty = np.array([row.negative_prompt == "" for row in rows])
            context[:n][empty] = 0.0
            text_embeds[:n][empty] = 0.0
        time_ids = np.array([row.time_ids for row in rows], np.float32)
        if guided:
            time_ids = np.concatenate([time_ids, time_ids])
        return context, {"text_embeds": text_embeds, "time_ids": time_ids}
