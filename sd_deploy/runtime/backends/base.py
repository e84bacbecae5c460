"""The seam between the sampler loop and whatever runs the graphs.

A backend opens one `ComponentSession` per component of an engine dir; a session
runs numpy arrays in and numpy arrays out, keyed by the manifest's I/O names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from sd_deploy.engine_dir.manifest import ComponentSpec


class ComponentSession(ABC):
    """One loaded component. `run` takes every input and returns every output by name."""

    def __init__(self, spec: ComponentSpec) -> None:
        self.spec = spec

    @abstractmethod
    def run(
        self, feeds: Mapping[str, np.ndarray], release_scratch: bool = False
    ) -> dict[str, np.ndarray]:
        """Run the component on numpy inputs already cast to the manifest's dtypes.

        `release_scratch`: this is the caller's last call for a while (a generation is
        done with the component), so working memory kept for the next call may go back."""

    def close(self) -> None:  # noqa: B027 - optional hook, most sessions free nothing
        """Release device memory; the default has nothing to free."""


class Backend(ABC):
    """Opens components of one engine dir on one kind of executor."""

    name: str = "backend"

    @abstractmethod
    def open(self, engine_dir: Path, spec: ComponentSpec) -> ComponentSession:
        """Load `spec`'s graph or engine from `engine_dir`."""

    def describe(self) -> str:
        """One line for logs and reports: what actually runs the graphs."""
        return self.name

    def compute_precision(self) -> str:
        """What the graphs compute in when the backend chooses it (OpenVINO's bf16); ""
        means the graphs' own precision, as exported."""
        return ""

    def check_request(self, batch: int, height: int, width: int, guided: bool) -> None:  # noqa: B027
        """Refuse, before any work, a request this backend cannot run (e.g. outside a
        TensorRT profile). The default accepts what the manifest's ranges accept."""
