"""sd-bench: one real run on the tiny model, plus its parsing, statistics, memory and errors.

The run (`bench_run`, once per module) is the CI check that the whole thing works: PyTorch,
ONNX Runtime and diffusers on the tiny fp32 engine dir, TensorRT reported as skipped, and a
report whose figures are real measurements with parity inside the fp32 bounds.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sd_deploy.benchmarks.config import parse_backends, parse_batches, parse_size
from sd_deploy.benchmarks.harness import ratios
from sd_deploy.benchmarks.parity import Captured, ComponentCall, component_parity, image_parity
from sd_deploy.benchmarks.plots import amplified_difference, image_grid, latency_chart
from sd_deploy.benchmarks.report import strict_json
from sd_deploy.benchmarks.timing import (
    MemoryWatch,
    Stopwatch,
    TimedBackend,
    host_peak_rss_mib,
    host_rss_mib,
    summarize,
)
from sd_deploy.cli import bench_command
from sd_deploy.errors import UserError

# diffusers calls np.array on torch tensors, which numpy 2 flags; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

STEPS = 3
HAVE_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def invoke(args):
    return CliRunner().invoke(bench_command, [str(a) for a in args], catch_exceptions=False)


def strict_loads(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, tiny_engine_fp32):
    report_dir = tmp_path_factory.mktemp("bench") / "report"
    result = invoke(
        [
            "--engine", tiny_engine_fp32,
            "--backends", "onnxruntime,tensorrt,diffusers",  # torch joins as the reference
            "--steps", STEPS, "--batch", "1,2", "--runs", 2, "--warmup", 1,
            "--sampler", "dpmpp_2m_karras",
            "--threads", 1,  # robust timings on a shared, loaded CI machine
            "--report", report_dir, "--quiet",
        ]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return result, report_dir


def test_bench_writes_report_files(bench_run):
    result, report_dir = bench_run
    for name in ("report.json", "report.md", "latency.png", "images.png"):
        assert (report_dir / name).is_file(), name
    for name in ("latency.png", "images.png"):
        with Image.open(report_dir / name) as image:
            image.verify()
        with Image.open(report_dir / name) as image:
            assert image.width > 100 and image.height > 100
    report = strict_loads((report_dir / "report.json").read_text())
    assert report["config"]["steps"] == STEPS
    assert report["config"]["batches"] == [1, 2]
    assert report["machine"]["logical_cores"] >= 1
    assert report["versions"]["torch"]
    assert "onnxruntime" in result.stdout and "report:" in result.stdout
    md = (report_dir / "report.md").read_text()
    for heading in ("## Headline", "## Where the time goes", "## Parity against PyTorch fp32"):
        assert heading in md
    assert "| **onnxruntime** |" in md


def test_bench_measures_every_available_backend(bench_run):
    _, report_dir = bench_run
    report = strict_loads((report_dir / "report.json").read_text())
    backends = report["backends"]
    expected = ["torch", "onnxruntime", "tensorrt", "diffusers"]
    assert sorted(backends) == sorted(expected)
    measured = ["torch", "onnxruntime"] + (["diffusers"] if HAVE_DIFFUSERS else [])
    for name in measured:
        entry = backends[name]
        assert entry["status"] == "ok", entry
        assert entry["load_s"] > 0
        assert entry["memory"]["host_peak_mib"] > 0
        for batch in ("1", "2"):
            lat = entry["latency"][batch]
            assert lat["end_to_end"]["n"] == 2
            assert 0 < lat["end_to_end"]["min"] <= lat["end_to_end"]["median"]
            assert lat["end_to_end"]["median"] <= lat["end_to_end"]["max"]
            assert lat["images_per_s"] > 0
            assert lat["calls_per_run"]["unet"] == STEPS
            for component in ("text_encoder", "unet", "vae_decoder"):
                stats = lat["components"][component]
                assert stats["median"] > 0 and stats["p90"] >= stats["median"] - 1e-12
            # Component calls are part of the generation, not more than it.
            assert lat["unet_all_steps"]["median"] < lat["end_to_end"]["max"]
    if not HAVE_DIFFUSERS:
        assert backends["diffusers"]["status"] == "skipped"
        assert "diffusers not installed" in backends["diffusers"]["reason"]
    if not HAVE_TENSORRT:
        trt = backends["tensorrt"]
        assert trt["status"] == "skipped"
        assert "tensorrt" in trt["reason"]
        md = (report_dir / "report.md").read_text()
        assert "**tensorrt** (skipped)" in md
    speedups = report["ratios"]["vs_torch"]["onnxruntime"]["latency"]
    assert speedups["1"]["end_to_end"] > 0 and speedups["2"]["unet"] > 0


# (rel L2, cosine, PSNR dB) per precision: fp32 as export validation and the pipeline
# parity tests; fp16 (diffusers on a GPU) as the fp16 graphs' bounds there.
PARITY_BOUNDS = {"fp32": (1e-4, 0.99999, 40.0), "fp16": (1e-2, 0.999, 35.0)}


def test_bench_parity_is_within_bounds(bench_run):
    _, report_dir = bench_run
    report = strict_loads((report_dir / "report.json").read_text())
    for name in ("onnxruntime", "diffusers"):
        entry = report["backends"][name]
        if entry["status"] != "ok":
            continue
        # The tiny engine dir is fp32; diffusers runs fp16 where there is a GPU.
        max_rel_l2, min_cosine, min_psnr = PARITY_BOUNDS[entry.get("precision", "fp32")]
        components = entry["parity"]["components"]
        assert set(components) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
        assert len(components["unet"]["samples"]) == STEPS  # first, middle, last step
        for component, p in components.items():
            assert p["rel_l2"] <= max_rel_l2, (name, component, p)
            assert p["cosine"] >= min_cosine, (name, component, p)
        images = entry["parity"]["images"]
        psnr = math.inf if images["psnr_db"] == "inf" else images["psnr_db"]
        assert psnr >= min_psnr, (name, images)
        assert images["ssim"] >= 0.99
    # The reference images are not flat, so the PSNR above means something.
    assert report["backends"]["torch"]["reference_image_contrast"] > 5.0


# bf16 keeps 8 mantissa bits: the tiny model's components measured 1e-3..1e-2 rel L2.
BF16_BOUNDS = (5e-2, 0.998, 25.0)
HAVE_OPENVINO = importlib.util.find_spec("openvino") is not None
HAVE_SDCPP = importlib.util.find_spec("stable_diffusion_cpp") is not None


def test_bench_measures_the_cpu_peers(tmp_path, tiny_engine_fp32):
    """openvino (ours, bf16 where the CPU has it), diffusers-bf16, and stable-diffusion.cpp
    (skipped with the reason where its package is missing), precision in the report."""
    from sd_deploy.runtime.backends.openvino import bf16_hardware

    report_dir = tmp_path / "report"
    result = invoke(
        [
            "--engine", tiny_engine_fp32,
            "--backends", "openvino,diffusers-bf16,stable-diffusion.cpp",
            "--steps", 2, "--batch", 1, "--runs", 1, "--warmup", 0,
            "--sampler", "dpmpp_2m_karras", "--threads", 1,
            "--report", report_dir, "--quiet",
        ]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = strict_loads((report_dir / "report.json").read_text())
    backends = report["backends"]
    assert sorted(backends) == ["diffusers-bf16", "openvino", "stable-diffusion.cpp", "torch"]
    if HAVE_OPENVINO:
        ov = backends["openvino"]
        assert ov["status"] == "ok", ov
        assert ov["precision"] == ("bf16" if bf16_hardware() else "fp32")
    else:
        assert backends["openvino"]["status"] == "skipped"
    if HAVE_DIFFUSERS:
        assert backends["diffusers-bf16"]["status"] == "ok"
        assert backends["diffusers-bf16"]["precision"] == "bf16"
        assert "vs_diffusers-bf16" in report["ratios"]
        assert "vs diffusers-bf16" in (report_dir / "report.md").read_text()
    for name in ("openvino", "diffusers-bf16"):
        entry = backends[name]
        if entry["status"] != "ok":
            continue
        max_rel_l2, min_cosine, min_psnr = (
            BF16_BOUNDS if entry["precision"] == "bf16" else PARITY_BOUNDS["fp32"]
        )
        for component, p in entry["parity"]["components"].items():
            assert p["rel_l2"] <= max_rel_l2, (name, component, p)
            assert p["cosine"] >= min_cosine, (name, component, p)
        psnr = entry["parity"]["images"]["psnr_db"]
        assert (math.inf if psnr == "inf" else psnr) >= min_psnr, (name, entry["parity"])
    sdcpp = backends["stable-diffusion.cpp"]
    if HAVE_SDCPP:  # it may refuse the tiny architecture: then it says so in one line
        assert sdcpp["status"] in ("ok", "failed"), sdcpp
        if sdcpp["status"] == "ok":
            assert sdcpp["latency"]["1"]["end_to_end"]["median"] > 0
        else:
            assert sdcpp["reason"].startswith("stable-diffusion.cpp: "), sdcpp
    else:
        assert sdcpp["status"] == "skipped"
        assert "stable-diffusion-cpp-python is not installed" in sdcpp["reason"]


# ------------------------------------------------------------------------------ errors


def one_line_error(result, fragment):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    assert fragment in lines[0], lines[0]


def test_unknown_backend_is_one_line(tiny_engine_fp32, tmp_path):
    r = invoke(["--engine", tiny_engine_fp32, "--backends", "torch,mlx", "--report", tmp_path])
    one_line_error(r, "unknown backend 'mlx'; choose from torch, tensorrt, onnxruntime")


@pytest.mark.parametrize(
    ("size", "fragment"),
    [
        ("big", "--size 'big' is not WIDTHxHEIGHT"),
        ("4x4", "too small"),
        ("68x64", "width 68 is not a multiple of 8"),
        ("1024x1024", "height 1024 is outside"),
    ],
)
def test_bad_size_is_one_line(tiny_engine_fp32, tmp_path, size, fragment):
    r = invoke(["--engine", tiny_engine_fp32, "--size", size, "--report", tmp_path / "r"])
    one_line_error(r, fragment)


def test_bad_batch_is_one_line(tiny_engine_fp32, tmp_path):
    r = invoke(["--engine", tiny_engine_fp32, "--batch", "1,two", "--report", tmp_path])
    one_line_error(r, "--batch '1,two' is not a list of positive integers")
    r = invoke(["--engine", tiny_engine_fp32, "--batch", "64", "--report", tmp_path])
    one_line_error(r, "batch 64 is outside")


def test_engine_dir_problems_are_one_line(tmp_path):
    r = invoke(["--engine", tmp_path / "nowhere", "--report", tmp_path / "r"])
    one_line_error(r, "does not exist (create one with sd-export)")
    (tmp_path / "empty").mkdir()
    r = invoke(["--engine", tmp_path / "empty", "--report", tmp_path / "r"])
    one_line_error(r, "has no manifest.json")


def test_unwritable_report_dir_is_one_line(tiny_engine_fp32, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = invoke(["--engine", tiny_engine_fp32, "--report", blocker / "report"])
    one_line_error(r, "is not writable")


def test_missing_model_source_is_one_line(tiny_engine_fp32, tmp_path):
    engines = tmp_path / "engines"
    shutil.copytree(tiny_engine_fp32, engines)
    manifest = json.loads((engines / "manifest.json").read_text())
    manifest["provenance"]["source"] = str(tmp_path / "gone.safetensors")
    (engines / "manifest.json").write_text(json.dumps(manifest))
    r = invoke(["--engine", engines, "--report", tmp_path / "r"])  # before any progress bar
    one_line_error(r, "gone.safetensors (from")
    r = invoke(["--engine", engines, "--report", tmp_path / "r", "--quiet", "--model", "tiny-v"])
    one_line_error(r, "is preset tiny-v, but the engines")


def test_reference_rebuilds_the_exported_weights(tiny_engine_fp32, tiny_models):
    import torch

    from sd_deploy.benchmarks.reference import load_reference_models
    from sd_deploy.engine_dir.manifest import read_manifest

    models, note = load_reference_models(read_manifest(tiny_engine_fp32), tiny_engine_fp32)
    assert note["source"] == "preset:tiny:random-seed-0" and not note["overridden"]
    for (key, got), want in zip(
        models.unet.state_dict().items(), tiny_models.unet.state_dict().values(), strict=True
    ):
        assert torch.equal(got, want), key


# ------------------------------------------------------------------------- parsing, stats


def test_parse_backends_puts_the_reference_first():
    assert parse_backends("onnxruntime, diffusers") == ("torch", "onnxruntime", "diffusers")
    assert parse_backends("torch,torch,tensorrt") == ("torch", "tensorrt")
    with pytest.raises(UserError, match="names no backend"):
        parse_backends(" , ")


def test_parse_batches_and_size():
    assert parse_batches("1,2,4") == (1, 2, 4)
    assert parse_batches("2, 2,1") == (2, 1)
    for bad in ("", "0", "1,-2", "1.5"):
        with pytest.raises(UserError, match="positive integers"):
            parse_batches(bad)
    assert parse_size("640x384") == (640, 384)  # width x height
    assert parse_size("512") == (512, 512)
    assert parse_size(" 768 X 512 ") == (768, 512)
    for bad in ("512x", "x512", "-8x8", "512x512x3"):
        with pytest.raises(UserError, match="WIDTHxHEIGHT"):
            parse_size(bad)


def test_summarize():
    stats = summarize(float(v) for v in range(1, 11))
    assert stats == {"median": 5.5, "p90": pytest.approx(9.1), "min": 1.0, "max": 10.0,
                     "mean": 5.5, "n": 10}  # fmt: skip
    assert summarize([0.25]) == {"median": 0.25, "p90": 0.25, "min": 0.25, "max": 0.25,
                                 "mean": 0.25, "n": 1}  # fmt: skip
    assert summarize([]) == {"n": 0}


def test_ratios_are_baseline_over_backend():
    def entry(e2e, unet, best=1.0):
        return {
            "status": "ok",
            "load_s": 2.0,
            "latency": {
                "1": {
                    "end_to_end": {"median": e2e, "min": best},
                    "components": {"unet": {"median": unet}},
                }
            },
        }

    backends = {
        "torch": entry(8.0, 0.8),
        "diffusers": entry(4.0, 0.4),
        "onnxruntime": entry(2.0, 0.1, best=0.5),
        "tensorrt": {"status": "skipped", "reason": "not installed"},
    }
    r = ratios(backends, (1,))
    assert r["vs_torch"]["onnxruntime"]["latency"]["1"] == {
        "end_to_end": 4.0,
        "end_to_end_best": 2.0,
        "unet": 8.0,
    }
    assert r["vs_diffusers"]["onnxruntime"]["latency"]["1"]["end_to_end"] == 2.0
    assert r["vs_diffusers"]["torch"]["latency"]["1"]["end_to_end"] == 0.5
    assert "tensorrt" not in r["vs_torch"]


def test_stopwatch_and_timed_backend(tiny_engine_fp32):
    from sd_deploy.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from sd_deploy.runtime.pipeline import Pipeline

    with Stopwatch() as sw:
        sum(range(10000))
    assert sw.seconds > 0
    timed = TimedBackend(OnnxRuntimeBackend("cpu"))
    pipe = Pipeline(tiny_engine_fp32, backend=timed)
    feeds = {"input_ids": pipe.tokenizer.encode(["a cat", "a dog"])}
    if any(t.name == "clip_skip" for t in pipe.manifest.components["text_encoder"].inputs):
        feeds["clip_skip"] = np.array([1], np.int32)
    pipe.run_component("text_encoder", feeds)
    pipe.run_component("text_encoder", feeds)
    calls = timed.log.snapshot()
    assert list(calls) == ["text_encoder"] and len(calls["text_encoder"]) == 2
    assert all(t > 0 for t in calls["text_encoder"])
    timed.log.clear()
    assert timed.log.snapshot() == {}


def test_memory_watch_sees_an_allocation():
    assert host_rss_mib() > 0 and host_peak_rss_mib() >= host_rss_mib() - 1
    with MemoryWatch() as watch:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        del block
    mem = watch.read()
    assert mem["host_peak_mib"] > 0
    if mem["peak_is_per_phase"]:
        assert mem["host_delta_mib"] >= 48, mem


# ------------------------------------------------------------------------ parity, report


def test_component_parity_reports_the_worst_sample():
    want = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
    calls = [
        ComponentCall("unet", {"x": want.copy()}, {"out": want}, f"step {i}") for i in range(1, 6)
    ]
    captured = Captured()
    for call in calls:
        captured.add(call)
    samples = captured.samples(unet_samples=3)
    assert [s.label for s in samples] == ["step 1", "step 3", "step 5"]

    def run(component, inputs):
        scale = 1.0 + 1e-3 * (inputs["x"] is samples[1].inputs["x"])
        return {"out": inputs["x"] * np.float32(scale)}

    result = component_parity(run, samples)["unet"]
    assert result["rel_l2"] == pytest.approx(1e-3, rel=1e-3)
    assert [s["rel_l2"] for s in result["samples"]][0] == 0.0
    assert result["cosine"] == pytest.approx(1.0)


def test_image_parity_and_grid(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    same = image_parity(a, a.copy())
    assert same["psnr_db"] == math.inf and same["ssim"] == pytest.approx(1.0)
    b = a.copy()
    b[0, 0, 0, 0] ^= 1
    close = image_parity(b, a)
    assert 60 < close["psnr_db"] < math.inf and close["max_abs_levels"] == 1
    diff = amplified_difference(b[0], a[0], gain=50)
    assert diff[0, 0].tolist() == [50, 50, 50] and diff[1:].max() == 0
    path = image_grid(a, [("onnxruntime", b)], tmp_path / "grid.png")
    with Image.open(path) as image:
        assert image.width >= 3 * 160


def test_latency_chart_and_strict_json(tmp_path):
    path = latency_chart(
        [("UNet (per step)", [("torch", 1.5), ("onnxruntime", 0.5)])],
        ["torch", "onnxruntime"],
        tmp_path / "chart.png",
        title="t",
    )
    with Image.open(path) as image:
        assert image.width == 760
    data = strict_json({"a": math.inf, "b": [math.nan, np.float32(0.5)], "c": -math.inf})
    assert data == {"a": "inf", "b": [None, 0.5], "c": "-inf"}
    json.dumps(data, allow_nan=False)


def test_a_backend_failing_part_way_drops_only_the_steps_it_did_not_run():
    """The bar's total shrinks by what the failed backend will never count, so it ends full."""
    from sd_deploy.benchmarks.harness import Progress

    with Progress(True, 30) as progress:
        for _ in range(5):  # an earlier backend's steps
            progress.step()
        since = progress.done
        for _ in range(3):  # the failing backend ran 3 of its 10
            progress.step()
        progress.give_up(since, 10)
        assert (progress.bar.n, progress.bar.total) == (8, 23)
        progress.give_up(progress.done, 0)  # nothing planned: nothing dropped
        assert progress.bar.total == 23
