"""sd-quantize: the int8-weight OpenVINO graph it writes beside a component, its metadata,
what it skips, and its one-line errors (on the tiny preset; the quality of the graphs is
tests/runtime/test_openvino_backend.py's)."""

from __future__ import annotations

import errno
import json
import shutil
import sys

import pytest

NEEDS = "sd-quantize needs {}: pip install sd-deploy[quantize]"
pytest.importorskip("openvino", reason=NEEDS.format("openvino"))
pytest.importorskip("nncf", reason=NEEDS.format("nncf"))

from sd_deploy.engine_dir import read_manifest  # noqa: E402
from sd_deploy.engine_dir.int8_graphs import (  # noqa: E402
    Int8Metadata,
    int8_dir,
    int8_files_sha256,
    int8_status,
)
from sd_deploy.engines.int8 import quantize_components  # noqa: E402
from sd_deploy.errors import EngineDirError, UserError  # noqa: E402


@pytest.fixture
def engine(tiny_engine_fp32, tmp_path):
    """A private copy of the tiny engine dir (quantizing writes into it)."""
    return shutil.copytree(tiny_engine_fp32, tmp_path / "engines")


def test_writes_an_int8_graph_with_its_metadata_and_keeps_the_edge_convolutions(engine):
    (result,) = quantize_components(engine)
    spec = read_manifest(engine).components["unet"]
    folder = int8_dir(engine, "unet")
    assert result.path == folder and not result.skipped
    assert sorted(p.name for p in folder.iterdir()) == ["int8.json", "model.bin", "model.xml"]
    meta = Int8Metadata.from_json(json.loads((folder / "int8.json").read_text()))
    assert meta.component == "unet" and meta.mode == "int8-weights"
    assert meta.onnx_sha256 == spec.onnx_sha256
    assert meta.ir_sha256 == int8_files_sha256(folder) and meta.ir_bytes == result.int8_bytes
    # conv_in and the output conv, as named in the exported graph
    assert [n.split("/")[2] for n in meta.kept_full_precision] == ["input_blocks.0", "out"]
    assert result.int8_bytes < result.onnx_bytes
    assert int8_status(engine, spec, verify=True).fresh


def test_weights_stored_out_in_are_compressed_too(engine):
    """sd-export stores MatMul weights behind a Transpose, which NNCF does not look through:
    sd-quantize folds it into the MatMul, so no MatMul keeps a float weight."""
    import openvino as ov

    from sd_deploy.engines.int8 import fold_weight_transposes

    model = ov.Core().read_model(str(engine / "unet" / "model.onnx"))
    assert fold_weight_transposes(model) > 0 and fold_weight_transposes(model) == 0
    quantize_components(engine)
    int8 = ov.Core().read_model(str(int8_dir(engine, "unet") / "model.xml"))
    seconds = [op.input_value(1).get_node() for op in int8.get_ordered_ops()
               if op.get_type_name() == "MatMul"]  # fmt: skip
    transposed = [s.input_value(0).get_node() for s in seconds if s.get_type_name() == "Transpose"]
    assert seconds and all(t.get_type_name() != "Constant" for t in transposed)
    # each weight comes through int8 decompression (Convert, Subtract, Multiply)
    assert [s for s in seconds if s.get_type_name() == "Constant"] == []


def test_an_up_to_date_graph_is_skipped_unless_forced(engine):
    quantize_components(engine)
    stamp = (int8_dir(engine, "unet") / "model.bin").stat().st_mtime_ns
    (again,) = quantize_components(engine)
    assert again.skipped and again.int8_bytes > 0
    assert (int8_dir(engine, "unet") / "model.bin").stat().st_mtime_ns == stamp
    (forced,) = quantize_components(engine, force=True)
    assert not forced.skipped


def test_a_changed_graph_file_is_remade(engine):
    """A bin of the same size but other bytes passes the cheap size check at load; sd-quantize
    re-hashes and makes it again."""
    quantize_components(engine)
    spec = read_manifest(engine).components["unet"]
    bin_file = int8_dir(engine, "unet") / "model.bin"
    data = bytearray(bin_file.read_bytes())
    data[-1] ^= 0xFF
    bin_file.write_bytes(bytes(data))
    assert int8_status(engine, spec).fresh
    assert "do not match their metadata" in int8_status(engine, spec, verify=True).reason
    (result,) = quantize_components(engine)
    assert not result.skipped and int8_status(engine, spec, verify=True).fresh


def test_unknown_component_and_missing_libraries_are_one_line_errors(engine, monkeypatch):
    with pytest.raises(UserError, match=r"has no unet_xl to quantize \(it has text_encoder"):
        quantize_components(engine, ["unet_xl"])
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(UserError, match=r"pip install 'sd-deploy\[quantize\]'"):
        quantize_components(engine)
    assert not int8_dir(engine, "unet").exists()


def test_an_unreadable_graph_writes_nothing(engine):
    (engine / "unet" / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(EngineDirError, match=r"cannot read unet/model.onnx with OpenVINO"):
        quantize_components(engine)
    assert not int8_dir(engine, "unet").exists()


def test_a_full_disk_keeps_the_previous_graph(engine, monkeypatch):
    import openvino

    quantize_components(engine)
    before = (int8_dir(engine, "unet") / "int8.json").read_text()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(openvino, "save_model", full)
    with pytest.raises(EngineDirError, match="disk full"):
        quantize_components(engine, force=True)
    assert (int8_dir(engine, "unet") / "int8.json").read_text() == before
    assert [p.name for p in (engine / "unet").iterdir() if p.name.startswith(".")] == []


def test_sd_quantize_command(engine):
    from click.testing import CliRunner

    from sd_deploy.cli import quantize_command

    result = CliRunner().invoke(quantize_command, ["--engine", str(engine)])
    assert result.exit_code == 0, result.output
    assert "unet          int8 weights" in result.stdout and "made in" in result.stdout
    result = CliRunner().invoke(quantize_command, ["--engine", str(engine)])
    assert "up to date" in result.stdout
    result = CliRunner().invoke(quantize_command, ["--engine", str(engine / "nope")])
    assert result.exit_code == 1 and result.stderr.startswith("error: ")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("ir_sha256"), "'ir_sha256' is missing"),
        (lambda d: d.update(ir_bytes="8"), "'ir_bytes' is missing or not an integer"),
        (lambda d: d.update(kept_full_precision=[1]), "not a list of names"),
        (lambda d: d.update(metadata_version=9), "metadata_version 9"),
        (lambda d: d.update(seconds="slow"), "'seconds' is not a number"),
    ],
)
def test_malformed_metadata_names_the_field(change, message):
    data = {
        "component": "unet",
        "onnx_sha256": "a" * 64,
        "ir_sha256": "b" * 64,
        "ir_bytes": 8,
        "mode": "int8-weights",
        "metadata_version": 1,
    }
    assert Int8Metadata.from_json(dict(data)).ir_bytes == 8
    change(data)
    with pytest.raises(ValueError, match=message):
        Int8Metadata.from_json(data)
