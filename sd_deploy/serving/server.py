"""Start and stop a real NVIDIA Triton Inference Server from the nvidia-pytriton wheel.

The wheel bundles `tritonserver`, its shared libraries and the Python backend, but
not in the layout the server expects. `TritonServer` puts it together (measured on
CPU-only machines, see docs/serving.md):

- a private backend folder: the wheel's `backends/` plus the Python backend stub of
  this interpreter's version at `<backends>/python/triton_python_backend_stub`;
- `LD_LIBRARY_PATH` = this interpreter's own LIBDIR, then the wheel's
  `nvidia_pytriton.libs` (else the stub links the system's libpython against a newer
  standard library); this interpreter's `bin/` first on `PATH` (else the stub's Python
  does not see this environment's packages);
- with no NVIDIA GPU: `--allow-gpu-metrics=false --pinned-memory-pool-byte-size=0`;
- the stubs' Python: the bundled stub is built with a pybind11 that predates NumPy 2
  and garbles every tensor under NumPy 2 (BYTES inputs arrive as their first byte
  repeated, outputs come back empty). This project pins NumPy 2, so the stubs run in a
  small "stub env": a venv holding only NumPy 1 that adds this environment's
  site-packages behind it (`make_stub_env`, `sd-triton stub-env`);
- `--exit-on-error=false`: a model that fails to load stays UNAVAILABLE with its
  reason (in the log and the repository index) while the server keeps running;
- every address on 127.0.0.1 unless told otherwise.

The server runs in its own process group, so `stop()` can end it and every Python
backend stub it started, and nothing is left running.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sd_deploy.errors import UserError

INSTALL_HINT = "install the serve extra: pip install 'sd-deploy[serve]'"
STUB_ENV_VAR = "SD_TRITON_STUB_ENV"
STUB_NUMPY = "numpy==1.26.4"  # the last NumPy 1; wheels for Python 3.9-3.12


@dataclass(frozen=True)
class TritonInstall:
    """Where the nvidia-pytriton wheel put the server."""

    server: Path  # .../pytriton/tritonserver/bin/tritonserver
    backends: Path  # .../pytriton/tritonserver/backends
    caches: Path  # .../pytriton/tritonserver/caches
    stub: Path  # .../python_backend_stubs/3.X/triton_python_backend_stub
    libs: Path  # .../site-packages/nvidia_pytriton.libs


def find_triton() -> TritonInstall:
    """The bundled tritonserver of the installed nvidia-pytriton wheel, or a UserError."""
    spec = importlib.util.find_spec("pytriton")  # finds the package without importing it
    if spec is None or spec.origin is None:
        raise UserError(f"no Triton server found: {INSTALL_HINT}")
    package = Path(spec.origin).parent
    root = package / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        server=root / "bin" / "tritonserver",
        backends=root / "backends",
        caches=root / "caches",
        stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        libs=package.parent / "nvidia_pytriton.libs",
    )
    if not install.server.is_file():
        raise UserError(f"{install.server} is missing (broken nvidia-pytriton?): {INSTALL_HINT}")
    if not install.stub.is_file():
        raise UserError(
            f"nvidia-pytriton has no Python backend stub for Python {version} ({install.stub})"
        )
    return install


def gpu_present() -> bool:
    """An NVIDIA driver device node exists (what Triton's CUDA parts need)."""
    return Path("/dev/nvidiactl").exists() and Path("/dev/nvidia0").exists()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def default_stub_env() -> Path | None:
    """The stub env named by $SD_TRITON_STUB_ENV, if set."""
    value = os.environ.get(STUB_ENV_VAR)
    return Path(value) if value else None


def numpy_major() -> int:
    from importlib.metadata import version

    return int(version("numpy").split(".")[0])


def _stub_env_site(env: Path) -> Path:
    return (
        env / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    )


def make_stub_env(env: str | Path, numpy_spec: str = STUB_NUMPY) -> Path:
    """A venv for the Python backend stubs: NumPy 1 first, then this environment's packages.

    Runs pip (it needs the package index or a wheel cache, like any install step)."""
    import venv

    env = Path(env)
    if env.exists() and any(env.iterdir()):
        raise UserError(f"{env} exists and is not empty (remove it or pick another folder)")
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env)
    site = _stub_env_site(env)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(site), numpy_spec]
    result = subprocess.run(pip, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(env, ignore_errors=True)
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"pip could not install {numpy_spec} into {env}: {last[0]}")
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    lines = [f"import site; site.addsitedir({path!r})" for path in ours]
    (site / "zz_sd_deploy_parent_env.pth").write_text("\n".join(lines) + "\n")
    return env


def check_stub_env(env: Path | None) -> None:
    """Refuse a start whose stubs would run under NumPy 2 (see the module docstring)."""
    if env is None:
        if numpy_major() >= 2:
            raise UserError(
                "this environment has NumPy 2, which the bundled Triton Python backend stub "
                "garbles; make a NumPy 1 stub env once (sd-triton stub-env DIR) and pass "
                f"--stub-env DIR (or set {STUB_ENV_VAR})"
            )
        return
    if not (env / "bin" / "python").exists() or not _stub_env_site(env).is_dir():
        raise UserError(f"{env} is not a stub env (make one: sd-triton stub-env {env})")


class TritonServer:
    """One tritonserver process serving a model repository; a context manager.

        with TritonServer("model_repository/", http_port=0) as server:
            print(server.http_url)      # http://127.0.0.1:PORT

    Port 0 picks a free port. `stub_env`: the venv whose Python the backend stubs run
    (make_stub_env; default $SD_TRITON_STUB_ENV; required where this environment has
    NumPy 2). `log`: a file that receives
    the server's output (default: inherit this process's stderr)."""

    def __init__(
        self,
        repository: str | Path,
        host: str = "127.0.0.1",
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        stub_env: str | Path | None = None,
        log: str | Path | None = None,
        extra_args: Sequence[str] = (),
        exit_timeout_s: int = 10,
    ) -> None:
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise UserError(f"model repository {repository} does not exist")
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.stub_env = Path(stub_env).absolute() if stub_env else default_stub_env()
        check_stub_env(self.stub_env)
        self.log_path = Path(log) if log else None
        self.extra_args = list(extra_args)
        self.exit_timeout_s = exit_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._log_file: IO[bytes] | None = None

    # -- addresses ------------------------------------------------------------------------

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    # -- process --------------------------------------------------------------------------

    def command(self, backend_dir: Path) -> list[str]:
        install = find_triton()
        args = [
            str(install.server),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_dir}",
            f"--cache-directory={backend_dir.parent / 'caches'}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--exit-on-error=false",
            f"--exit-timeout-secs={self.exit_timeout_s}",
        ]
        if not gpu_present():
            args += ["--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0"]
        return args + self.extra_args

    def environment(self) -> dict[str, str]:
        install = find_triton()
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        paths = [p for p in (libdir, str(install.libs), env.get("LD_LIBRARY_PATH", "")) if p]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(paths)
        # The stub's Python is the first python3 on PATH; PYTHONPATH does not reach it.
        bin_dir = self.stub_env / "bin" if self.stub_env else Path(sys.executable).parent
        env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
        return env

    def _prepare_backends(self) -> Path:
        install = find_triton()
        self._workdir = Path(tempfile.mkdtemp(prefix="sd-triton-"))
        backends = self._workdir / "backends"
        shutil.copytree(install.backends, backends, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(install.stub, backends / "python" / "triton_python_backend_stub")
        if install.caches.is_dir():
            shutil.copytree(install.caches, self._workdir / "caches")
        else:
            (self._workdir / "caches").mkdir()
        return backends

    def start(self, timeout_s: float = 120.0) -> TritonServer:
        """Start the server and wait until it is live and every model has loaded or failed."""
        if self.process is not None:
            raise RuntimeError("server already started")
        for port in (self.http_port, self.grpc_port, self.metrics_port):
            if _port_in_use(self.host, port):
                raise UserError(f"port {self.host}:{port} is in use (pick another, or 0: any)")
        backends = self._prepare_backends()
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.command(backends),
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT if self._log_file else None,
            start_new_session=True,  # Ctrl-C reaches us, not it; stop() ends the group
        )
        try:
            self.wait_settled(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_settled(self, timeout_s: float) -> None:
        """Until the server is live and no model is still loading."""
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process is not None
            code = self.process.poll()
            if code is not None:
                raise UserError(
                    f"tritonserver exited with status {code} while starting{self._log_hint()}"
                )
            if self._get("/v2/health/live") is not None:
                states = self.model_states()
                if states is not None and all(
                    s.get("state") in ("READY", "UNAVAILABLE") for s in states
                ):
                    return
            if time.monotonic() > deadline:
                raise UserError(f"tritonserver not ready after {timeout_s:.0f} s{self._log_hint()}")
            time.sleep(0.25)

    def _log_hint(self) -> str:
        return f" (see {self.log_path})" if self.log_path else " (see its log above)"

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM the server, wait, then kill whatever is left of its process group.

        Returns the server's exit status (None if it was never started)."""
        code = None
        if self.process is not None:
            wait = timeout_s if timeout_s is not None else self.exit_timeout_s + 15
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(wait)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            code = self.process.returncode
            try:  # stubs that outlived the server (they should not)
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return code

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- queries (plain HTTP: no client library needed) -----------------------------------

    def _get(self, path: str, method: str = "GET", body: bytes | None = None) -> Any:
        request = urllib.request.Request(self.http_url + path, data=body, method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                data = response.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None
        return json.loads(data) if data else {}

    def ready(self) -> bool:
        return self._get("/v2/health/ready") is not None

    def model_states(self) -> list[dict[str, Any]] | None:
        """The repository index: name, version, state (READY/UNAVAILABLE/...), reason."""
        index = self._get("/v2/repository/index", method="POST", body=b"{}")
        return index if isinstance(index, list) else None

    def statistics(
        self, model: str, min_inferences: int = 0, timeout_s: float = 10.0
    ) -> dict[str, Any]:
        """Triton's inference statistics of `model` (inference_count, execution_count, ...).

        The backend reports an execution's statistics after its responses went out, so a
        client that just got its answer may read them before they count; `min_inferences`
        waits (up to `timeout_s`) until inference_count has reached it."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self._get(f"/v2/models/{model}/stats")
            if not stats:
                raise UserError(f"no statistics for model {model}")
            current = dict(stats["model_stats"][0])
            if current.get("inference_count", 0) >= min_inferences:
                return current
            if time.monotonic() > deadline:
                return current
            time.sleep(0.1)
