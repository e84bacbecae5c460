"""Run-time LoRA switching on a --lora-ready engine dir against a merged export.

The default (trained) model, fp32, ONNX Runtime CPU. One LoRA file (kohya, every
attention and conv layer of the UNet and every text-encoder linear) is

- merged before export (`sd-export --lora FILE:0.8`), and
- applied at run time to the base export (`GenerationRequest.loras`, `<lora:...>` tags);

the images must agree (PSNR >= 40 dB), and switching back to no LoRA must give the base
images bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from lora_files import write_lora  # noqa: E402

from sd_deploy.errors import UserError  # noqa: E402
from sd_deploy.metrics import psnr  # noqa: E402
from sd_deploy.runtime import GenerationRequest, Pipeline  # noqa: E402

SCALE = 0.8


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(base lora-ready engine dir, merged engine dir, LoRA file, second LoRA file)."""
    from sd_deploy.exporter import export_engine_dir
    from sd_deploy.models import load_models
    from sd_deploy.models.lora import LoraSpec, merge_loras

    root = tmp_path_factory.mktemp("lora")
    models = load_models()
    style = write_lora(root / "style.safetensors", models, "kohya", rank=4, alpha=2.0,
                       every=True, magnitude=0.03)  # fmt: skip
    other = write_lora(root / "other.safetensors", models, "peft", rank=2, seed=9,
                       components=("unet",), magnitude=0.03)  # fmt: skip
    base = root / "base"
    export_engine_dir(models, base, lora_ready=True, progress=False)
    applied = merge_loras(models, [LoraSpec(style, SCALE)])
    merged = root / "merged"
    export_engine_dir(
        models, merged, progress=False, validate=False, loras=[a.to_dict() for a in applied]
    )
    return base, merged, style, other


def request(**kw) -> GenerationRequest:
    args = {"prompt": "a red circle on a blue square", "seed": 3, "steps": 8, "batch": 2}
    return GenerationRequest(**{**args, **kw})


def test_switching_matches_the_merged_export_and_back_is_bit_exact(dirs) -> None:
    base_dir, merged_dir, style, other = dirs
    with Pipeline(merged_dir, backend="onnxruntime-cpu") as merged:
        want = merged.generate(request())
        assert f"<lora:style:{SCALE:g}>" in want.parameters[0].infotext()

    with Pipeline(base_dir, backend="onnxruntime-cpu") as pipe:
        base = pipe.generate(request()).images
        styled = pipe.generate(request(loras=[(style, SCALE)]))
        quality = psnr(styled.images / 255.0, want.images / 255.0)
        effect = psnr(base / 255.0, want.images / 255.0)
        print(
            f"run-time LoRA vs merged export: PSNR {quality:.1f} dB (base vs merged {effect:.1f})"
        )
        assert quality >= 40.0
        assert effect < 30.0  # the LoRA really changes the images
        text = styled.parameters[0].infotext()
        assert f"a red circle on a blue square <lora:style:{SCALE:g}>" in text
        assert 'Lora hashes: "style: ' in text
        # merged or switched, the image says the same LoRA, hash included
        assert styled.parameters[0].loras == want.parameters[0].loras
        assert len(want.parameters[0].loras[0][2]) == 12

        back = pipe.generate(request()).images
        assert np.array_equal(back, base)  # the base sessions were never touched

        # two sets kept (LRU of 2), alternating: each image is what that set gives
        pipe.lora.cache.max_sets = 2
        again = pipe.generate(request(loras=[f"{other}:0.5"])).images
        assert not np.array_equal(again, base)
        assert np.array_equal(pipe.generate(request(loras=[(style, SCALE)])).images, styled.images)
        assert np.array_equal(pipe.generate(request(loras=[f"{other}:0.5"])).images, again)
        assert len(pipe.lora.cache) == 2
        assert np.array_equal(pipe.generate(request()).images, base)

    with Pipeline(base_dir, backend="onnxruntime-cpu") as fresh:
        assert np.array_equal(fresh.generate(request()).images, base)


def test_prompt_tags_and_batching(dirs) -> None:
    base_dir, _, style, _ = dirs
    with Pipeline(base_dir, backend="onnxruntime-cpu") as pipe:
        pipe.lora_dirs = [style.parent]
        tagged = pipe.generate(
            request(prompt=f"a red circle on a blue square <lora:style:{SCALE}>")
        )
        given = pipe.generate(request(loras=[(style, SCALE)]))
        assert np.array_equal(tagged.images, given.images)
        assert tagged.parameters[0].prompt == "a red circle on a blue square"
        # a tag repeating a request LoRA at the same scale adds nothing
        both = pipe.generate(request(prompt=f"a red circle on a blue square <lora:style:{SCALE}>",
                                     loras=[(style, SCALE)]))  # fmt: skip
        assert np.array_equal(both.images, given.images)
        # requests with different LoRA sets never share a batch
        a, b = pipe.generate_many([request(batch=1), request(batch=1, loras=[(style, SCALE)])])
        assert np.array_equal(b.images[0], given.images[0])
        assert not np.array_equal(a.images[0], b.images[0])


def test_bad_run_time_loras_are_one_line_errors(dirs, tmp_path) -> None:
    base_dir, merged_dir, style, _ = dirs

    def refused(pipe, req, match):
        with pytest.raises(UserError) as info:
            pipe.validate(req)
        assert match in str(info.value) and "\n" not in str(info.value), str(info.value)

    with Pipeline(base_dir, backend="onnxruntime-cpu") as pipe:
        refused(pipe, request(prompt="x <lora:style:strong>"), "is not a number")
        refused(pipe, request(prompt="x <lora:nowhere:1>"), "no nowhere.safetensors")
        refused(pipe, request(loras=[(style, "abc")]), "is not a number")
        refused(pipe, request(loras=[tmp_path / "missing.safetensors"]), "does not exist")
        cut = tmp_path / "cut.safetensors"
        cut.write_bytes(style.read_bytes()[:1000])
        refused(pipe, request(loras=[cut]), "truncated")
        pipe.lora_dirs = [style.parent]
        refused(pipe, request(prompt="x <lora:style:0.5>", loras=[(style, 1.0)]), "disagrees")
    with Pipeline(merged_dir, backend="onnxruntime-cpu") as merged:
        refused(merged, request(loras=[(style, 1.0)]), "exported without --lora-ready")
        merged.lora_dirs = [style.parent]
        refused(merged, request(prompt="x <lora:style:0.5>"), "merged into this engine dir")
        # the merged LoRA's own tag at its own scale is accepted and changes nothing
        merged.validate(request(prompt=f"x <lora:style:{SCALE}>"))


def test_cli_lora_flags(dirs, tmp_path) -> None:
    from click.testing import CliRunner

    from sd_deploy.cli import export_command, run_command

    base_dir, _, style, _ = dirs
    runner = CliRunner()
    result = runner.invoke(
        run_command,
        ["--engine", str(base_dir), "--prompt", "a red circle", "--steps", "2", "--seed", "1",
         "--lora", f"{style}:{SCALE}", "--out", str(tmp_path / "out"), "--quiet",
         "--backend", "onnxruntime-cpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    from PIL import Image

    png = next((tmp_path / "out").glob("*.png"))
    assert f"<lora:style:{SCALE:g}>" in Image.open(png).info["parameters"]

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    out = tmp_path / "never"
    result = runner.invoke(
        export_command,
        ["--model", "tiny", "--random-weights", "--lora", f"{bad}:0.5", "--out", str(out)],
    )
    assert result.exit_code != 0
    assert "has no LoRA weights" in result.output, result.output
    assert not out.exists()  # nothing written
    result = runner.invoke(
        export_command, ["--model", "tiny", "--random-weights", "--lora", f"{style}:x"]
    )
    assert result.exit_code != 0 and "is not a number" in result.output


def test_refit_backends_get_the_same_weights_and_base_back(dirs) -> None:
    """A backend that refits (TensorRT) is given exactly the arrays ONNX Runtime sessions
    get, and on switching back the exported base values of everything touched."""
    from sd_deploy.engine_dir.lora import LoraSpec
    from sd_deploy.runtime.lora import LoraLibrary, PipelineLoras

    base_dir, _, style, other = dirs
    library = LoraLibrary(base_dir)
    weights = {
        c: {n: t.initializer(n).copy() for n in t.data["initializers"]}
        for c, t in library.components.items()
    }
    base = {c: {n: a.copy() for n, a in w.items()} for c, w in weights.items()}

    class RefitBackend:
        name = "fake-tensorrt"

        def refit(self, session, new, base_of):
            for name, array in new.items():
                assert name in weights[session]
                weights[session][name] = np.array(array)

    loras = PipelineLoras(base_dir, RefitBackend(), lambda n: None, lambda n: n)
    loras.select([LoraSpec(style, SCALE)])
    _, resolved, _ = library.resolve([LoraSpec(style, SCALE)])
    expected = library.patches(resolved)
    for component, patches in expected.items():
        for name, patch in patches.items():
            assert weights[component][name].tobytes() == patch.array().tobytes()
    loras.select([LoraSpec(other, 0.5)])  # touches the unet only: the text encoder is restored
    for name, array in weights["text_encoder"].items():
        assert array.tobytes() == base["text_encoder"][name].tobytes(), name
    loras.select([])
    for component in weights:
        for name, array in weights[component].items():
            assert array.tobytes() == base[component][name].tobytes(), name


def test_refit_after_a_reload_starts_from_base(dirs) -> None:
    """keep_loaded=False reloads engines (with base weights) between generations: the
    refit state follows the session, and a closed engine is not 'restored'."""
    from types import SimpleNamespace

    from sd_deploy.engine_dir.lora import LoraSpec
    from sd_deploy.runtime.lora import PipelineLoras

    base_dir, _, style, _ = dirs
    calls: list[tuple[str, int]] = []

    class RefitBackend:
        name = "fake-tensorrt"

        def refit(self, session, new, base_of):
            calls.append((session.name, len(new)))

    sessions: dict[str, SimpleNamespace] = {}

    def load(name):
        sessions[name] = SimpleNamespace(name=name, engine=object())
        return sessions[name]

    loras = PipelineLoras(base_dir, RefitBackend(), lambda n: None, load)
    loras.select([LoraSpec(style, SCALE)])
    first = dict(calls)
    calls.clear()
    loras.select([LoraSpec(style, SCALE)])  # reloaded sessions: refit again, same weights
    assert dict(calls) == first
    calls.clear()
    for session in sessions.values():
        session.engine = None  # closed (keep_loaded=False)
    loras.select([])
    assert calls == []


def test_sdxl_switches_both_text_towers_and_the_unet(tmp_path) -> None:
    """tiny-xl: a kohya SDXL LoRA (lora_unet_, lora_te1_, lora_te2_) applied at run time
    gives the merged export's images; text_encoder_2 gets its own patched session."""
    from sd_deploy.exporter import export_engine_dir
    from sd_deploy.models import load_models
    from sd_deploy.models.lora import LoraSpec, merge_loras

    models = load_models("tiny-xl", random_init=True, seed=5)
    style = write_lora(tmp_path / "xl.safetensors", models, "kohya", rank=4, every=True,
                       components=("unet", "text_encoder", "text_encoder_2"),
                       magnitude=0.08)  # fmt: skip
    names = ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    base, merged = tmp_path / "base", tmp_path / "merged"
    export_engine_dir(models, base, components=names, lora_ready=True, progress=False,
                      validate=False)  # fmt: skip
    assert (base / "text_encoder_2" / "lora_targets.json").is_file()
    applied = merge_loras(models, [LoraSpec(style, SCALE)])
    export_engine_dir(models, merged, components=names, progress=False, validate=False,
                      loras=[a.to_dict() for a in applied])  # fmt: skip
    xl = {"width": 128, "height": 128, "steps": 4, "batch": 1}
    with Pipeline(merged, backend="onnxruntime-cpu") as pipe:
        want = pipe.generate(request(**xl)).images
    with Pipeline(base, backend="onnxruntime-cpu") as pipe:
        plain = pipe.generate(request(**xl)).images
        styled = pipe.generate(request(**xl, loras=[(style, SCALE)])).images
        assert set(pipe.lora.cache.get(pipe.lora.key, dict)) >= {"text_encoder_2", "unet"}
        assert np.array_equal(pipe.generate(request(**xl)).images, plain)
    quality, effect = psnr(styled / 255.0, want / 255.0), psnr(plain / 255.0, want / 255.0)
    print(f"SDXL run-time LoRA vs merged: PSNR {quality:.1f} dB (base vs merged {effect:.1f})")
    assert quality >= 40.0 and effect < 30.0


def test_patched_sessions_come_from_the_graph_cache_and_equal_the_source_path(dirs) -> None:
    """With the optimized-graph cache written, a LoRA switch loads the cached graph with the
    patched weights put where the optimizer moved them (MatMul weights by name, convolution
    filters in MLAS's blocked layout), instead of optimizing the source graph again: the
    images must be those of the source path bit for bit."""
    from sd_deploy.runtime import BackendOptions
    from sd_deploy.runtime.backends.ort_patch_map import PATCH_MAP_NAME

    base_dir, _, style, _ = dirs
    with Pipeline(base_dir, backend="onnxruntime-cpu") as pipe:
        pipe.generate(request())  # the base load writes the cache entries
        fast = pipe.generate(request(loras=[(style, SCALE)])).images
        sessions = pipe.lora.cache.get(pipe.lora.key, dict)
        assert sessions["unet"].from_graph_cache, "a UNet weight was not found in the cache"
        assert sessions["text_encoder"].from_graph_cache
    maps = list((base_dir / "unet").glob(f"ort_cpu_cache/*/{PATCH_MAP_NAME}"))
    assert len(maps) == 1
    source = BackendOptions(graph_cache=False)
    with Pipeline(base_dir, backend="onnxruntime-cpu", options=source) as slow:
        want = slow.generate(request(loras=[(style, SCALE)])).images
        assert not slow.lora.cache.get(slow.lora.key, dict)["unet"].from_graph_cache
    assert np.array_equal(fast, want)

    maps[0].write_text("{not json")  # a damaged map is found again, not trusted
    with Pipeline(base_dir, backend="onnxruntime-cpu") as pipe:
        assert np.array_equal(pipe.generate(request(loras=[(style, SCALE)])).images, want)
        assert pipe.lora.cache.get(pipe.lora.key, dict)["unet"].from_graph_cache


def test_fp16_engine_dirs_switch_like_their_merged_export(tmp_path) -> None:
    """An fp16 --lora-ready export: the patch is summed in float32 and cast to fp16 once,
    as the merged fp16 export is; images within 40 dB (measured 60 dB: fp16 rounding of
    the merged weights in torch vs numpy; without the LoRA 26 dB), and no LoRA gives the
    base images bit for bit."""
    from sd_deploy.exporter import export_engine_dir
    from sd_deploy.models import load_models
    from sd_deploy.models.lora import LoraSpec, merge_loras

    models = load_models()
    style = write_lora(tmp_path / "style.safetensors", models, "kohya", rank=4, alpha=2.0,
                       every=True, magnitude=0.03)  # fmt: skip
    export_engine_dir(models, tmp_path / "base", lora_ready=True, progress=False, fp16=True)
    applied = merge_loras(models, [LoraSpec(style, SCALE)])
    export_engine_dir(models, tmp_path / "merged", progress=False, validate=False, fp16=True,
                      loras=[a.to_dict() for a in applied])  # fmt: skip
    with Pipeline(tmp_path / "base", backend="onnxruntime-cpu") as pipe:
        base = pipe.generate(request()).images
        switched = pipe.generate(request(loras=[(style, SCALE)])).images
        assert np.array_equal(pipe.generate(request()).images, base)
    with Pipeline(tmp_path / "merged", backend="onnxruntime-cpu") as merged:
        want = merged.generate(request()).images
    assert psnr(switched / 255.0, want / 255.0) >= 40.0
