"""TensorRT backend: runs the plans `sd-build` wrote, with numpy in and numpy out.

The backend is split along its seams:

    tensorrt_cuda     cuda-python's runtime calls, device buffers, what this machine is
    tensorrt_checks   plain-Python plan, I/O, profile and readiness checks
    tensorrt_session  one plan's execution context, stream, buffers and CUDA graphs
    tensorrt          (this module) the backend: loads plans, makes sessions

Before any GPU work each plan's metadata is checked against the running TensorRT
version and GPU, and each request against the plan's optimization profile; both
fail as one-line errors that name the mismatch and the `sd-build` command that
fixes it. No torch: device memory is raw cudaMalloc'd buffers.

TensorRT's own log goes to the `sd_deploy` logger (warnings) and, for errors, into
the one-line BuildError of the call that failed.

Thread safety: one backend and its sessions are for one thread at a time.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sd_deploy.engine_dir import shapes
from sd_deploy.engine_dir.layout import build_command, plan_metadata_path, plan_path, relative
from sd_deploy.engine_dir.manifest import ComponentSpec, Manifest
from sd_deploy.engine_dir.plans import read_metadata
from sd_deploy.errors import BuildError, RequestError, first_line
from sd_deploy.runtime.backends import tensorrt_cuda
from sd_deploy.runtime.backends.base import Backend, ComponentSession
from sd_deploy.runtime.backends.tensorrt_checks import require_fresh_plan
from sd_deploy.runtime.backends.tensorrt_session import TensorRTSession

__all__ = ["TensorRTBackend", "tensorrt_log"]

log = logging.getLogger("sd_deploy")


def tensorrt_log(trt: Any) -> Any:
    """A `trt.ILogger` that keeps TensorRT's errors (for the one-line error of the call that
    failed) and sends its warnings to the `sd_deploy` logger."""

    class TensorRTLog(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg))
                log.debug("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)

    return TensorRTLog()


def _never_destroy(*objects: Any) -> None:
    """Hold a reference nothing releases. Measured with TensorRT 11.4's lean runtime: a
    Runtime whose CUDA initialization failed crashes the process (SIGSEGV) when it is
    destroyed, even at interpreter exit, and when asked to deserialize."""
    for obj in objects:
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


class TensorRTBackend(Backend):
    """Runs the TensorRT plans of an engine dir on the current CUDA device.

    Creating it checks that tensorrt, cuda-python and a GPU are present; `open`
    checks each plan's metadata (ONNX hash, TensorRT version, GPU, size) before
    loading it, and creates TensorRT's runtime at the first plan it loads.
    `cuda_graph` records and replays the UNet's steps as a CUDA graph while the
    request's shapes stay fixed.
    """

    name = "tensorrt"

    def __init__(self, engine_dir: Path, manifest: Manifest, cuda_graph: bool = False) -> None:
        self._trt = tensorrt_cuda.import_tensorrt()
        self.cuda = tensorrt_cuda.CudaRuntime(tensorrt_cuda.import_cudart())
        self.environment = tensorrt_cuda.current_environment(self.cuda)
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.cuda_graph = cuda_graph
        self._logger: Any = None
        self._runtime: Any = None
        self._runtime_error = ""
        self.profiles: dict[str, dict[str, dict[str, list[int]]]] = {}

    def describe(self) -> str:
        env = self.environment
        graphs = ", CUDA graphs for the UNet" if self.cuda_graph else ""
        return (
            f"tensorrt {env['trt_version']} on {env['gpu_name']} "
            f"(compute capability {env['compute_capability']}){graphs}"
        )

    def open(self, engine_dir: Path, spec: ComponentSpec) -> ComponentSession:
        metadata = require_fresh_plan(engine_dir, spec, self.environment)
        plan = plan_path(engine_dir, spec.name)
        try:
            data = plan.read_bytes()
        except OSError as exc:
            raise BuildError(f"cannot read {plan}: {exc.strerror or exc}") from None
        where = relative(plan, engine_dir)
        runtime = self._tensorrt_runtime(where)
        errors_before = len(self._logger.errors)
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            said = self._logger.errors[errors_before:]
            reason = f": {said[0]}" if said else ""
            raise BuildError(
                f"TensorRT could not load {where} (corrupt, or built by another TensorRT"
                f"{reason}); rebuild it with {build_command(engine_dir, spec.name)}"
            )
        self.profiles[spec.name] = metadata.profile
        return TensorRTSession(
            spec,
            engine,
            self._trt,
            self.cuda,
            engine_dir,
            cuda_graph=self.cuda_graph and spec.name == "unet",
            runtime=runtime,
        )

    def refit(
        self,
        session: ComponentSession,
        weights: Mapping[str, np.ndarray],
        base: Callable[[str], np.ndarray | None],
    ) -> None:
        """Replace named weights of an open refittable plan in place (run-time LoRAs):
        `trt.Refitter` by ONNX initializer name; `base(name)` gives the exported value of
        any other weight TensorRT asks for. A recorded CUDA graph is dropped (re-recorded
        at the next run), the engine and its buffers are kept."""
        from sd_deploy.runtime.lora import refit_engine

        engine = getattr(session, "engine", None)
        if engine is None:
            raise BuildError(f"the {session.spec.name} TensorRT session is closed")
        if self._logger is None:
            self._logger = tensorrt_log(self._trt)
        refit_engine(self._trt, engine, self._logger, weights, base, session.spec.name)
        drop = getattr(session, "_drop_graph", None)
        if drop is not None:
            drop()

    def _tensorrt_runtime(self, where: str) -> Any:
        """TensorRT's runtime, made once; a one-line BuildError naming the plan when
        TensorRT cannot start here (no usable GPU, or a stand-in library)."""
        if self._runtime is None and not self._runtime_error:
            self._logger = tensorrt_log(self._trt)
            try:
                runtime = self._trt.Runtime(self._logger)
            except TypeError as exc:  # pybind11: "factory function returned nullptr"
                if "nullptr" not in str(exc):
                    raise
                self._runtime_error = f"TensorRT could not create its runtime ({first_line(exc)})"
            else:
                if self._logger.errors:  # e.g. "CUDA initialization failure with error: 35"
                    _never_destroy(runtime, self._logger)
                    self._runtime_error = f"TensorRT cannot use the GPU: {self._logger.errors[0]}"
                else:
                    self._runtime = runtime
        if self._runtime_error:
            raise BuildError(f"cannot load {where}: {self._runtime_error}")
        return self._runtime

    def check_request(self, batch: int, height: int, width: int, guided: bool = True) -> None:
        """Refuse a request the plans' profiles cannot run, before any GPU work.

        Uses the profiles of opened plans and, for the others, of their metadata files,
        so a pipeline can call it before loading anything.
        """
        profiles = self.plan_profiles()
        for name in profiles:
            spec = self.manifest.components[name]
            shapes.check_request(spec.shape_ranges, batch, height, width, name)
        problem = shapes.request_outside_profiles(
            self.manifest, profiles, batch, height, width, guided, str(self.engine_dir)
        )
        if problem:
            raise RequestError(problem)

    def plan_profiles(self) -> dict[str, dict[str, dict[str, list[int]]]]:
        """Profile per component: opened plans', else their metadata's where readable."""
        result = dict(self.profiles)
        for name in self.manifest.components:
            if name in result:
                continue
            try:
                result[name] = read_metadata(
                    plan_metadata_path(plan_path(self.engine_dir, name))
                ).profile
            except (OSError, ValueError):
                continue  # no plan yet: open() will say so
        return result
