"""ONNX Runtime backend: CPU, CUDA, or TensorRT execution providers.

onnxruntime is imported when a backend is created, never at module import, so
`sd_deploy.runtime` stays light.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sd_deploy.engine_dir.manifest import ComponentSpec
from sd_deploy.errors import UserError, first_line
from sd_deploy.runtime.backends.base import Backend, ComponentSession
from sd_deploy.runtime.backends.ort_graph_cache import SAVE_EXTERNAL_DATA, GraphCache
from sd_deploy.runtime.backends.ort_patch_map import PatchMap
from sd_deploy.runtime.weight_patch import WeightPatch, stored_arrays

log = logging.getLogger("sd_deploy")

# RunOptions key: free the CPU arena's unused regions when the run ends.
ARENA_SHRINKAGE = "memory.enable_memory_arena_shrinkage"

# Our names for provider choices -> ONNX Runtime provider lists (first available wins).
PROVIDER_CHOICES: dict[str, tuple[str, ...]] = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}


SWITCH_HINT = (
    "keep one: pip uninstall -y onnxruntime onnxruntime-gpu, then pip install "
    "'sd-deploy[ort-gpu]' for CUDA/TensorRT or 'sd-deploy[ort]' for CPU only"
)


def installed_onnxruntime_distributions() -> list[str]:
    """Which of the two ONNX Runtime distributions are installed ('onnxruntime' is the CPU
    build, 'onnxruntime-gpu' the CUDA + TensorRT one; both install the same package)."""
    from importlib import metadata

    found = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def import_onnxruntime() -> Any:
    """onnxruntime, or a one-line UserError: not installed, or both builds installed (they
    overwrite each other's files, so which providers exist depends on install order)."""
    if len(installed_onnxruntime_distributions()) > 1:
        raise UserError(f"onnxruntime and onnxruntime-gpu are both installed; {SWITCH_HINT}")
    try:
        import onnxruntime
    except ImportError:
        raise UserError(
            "onnxruntime is not installed: pip install 'sd-deploy[ort]' (CPU) or "
            "'sd-deploy[ort-gpu]' (CUDA/TensorRT)"
        ) from None
    return onnxruntime


def available_providers() -> list[str]:
    return list(import_onnxruntime().get_available_providers())


class OnnxRuntimeSession(ComponentSession):
    def __init__(self, spec: ComponentSpec, session: Any, release_options: Any) -> None:
        """`release_options`: RunOptions that shrink the CPU arena once the run ends
        (None: nothing to shrink)."""
        super().__init__(spec)
        self.session = session
        self.release_options = release_options
        self.output_names = [o.name for o in spec.outputs]
        self.keep_alive: Any = None  # buffers a patched session's weights live in
        self.from_graph_cache = False  # a patched session made from the optimized-graph cache
        self.timings: dict[str, float] = {}  # a patched session: computing weights, loading

    def run(
        self, feeds: Mapping[str, np.ndarray], release_scratch: bool = False
    ) -> dict[str, np.ndarray]:
        options = self.release_options if release_scratch else None
        outputs = self.session.run(self.output_names, dict(feeds), options)
        return dict(zip(self.output_names, outputs, strict=True))

    def close(self) -> None:
        """Drop the InferenceSession: ONNX Runtime frees its weights and buffers with it."""
        self.session = None
        self.keep_alive = None


class OnnxRuntimeBackend(Backend):
    """Runs the ONNX graphs with ONNX Runtime on the chosen execution provider."""

    name = "onnxruntime"

    def __init__(
        self,
        provider: str = "auto",
        threads: int | None = None,
        graph_cache: bool = True,
    ) -> None:
        """`graph_cache`: on the CPU provider, keep ONNX Runtime's optimized graphs in the
        engine dir (see ort_graph_cache) so later loads skip the optimization."""
        ort = import_onnxruntime()
        available = ort.get_available_providers()
        if provider == "auto":
            provider = "cuda" if "CUDAExecutionProvider" in available else "cpu"
        if provider not in PROVIDER_CHOICES:
            raise UserError(
                f"unknown ONNX Runtime provider {provider!r}; choose from "
                f"{', '.join(PROVIDER_CHOICES)} or auto"
            )
        wanted = PROVIDER_CHOICES[provider][0]
        if wanted not in available:
            raise UserError(
                f"ONNX Runtime here has no {wanted} (available: {', '.join(available)}); "
                f"for GPU providers {SWITCH_HINT} (docs/tensorrt.md)"
            )
        self.provider = provider
        self.providers = [p for p in PROVIDER_CHOICES[provider] if p in available]
        self.threads = threads
        self.graph_cache = graph_cache and self.providers[0] == "CPUExecutionProvider"
        self._ort = ort
        # Only the CPU provider keeps activations in the CPU arena; on a GPU it holds
        # little, and shrinking is an error where no CPU arena is registered.
        self.release_options: Any = None
        if self.providers[0] == "CPUExecutionProvider":
            self.release_options = ort.RunOptions()
            self.release_options.add_run_config_entry(ARENA_SHRINKAGE, "cpu:0")

    def describe(self) -> str:
        return f"onnxruntime {self._ort.__version__} ({', '.join(self.providers)})"

    def provider_options(self, engine_dir: Path, spec: ComponentSpec) -> list[Any]:
        """Per-provider options; the TensorRT EP gets fp16, a cache dir and profile shapes."""
        result: list[Any] = []
        for name in self.providers:
            if name != "TensorrtExecutionProvider":
                result.append(name)
                continue
            cache = engine_dir / spec.name / "ort_trt_cache"
            cache.mkdir(parents=True, exist_ok=True)
            profile = {
                key: ",".join(
                    f"{inp}:{'x'.join(map(str, dims[key]))}"
                    for inp, dims in spec.profile_shapes.items()
                )
                for key in ("min", "opt", "max")
            }
            result.append(
                (
                    name,
                    {
                        "trt_fp16_enable": spec.precision == "fp16",
                        "trt_engine_cache_enable": True,
                        "trt_engine_cache_path": str(cache),
                        "trt_timing_cache_enable": True,
                        "trt_profile_min_shapes": profile["min"],
                        "trt_profile_opt_shapes": profile["opt"],
                        "trt_profile_max_shapes": profile["max"],
                    },
                )
            )
        return result

    def session_options(self, optimize: bool = True) -> Any:
        options = self._ort.SessionOptions()
        options.log_severity_level = 3
        level = self._ort.GraphOptimizationLevel
        # A cached graph is already optimized: loading it must not rewrite it again.
        options.graph_optimization_level = (
            level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
        )
        # The CPU arena stays on (ONNX Runtime's default): without it every large
        # activation is a fresh mmap, and the page faults cost the SD 1.5 UNet a tenth of
        # each step (benchmarks/results/sd15-cpu/README.md). Its memory goes back through
        # release_scratch at a generation's last call of each component.
        if self.threads:
            options.intra_op_num_threads = self.threads
        return options

    def create(self, path: Path, options: Any, engine_dir: Path, spec: ComponentSpec) -> Any:
        try:
            return self._ort.InferenceSession(
                os.fspath(path), options, providers=self.provider_options(Path(engine_dir), spec)
            )
        except Exception as exc:  # ORT raises its own exception types for corrupt graphs
            raise UserError(f"cannot load {path} with ONNX Runtime: {first_line(exc)}") from None

    def open(self, engine_dir: Path, spec: ComponentSpec) -> ComponentSession:
        path = Path(engine_dir) / spec.onnx
        if self.graph_cache:
            session = self.open_through_cache(path, Path(engine_dir), spec)
        else:
            session = self.create(path, self.session_options(), engine_dir, spec)
        return OnnxRuntimeSession(spec, session, self.release_options)

    def open_patched(
        self, engine_dir: Path, spec: ComponentSpec, patches: Mapping[str, WeightPatch]
    ) -> ComponentSession:
        """A session of the component with some initializers patched (run-time LoRAs).

        From the optimized-graph cache when every patched initializer can be placed in it
        (`ort_patch_map`): no optimizing, and the patched arrays are computed in the cached
        layout and given with `add_initializer`, which ONNX Runtime runs in place (they live
        as long as the session). Otherwise from the source: the arrays go in as external
        initializers of an all-external (`--lora-ready`) graph, which ONNX Runtime copies
        and optimizes as if they were on disk. (`add_initializer` arrays are not seen by the
        CPU provider's NCHWc conv rewrite, and copying 3.4 GB costs the SD 1.5 UNet ~4 s.)
        """
        start = time.perf_counter()
        engine_dir = Path(engine_dir)
        workers = self.threads or len(os.sched_getaffinity(0))
        cached = self.cached_patch_map(engine_dir, spec, patches)
        keep_alive: Any = None  # external initializers are copied when the session loads
        if cached is not None:
            graph, options = cached.graph, self.session_options(optimize=False)
            arrays = cached.materialize(patches, workers)
        else:
            graph, options = engine_dir / spec.onnx, self.session_options()
            arrays = stored_arrays(patches, workers)
        values = {n: self._ort.OrtValue.ortvalue_from_numpy(a) for n, a in arrays.items()}
        if cached is not None:
            for name, value in values.items():
                options.add_initializer(name, value)
            keep_alive = (arrays, values)  # ONNX Runtime reads the weights from these
        elif values:
            options.add_external_initializers(list(values), list(values.values()))
        patched = time.perf_counter()
        session = self.create(graph, options, engine_dir, spec)
        result = OnnxRuntimeSession(spec, session, self.release_options)
        result.keep_alive = keep_alive
        result.from_graph_cache = cached is not None
        result.timings = {"patch_s": patched - start, "session_s": time.perf_counter() - patched}
        return result

    def cached_patch_map(
        self, engine_dir: Path, spec: ComponentSpec, patches: Mapping[str, WeightPatch]
    ) -> PatchMap | None:
        """Where each patched initializer sits in the cached optimized graph, or None: use
        the source."""
        if not self.graph_cache:
            return None
        cache = GraphCache(engine_dir, spec, self._ort.__version__)
        if not cache.graph.is_file():
            return None
        try:
            places = PatchMap.load_or_build(
                cache.entry, engine_dir / spec.onnx, patches, lambda n: patches[n].base
            )
        except (OSError, ValueError) as exc:  # a damaged entry: the source graph still works
            log.debug("patched %s from its source graph: %s", spec.name, first_line(exc))
            return None
        return places if places.covers(patches) else None

    def open_through_cache(self, path: Path, engine_dir: Path, spec: ComponentSpec) -> Any:
        """Load the cached optimized graph, writing it first when there is none (or a damaged
        one); the source graph when it cannot be written."""
        cache = GraphCache(engine_dir, spec, self._ort.__version__)
        if cache.graph.is_file():
            session = self.load_cached(cache, engine_dir, spec)
            if session is not None:
                return session
        try:
            written = self.write_cache(cache, path, engine_dir, spec)
        except UserError:
            # Writing may be what failed; without it, a bad graph still fails plainly.
            session = self.create(path, self.session_options(), engine_dir, spec)
            log.warning(
                "could not write ONNX Runtime's optimized %s graph to %s", spec.name, cache.root
            )
            return session
        if written:
            session = self.load_cached(cache, engine_dir, spec)
            if session is not None:
                return session
        return self.create(path, self.session_options(), engine_dir, spec)

    def load_cached(self, cache: GraphCache, engine_dir: Path, spec: ComponentSpec) -> Any:
        """A session of the cached graph; None, the entry removed, when it does not load."""
        try:
            return self.create(cache.graph, self.session_options(optimize=False), engine_dir, spec)
        except UserError:
            cache.discard()
            return None

    def write_cache(
        self, cache: GraphCache, path: Path, engine_dir: Path, spec: ComponentSpec
    ) -> bool:
        """Optimize the source graph into the cache; False (with a warning) where the disk
        will not take it; UserError where ONNX Runtime cannot (the graph or the writing)."""
        try:
            cache.check_space()
            with cache.staged() as staging:
                options = self.session_options()
                options.optimized_model_filepath = os.fspath(staging / "model.onnx")
                for key, value in SAVE_EXTERNAL_DATA.items():
                    options.add_session_config_entry(key, value)
                # This session only writes the graph. Without prepacking it holds no packed
                # weights beside the folded ones it must save (the SD 1.5 UNet: 3.4 GiB, not
                # 4.2); the session that runs loads the written graph, as later loads do.
                options.add_session_config_entry("session.disable_prepacking", "1")
                self.create(path, options, engine_dir, spec)
        except OSError as exc:
            log.warning(
                "not caching ONNX Runtime's optimized %s graph (every load re-optimizes it; "
                "--no-graph-cache stops trying): %s",
                spec.name,
                first_line(exc),
            )
            return False
        cache.prune()
        return True
