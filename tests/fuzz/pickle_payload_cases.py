"""A pickle whose unpickling would run code is refused, and its code never runs.

The payload's `__reduce__` calls `open(marker, "w")`: unpickled by a plain `pickle.load` it
creates the marker file (checked first, so the test can fail), while sd-deploy's readers
(`torch.load(weights_only=True)`) refuse the file with a one-line CheckpointError / LoraError
and the marker is absent. Covered: .ckpt zip archives, legacy (non-zip) torch pickles and
raw pickles, and .pt LoRA files (zip and legacy).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


class CreatesFile:
    """Unpickling this calls open(path, "w"): the file appears."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def _formats(marker: Path, extra: dict) -> dict[str, bytes]:
    obj = {"payload": CreatesFile(marker), **extra}
    zipped, legacy = io.BytesIO(), io.BytesIO()
    torch.save(obj, zipped)
    torch.save(obj, legacy, _use_new_zipfile_serialization=False)
    return {
        "zip": zipped.getvalue(),
        "legacy": legacy.getvalue(),
        "raw-pickle": pickle.dumps(obj, protocol=2),
    }


def _payload_works(data: bytes, marker: Path) -> None:
    """The payload is live: torch.load without weights_only creates the marker (removed again)."""
    try:
        torch.load(io.BytesIO(data), weights_only=False)
    except Exception:
        pass  # a raw pickle is not a torch file: its payload ran before torch noticed
    assert marker.exists(), "the test payload does not run: the test could not fail"
    marker.unlink()


@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw-pickle"])
def test_ckpt_with_a_reduce_payload_is_refused_and_runs_nothing(tmp_path: Path, fmt: str) -> None:
    from sd_deploy.errors import CheckpointError
    from sd_deploy.models.checkpoints import load_checkpoint

    marker = tmp_path / "payload-ran"
    data = _formats(marker, {"state_dict": {"model.diffusion_model.x": torch.zeros(2)}})[fmt]
    _payload_works(data, marker)
    path = tmp_path / "model.ckpt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    message = str(excinfo.value)
    assert "\n" not in message and "model.ckpt" in message
    assert "refusing" in message or "cannot be read" in message
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_pt_lora_with_a_reduce_payload_is_refused_and_runs_nothing(
    tmp_path: Path, fmt: str
) -> None:
    from sd_deploy.engine_dir.lora import LoraError
    from sd_deploy.models.lora import load_lora

    marker = tmp_path / "payload-ran"
    lora = {"lora_unet_x.lora_down.weight": torch.zeros(1, 4)}
    data = _formats(marker, lora)[fmt]
    _payload_works(data, marker)
    path = tmp_path / "style.pt"
    path.write_bytes(data)
    with pytest.raises(LoraError) as excinfo:
        load_lora(path)
    assert "\n" not in str(excinfo.value) and "style.pt" in str(excinfo.value)
    assert not marker.exists()


def test_runtime_lora_reader_refuses_pickles_without_reading_them(tmp_path: Path) -> None:
    from sd_deploy.engine_dir.lora import LoraError, read_lora

    marker = tmp_path / "payload-ran"
    path = tmp_path / "style.pt"
    path.write_bytes(_formats(marker, {})["zip"])
    with pytest.raises(LoraError):
        read_lora(path)
    assert not marker.exists()
