"""ONNX Runtime's optimized-graph cache: written once, reused, replaced, and never in the way."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from sd_deploy.engine_dir.layout import ORT_CACHE_DIR as CACHE_DIR_NAME
from sd_deploy.engine_dir.manifest import read_manifest
from sd_deploy.errors import UserError
from sd_deploy.runtime.backends.onnxruntime import OnnxRuntimeBackend


@pytest.fixture
def engine(tmp_path, tiny_engine_fp32):
    """A private copy of the tiny engine dir, without the caches other tests' loads wrote."""
    root = tmp_path / "engines"
    shutil.copytree(tiny_engine_fp32, root, ignore=shutil.ignore_patterns(CACHE_DIR_NAME))
    return root


def unet_inputs(spec):
    rng = np.random.default_rng(0)
    context = next(i for i in spec.inputs if i.name == "encoder_hidden_states").shape[-1]
    return {
        "sample": rng.standard_normal((2, 4, 8, 8), np.float32),
        "timestep": np.array([500.0, 20.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, context), np.float32),
    }


def entries(engine):
    cache = engine / "unet" / CACHE_DIR_NAME
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def open_unet(engine, **kw):
    spec = read_manifest(engine).components["unet"]
    session = OnnxRuntimeBackend("cpu", threads=1, **kw).open(engine, spec)
    level = session.session.get_session_options().graph_optimization_level
    return session, spec, level


def test_first_load_writes_the_cache_and_later_loads_use_it(engine):
    first, spec, level = open_unet(engine)
    assert level.name == "ORT_DISABLE_ALL"  # it runs the graph it wrote, as later loads do
    [entry] = entries(engine)
    assert (engine / "unet" / CACHE_DIR_NAME / entry / "model.onnx").is_file()
    second, _, level = open_unet(engine)
    assert level.name == "ORT_DISABLE_ALL"  # the optimized graph, not re-optimized
    feeds = unet_inputs(spec)
    expected = first.run(feeds)["model_output"]
    np.testing.assert_allclose(second.run(feeds)["model_output"], expected, rtol=0, atol=1e-6)
    plain, _, _ = open_unet(engine, graph_cache=False)
    np.testing.assert_allclose(plain.run(feeds)["model_output"], expected, rtol=0, atol=1e-6)
    assert entries(engine) == [entry]


def test_a_changed_graph_gets_a_new_entry_and_the_old_one_goes(engine):
    open_unet(engine)
    [old] = entries(engine)
    graph = engine / "unet" / "model.onnx"
    os.utime(graph, ns=(graph.stat().st_atime_ns, graph.stat().st_mtime_ns + 10**9))
    open_unet(engine)
    [new] = entries(engine)
    assert new != old


def test_a_damaged_entry_is_rewritten(engine):
    open_unet(engine)
    [entry] = entries(engine)
    (engine / "unet" / CACHE_DIR_NAME / entry / "model.onnx").write_bytes(b"\x00garbage")
    session, spec, level = open_unet(engine)
    assert level.name == "ORT_DISABLE_ALL"  # the rewritten entry
    assert np.isfinite(session.run(unet_inputs(spec))["model_output"]).all()
    assert entries(engine) == [entry]
    assert open_unet(engine)[2].name == "ORT_DISABLE_ALL"


def test_the_session_writing_the_cache_does_not_prepack_and_is_not_the_one_run(engine, monkeypatch):
    """Prepacked weights beside the folded ones it must save cost the SD 1.5 UNet 0.9 GiB
    more on its first load (benchmarks/results/openvino-cpu/README.md): the writer does
    not prepack, and what runs is a session of the written graph."""
    made = []
    create = OnnxRuntimeBackend.create
    key = "session.disable_prepacking"

    def spy(self, path, options, *args):
        written = options.optimized_model_filepath
        made.append((path, written, written and options.get_session_config_entry(key)))
        return create(self, path, options, *args)

    monkeypatch.setattr(OnnxRuntimeBackend, "create", spy)
    open_unet(engine)
    [(source, written, no_prepack), (ran, none, _)] = made
    assert source == engine / "unet" / "model.onnx" and no_prepack == "1"
    assert Path(written).parent.parent == engine / "unet" / CACHE_DIR_NAME  # the staging dir
    assert ran.parent.parent == engine / "unet" / CACHE_DIR_NAME and not none


def test_a_failed_write_warns_and_runs_the_source_graph(engine, monkeypatch, caplog):
    create = OnnxRuntimeBackend.create

    def failing_writer(self, path, options, *args):
        if options.optimized_model_filepath:
            raise UserError("cannot load it with ONNX Runtime: writing failed")
        return create(self, path, options, *args)

    monkeypatch.setattr(OnnxRuntimeBackend, "create", failing_writer)
    with caplog.at_level(logging.WARNING, logger="sd_deploy"):
        session, spec, level = open_unet(engine)
    assert "could not write ONNX Runtime's optimized unet graph" in caplog.records[-1].getMessage()
    assert level.name == "ORT_ENABLE_ALL"  # the source graph, optimized in memory
    assert np.isfinite(session.run(unet_inputs(spec))["model_output"]).all()
    assert entries(engine) == []


def test_a_corrupt_source_graph_fails_with_its_own_error_and_no_cache_warning(engine, caplog):
    (engine / "unet" / "model.onnx").write_bytes(b"\x00not a graph")
    with caplog.at_level(logging.WARNING, logger="sd_deploy"):
        with pytest.raises(UserError, match="cannot load .*model.onnx with ONNX Runtime") as info:
            open_unet(engine)
    assert "\n" not in str(info.value)
    assert not [r for r in caplog.records if "could not write" in r.getMessage()]
    assert entries(engine) == []


def test_too_little_disk_warns_and_runs_without_cache(engine, monkeypatch, caplog):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 0, 1024))
    with caplog.at_level(logging.WARNING, logger="sd_deploy"):
        session, spec, level = open_unet(engine)
    assert re.search(
        "not caching ONNX Runtime's optimized unet graph.*needed", caplog.records[-1].getMessage()
    )
    assert level.name == "ORT_ENABLE_ALL"
    assert np.isfinite(session.run(unet_inputs(spec))["model_output"]).all()
    assert entries(engine) == []


def test_no_cache_when_turned_off(engine):
    open_unet(engine, graph_cache=False)
    assert not (engine / "unet" / CACHE_DIR_NAME).exists()
