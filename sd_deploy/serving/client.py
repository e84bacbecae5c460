"""Generate on a Triton server that serves an sd-triton model (behind `sd-run --server`).

    images, texts = generate_remote("http://127.0.0.1:8000", prompt="a red circle", seed=1)

`http://` URLs use tritonclient.http, `grpc://` URLs tritonclient.grpc. An error response
from the model ("INVALID_ARGUMENT: width must be ...") becomes the sd_deploy error of
that code with the message alone, so a remote run fails exactly like a local one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import numpy as np

from sd_deploy.errors import (
    BuildError,
    EngineDirError,
    ErrorCode,
    GenerationCancelled,
    NonFiniteOutputError,
    RequestError,
    UserError,
)
from sd_deploy.serving.repository import INPUTS

ERRORS: dict[str, type[UserError]] = {
    ErrorCode.INVALID_ARGUMENT.name: RequestError,
    ErrorCode.ENGINE_DIR.name: EngineDirError,
    ErrorCode.BACKEND.name: BuildError,
    ErrorCode.NONFINITE.name: NonFiniteOutputError,
    ErrorCode.CANCELLED.name: GenerationCancelled,
}
# config.pbtxt's data types as the client protocol spells them, and their numpy types.
WIRE_TYPES = {
    "TYPE_STRING": "BYTES",
    "TYPE_INT64": "INT64",
    "TYPE_INT32": "INT32",
    "TYPE_FP32": "FP32",
    "TYPE_BOOL": "BOOL",
}
WIRE_DTYPES = {"INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_}
INSTALL_HINT = "the server client needs tritonclient: pip install 'sd-deploy[serve]'"


@dataclass(frozen=True)
class ServerAddress:
    protocol: str  # "http" or "grpc"
    host_port: str  # "127.0.0.1:8000"


def parse_url(url: str) -> ServerAddress:
    """http://HOST:PORT or grpc://HOST:PORT (a bare HOST:PORT means http)."""
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if parsed.scheme not in ("http", "grpc") or not parsed.hostname:
        raise UserError(f"server URL {url!r}: expected http://HOST:PORT or grpc://HOST:PORT")
    port = parsed.port or (8001 if parsed.scheme == "grpc" else 8000)
    if parsed.path not in ("", "/"):
        raise UserError(f"server URL {url!r}: give the server's address, without a path")
    return ServerAddress(parsed.scheme, f"{parsed.hostname}:{port}")


def error_from_message(message: str) -> UserError:
    """A model error response -> the sd_deploy error it came from."""
    text = message.strip()
    # Triton may wrap the model's message ("[StatusCode.INVALID_ARGUMENT] ...").
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    name, sep, rest = text.partition(": ")
    if sep and name in ERRORS:
        return ERRORS[name](rest)
    return UserError(f"server: {text.splitlines()[0] if text else 'error without message'}")


class RemotePipeline:
    """A client of one served sd-triton model."""

    def __init__(self, url: str, model: str = "sd", timeout_s: float = 600.0) -> None:
        self.address = parse_url(url)
        self.model = model
        self.timeout_s = timeout_s
        try:
            if self.address.protocol == "grpc":
                import tritonclient.grpc as client_module
            else:
                import tritonclient.http as client_module
        except ImportError:
            raise UserError(INSTALL_HINT) from None
        self._module: Any = client_module
        from tritonclient.utils import InferenceServerException

        self._exception = InferenceServerException
        if self.address.protocol == "grpc":
            self.client = client_module.InferenceServerClient(self.address.host_port)
        else:
            self.client = client_module.InferenceServerClient(
                self.address.host_port, connection_timeout=timeout_s, network_timeout=timeout_s
            )
        self._max_batch: int | None = None

    def max_batch_size(self) -> int:
        """The served model's max_batch_size (0: unbatched I/O); checks it is reachable."""
        if self._max_batch is None:
            try:
                if self.address.protocol == "grpc":
                    config = self.client.get_model_config(self.model, as_json=True)["config"]
                else:
                    config = self.client.get_model_config(self.model)
            except self._exception as exc:
                raise self._unreachable(exc) from None
            except OSError as exc:
                raise UserError(
                    f"server {self.address.host_port} is not reachable ({exc})"
                ) from None
            self._max_batch = int(config.get("max_batch_size", 0))
        return self._max_batch

    def _unreachable(self, exc: Any) -> UserError:
        """`exc`: tritonclient's InferenceServerException (its text is `message()`)."""
        return UserError(f"model {self.model} on {self.address.host_port}: {exc.message()}")

    def inputs(self, rows: list[dict[str, Any]]) -> list[Any]:
        """Triton inputs for one request of len(rows) images (rows share their keys)."""
        batched = self.max_batch_size() > 0
        if not batched and len(rows) != 1:
            raise RequestError(f"model {self.model} takes one image per request (batch 1)")
        tensors = []
        for name, config_type, _ in INPUTS:
            if rows[0].get(name) is None:
                continue
            values = [row[name] for row in rows]
            kind = WIRE_TYPES[config_type]
            if kind == "BYTES":
                array = np.array(
                    [v.encode() if isinstance(v, str) else v for v in values], dtype=np.object_
                )
            else:
                array = np.array(values, dtype=WIRE_DTYPES[kind])
            array = array.reshape(len(rows), 1) if batched else array.reshape(1)
            tensor = self._module.InferInput(name, list(array.shape), kind)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        return tensors

    def generate_rows(self, rows: list[dict[str, Any]]) -> tuple[np.ndarray, list[str]]:
        """One request; returns images [B,H,W,3] uint8 and one infotext per image."""
        inputs = self.inputs(rows)
        outputs = [self._module.InferRequestedOutput(n) for n in ("image", "parameters")]
        try:
            if self.address.protocol == "grpc":
                result = self.client.infer(
                    self.model, inputs, outputs=outputs, client_timeout=self.timeout_s
                )
            else:
                result = self.client.infer(self.model, inputs, outputs=outputs)
        except self._exception as exc:
            raise error_from_message(exc.message() or str(exc)) from None
        except OSError as exc:
            raise UserError(f"server {self.address.host_port} is not reachable ({exc})") from None
        images = result.as_numpy("image")
        texts = result.as_numpy("parameters")
        if self.max_batch_size() == 0:
            images, texts = images[None], texts[None]
        return images, [t.decode() if isinstance(t, bytes) else str(t) for t in texts.reshape(-1)]

    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        seed: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        width: int | None = None,
        height: int | None = None,
        sampler: str | None = None,
        clip_skip: int | None = None,
        emphasis: bool = True,
        batch: int = 1,
    ) -> tuple[np.ndarray, list[str]]:
        """Like Pipeline.generate: `batch` images, image i with seed + i (random seed if None).
        clip_skip and emphasis are sent only when not their defaults, so a repository made
        before they were inputs still serves every other request."""
        if batch < 1:
            raise RequestError(f"batch must be >= 1, got {batch}")
        if seed is None or seed < 0:
            seed = random.randrange(2**31)
        row = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "steps": steps,
            "guidance": guidance,
            "width": width,
            "height": height,
            "sampler": sampler,
            "clip_skip": clip_skip if clip_skip not in (None, 1) else None,
            "emphasis": None if emphasis else False,
        }
        rows = [{**row, "seed": seed + i} for i in range(batch)]
        size = self.max_batch_size() or 1  # requests of at most max_batch_size rows
        parts = [self.generate_rows(rows[i : i + size]) for i in range(0, len(rows), size)]
        return np.concatenate([p[0] for p in parts]), [t for p in parts for t in p[1]]

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> RemotePipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def generate_remote(url: str, model: str = "sd", **request: Any) -> tuple[np.ndarray, list[str]]:
    """One call's images and infotexts from a served model; see RemotePipeline.generate."""
    remote = RemotePipeline(url, model=model)
    try:
        return remote.generate(**request)
    finally:
        remote.close()
