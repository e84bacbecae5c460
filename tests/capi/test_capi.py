"""The C ABI (capi/): built with CMake, run from C and C++, byte for byte equal to Python.

sd_capi_test (capi/tests/sd_capi_test.c) writes each image's raw RGB and parameters;
these tests make the same requests through Python's Pipeline.generate and compare.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from capi_support import CAPI, DEFAULT_CASES, cmake_configure, run

PROMPT_TXT2IMG = "a red star on a white background"


@pytest.fixture(scope="module")
def python_pipe(default_engine_dir):
    from sd_deploy.runtime import Pipeline

    with Pipeline(default_engine_dir) as pipe:
        yield pipe


def python_generate(pipe, **request):
    from sd_deploy.runtime import GenerationRequest

    return pipe.generate(GenerationRequest(**request))


def init_pattern(width: int = 64, height: int = 64) -> np.ndarray:
    """The gradient sd_capi_test.c's init_pattern makes."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)


@pytest.fixture(scope="module")
def c_results(capi_build, default_engine_dir, clean_env, tmp_path_factory) -> Path:
    """Every default case of sd_capi_test, run once; its output dir."""
    out = tmp_path_factory.mktemp("capi-out")
    done = run(
        [str(capi_build / "sd_capi_test"), str(default_engine_dir), str(out)],
        env=clean_env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # The library prints nothing to stdout: only the test program's own lines are there.
    assert all(re.fullmatch(r"ok \w+", line) for line in done.stdout.splitlines()), done.stdout
    assert done.stdout.split() == [w for case in DEFAULT_CASES for w in ("ok", case)]
    return out


def read_rgb(path: Path, batch: int, size: int = 64) -> np.ndarray:
    return np.frombuffer(path.read_bytes(), np.uint8).reshape(batch, size, size, 3)


def test_txt2img_is_byte_identical_to_python(c_results, python_pipe):
    result = python_generate(python_pipe, prompt=PROMPT_TXT2IMG, seed=7, steps=20)
    assert (c_results / "txt2img.rgb").read_bytes() == result.images.tobytes()
    assert (c_results / "txt2img.txt").read_text() == result.parameters[0].infotext()
    assert (c_results / "backend.txt").read_text() == python_pipe.backend_name


def test_img2img_is_byte_identical_to_python(c_results, python_pipe):
    result = python_generate(
        python_pipe,
        prompt="a blue circle on a gray background",
        seed=3,
        steps=20,
        init_image=init_pattern(),
        strength=0.6,
    )
    c_image = read_rgb(c_results / "img2img.rgb", 1)
    np.testing.assert_array_equal(c_image, result.images)
    assert (c_results / "img2img.txt").read_text() == result.parameters[0].infotext()
    # img2img really started from the init image: the same request from noise differs
    txt2img = python_generate(
        python_pipe, prompt="a blue circle on a gray background", seed=3, steps=20
    )
    assert not np.array_equal(c_image, txt2img.images)


def test_batch_of_two_is_byte_identical_to_python(c_results, python_pipe):
    result = python_generate(
        python_pipe, prompt="a green square on a black background", seed=11, steps=20, batch=2
    )
    c_images = read_rgb(c_results / "batch2.rgb", 2)
    np.testing.assert_array_equal(c_images, result.images)
    assert not np.array_equal(c_images[0], c_images[1])


def test_two_threads_each_with_its_pipeline_match_python(c_results, python_pipe):
    for i, seed in enumerate((21, 22)):
        result = python_generate(
            python_pipe, prompt="a purple star on a white background", seed=seed, steps=20
        )
        assert (c_results / f"thread{i}.rgb").read_bytes() == result.images.tobytes(), i
        assert (c_results / f"thread{i}.txt").read_text() == result.parameters[0].infotext()


def seed_of(parameters: str) -> int:
    found = re.search(r"Seed: (\d+)", parameters)
    assert found, parameters
    return int(found.group(1))


def test_options_and_prompt_reading_are_byte_identical_to_python(c_results, default_engine_dir):
    """sd_pipeline_create_with_options (threads 1) and clip_skip 2 / emphasis 0, against
    Python's Pipeline with the same options and request."""
    from sd_deploy.runtime import BackendOptions, Pipeline

    with Pipeline(default_engine_dir, options=BackendOptions(threads=1)) as pipe:
        result = python_generate(
            pipe,
            prompt="a (red:1.4) star BREAK on a white background",
            seed=7,
            steps=20,
            clip_skip=2,
            emphasis=False,
        )
    got = read_rgb(c_results / "options.rgb", 1)
    assert got.tobytes() == result.images.tobytes()
    text = (c_results / "options.txt").read_text()
    assert text == result.parameters[0].infotext()
    assert "Clip skip: 2" in text and "Emphasis: None" in text


def test_zero_and_negative_fields_mean_engine_defaults(c_results, python_pipe):
    first = (c_results / "defaults-1.txt").read_text()
    second = (c_results / "defaults-2.txt").read_text()
    steps = python_pipe.manifest.scheduler.get("default_steps")
    assert f"Steps: {steps}," in first
    # seed -1 is random, and the seed drawn is the one reported
    assert seed_of(first) != seed_of(second)


def read_errors(path: Path) -> dict[str, tuple[str, str]]:
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    return {name: (status, message) for name, status, message in rows}


def test_every_error_code_with_its_message(c_results):
    errors = read_errors(c_results / "errors.txt")
    expected = {
        "bad_engine_dir": ("SD_ERR_ENGINE_DIR", "/nonexistent/engine-dir"),
        "null_engine_dir": ("SD_ERR_INVALID_ARGUMENT", "engine_dir is NULL"),
        "width_500": ("SD_ERR_INVALID_ARGUMENT", "500"),
        "unknown_sampler": ("SD_ERR_INVALID_ARGUMENT", "no_such_sampler"),
        "steps_negative": ("SD_ERR_INVALID_ARGUMENT", "steps"),
        "null_prompt": ("SD_ERR_INVALID_ARGUMENT", "prompt is NULL"),
        "null_rgb": ("SD_ERR_INVALID_ARGUMENT", "rgb is NULL"),
        "strength_0": ("SD_ERR_INVALID_ARGUMENT", "strength"),
        "buffer_too_small": ("SD_ERR_BUFFER_TOO_SMALL", "12287 bytes"),
        "cancel_at_step_2": ("SD_ERR_CANCELLED", "cancel"),
        "nonfinite": ("SD_ERR_NONFINITE", "NaN"),
        "lora_missing": ("SD_ERR_CHECKPOINT", "no_such_lora"),
        "clip_skip_99": ("SD_ERR_INVALID_ARGUMENT", "clip skip 99"),
        "clip_skip_negative": ("SD_ERR_INVALID_ARGUMENT", "clip_skip must be an integer >= 1"),
        "bf16_on_onnxruntime": ("SD_ERR_INVALID_ARGUMENT", "precision bf16 needs --backend"),
        "unknown_precision": ("SD_ERR_INVALID_ARGUMENT", "unknown precision 'fp16'"),
        "threads_negative": ("SD_ERR_INVALID_ARGUMENT", "threads must be >= 0"),
        "null_options": ("SD_OK", ""),
        "after_errors": ("SD_OK", ""),
    }
    for name, (status, fragment) in expected.items():
        got_status, message = errors[name]
        assert got_status == status, (name, errors[name])
        assert fragment in message, (name, message)
        if status != "SD_OK":
            assert message.strip(), name
    assert errors["unknown_backend"][0] in {"SD_ERR_INVALID_ARGUMENT", "SD_ERR_BACKEND"}
    assert "no-such-backend" in errors["unknown_backend"][1]


def test_c_statuses_are_the_python_errors_codes(c_results, python_pipe, default_engine_dir):
    """The statuses come from the exceptions' `code`: provoke each one in Python too."""
    from sd_deploy.errors import ErrorCode, UserError
    from sd_deploy.runtime import GenerationRequest, Pipeline

    errors = read_errors(c_results / "errors.txt")
    with pytest.raises(UserError) as bad_dir:
        Pipeline("/nonexistent/engine-dir")
    assert bad_dir.value.code == ErrorCode.ENGINE_DIR
    assert errors["bad_engine_dir"][1] == str(bad_dir.value).splitlines()[0]
    for name, request in {
        "width_500": {"width": 500},
        "unknown_sampler": {"sampler": "no_such_sampler"},
        "steps_negative": {"steps": -1},
    }.items():
        with pytest.raises(UserError) as caught:
            python_pipe.validate(GenerationRequest(prompt="x", **request))
        assert caught.value.code == ErrorCode.INVALID_ARGUMENT == 1, name
        assert errors[name][1] == str(caught.value).splitlines()[0], name
    with pytest.raises(UserError) as cancelled:
        python_pipe.generate(
            GenerationRequest(prompt="x", steps=20), progress=lambda step, steps: step != 2
        )
    assert cancelled.value.code == ErrorCode.CANCELLED == 5
    assert errors["cancel_at_step_2"][1] == str(cancelled.value).splitlines()[0]
    with pytest.raises(UserError) as nonfinite:
        python_pipe.generate(
            GenerationRequest(prompt="a red circle on a white background", steps=20, guidance=3e38)
        )
    assert nonfinite.value.code == ErrorCode.NONFINITE == 4
    assert errors["nonfinite"][1] == str(nonfinite.value).splitlines()[0]
    # TensorRT: where it cannot load (no library, GPU or plans) both say so with one code
    try:
        Pipeline(default_engine_dir, backend="tensorrt").close()
    except UserError as exc:
        assert errors["backend_tensorrt"] == (f"SD_ERR_{exc.code.name}", str(exc).splitlines()[0])
        assert exc.code == ErrorCode.BACKEND or "tensorrt" in str(exc)
    else:
        assert errors["backend_tensorrt"][0] == "SD_OK"


def test_python_that_lacks_sd_deploy_is_sd_err_python(capi_build, default_engine_dir, tmp_path):
    base = getattr(sys, "_base_executable", None)
    if not base or sys.prefix == sys.base_prefix:
        pytest.skip("not in a venv: no base interpreter apart from this environment's")
    if run([base, "-c", "import sd_deploy"], cwd=tmp_path).returncode == 0:
        pytest.skip(f"{base} can import sd_deploy too")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["SD_DEPLOY_PYTHON"] = base
    program = str(capi_build / "sd_capi_test")
    done = run(
        [program, str(default_engine_dir), str(tmp_path), "python_missing"], env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    errors = read_errors(tmp_path / "python_missing.txt")
    status, message = errors["python_missing"]
    assert status == "SD_ERR_PYTHON"
    assert "cannot import sd_deploy" in message and "SD_DEPLOY_PYTHON" in message
    assert errors["python_missing_again"] == errors["python_missing"]


# --------------------------------------------------------------------- sd-generate-c


def read_ppm(path: Path) -> np.ndarray:
    data = path.read_bytes()
    magic, width, height, maxval, pixels = data.split(maxsplit=4)
    assert magic == b"P6" and maxval == b"255"
    return np.frombuffer(pixels, np.uint8).reshape(int(height), int(width), 3)


def test_example_program_writes_python_identical_images(
    capi_build, default_engine_dir, python_pipe, clean_env, tmp_path
):
    from PIL import Image

    prompt = "a orange circle on a black background"
    result = python_generate(python_pipe, prompt=prompt, seed=5, steps=20, batch=2)
    example = str(capi_build / "sd-generate-c")
    common = ["--engine-dir", str(default_engine_dir), "--prompt", prompt, "--seed", "5"]
    common += ["--steps", "20", "--batch", "2"]
    ppm = run([example, *common, "--out", str(tmp_path / "x.ppm")], env=clean_env)
    assert ppm.returncode == 0, ppm.stdout + ppm.stderr
    png = run([example, *common, "--quiet", "--out", str(tmp_path / "x.png")], env=clean_env)
    assert png.returncode == 0, png.stdout + png.stderr
    assert "step 20/20" in ppm.stderr and "step" not in png.stderr
    for i in range(2):
        infotext = result.parameters[i].infotext()
        np.testing.assert_array_equal(read_ppm(tmp_path / f"x-{i}.ppm"), result.images[i])
        with Image.open(tmp_path / f"x-{i}.png") as image:
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), result.images[i])
            assert image.info["parameters"] == infotext
        assert f"{infotext}\n-> {tmp_path / f'x-{i}.png'}" in png.stdout


def test_example_program_takes_the_options_and_prompt_reading(
    capi_build, default_engine_dir, clean_env, tmp_path
):
    """--backend --precision --threads --clip-skip --no-emphasis, against Python."""
    pytest.importorskip("openvino")
    from sd_deploy.runtime import BackendOptions, Pipeline

    prompt = "a (blue:1.3) square BREAK on a white background"
    options = BackendOptions(threads=1, precision="fp32")
    with Pipeline(default_engine_dir, backend="openvino", options=options) as pipe:
        want = python_generate(pipe, prompt=prompt, seed=2, steps=8, clip_skip=2, emphasis=False)
    done = run(
        [str(capi_build / "sd-generate-c"), "--engine-dir", str(default_engine_dir)]
        + ["--prompt", prompt, "--seed", "2", "--steps", "8", "--clip-skip", "2"]
        + ["--no-emphasis", "--backend", "openvino", "--precision", "fp32", "--threads", "1"]
        + ["--quiet", "--out", str(tmp_path / "o.ppm")],
        env=clean_env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    np.testing.assert_array_equal(read_ppm(tmp_path / "o.ppm"), want.images[0])
    assert want.parameters[0].infotext() in done.stdout
    bad = run(
        [str(capi_build / "sd-generate-c"), "--engine-dir", str(default_engine_dir)]
        + ["--prompt", "x", "--backend", "onnxruntime-cpu", "--precision", "bf16"],
        env=clean_env,
    )
    assert bad.returncode == 1 and "precision bf16 needs --backend openvino" in bad.stderr


def test_example_program_reports_a_user_error_on_one_line(
    capi_build, default_engine_dir, clean_env
):
    done = run(
        [str(capi_build / "sd-generate-c"), "--engine-dir", str(default_engine_dir)]
        + ["--prompt", "x", "--width", "500"],
        env=clean_env,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "500" in done.stderr


# --------------------------------------------------------------------- packaging


def test_installed_package_links_a_service_in_two_cmake_lines(
    capi_build, default_engine_dir, clean_env, tmp_path
):
    prefix = tmp_path / "prefix"
    installed = run(["cmake", "--install", str(capi_build), "--prefix", str(prefix)])
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert (prefix / "include" / "sd_deploy.h").exists()
    service = CAPI / "examples" / "service"
    build = tmp_path / "service-build"
    configured = cmake_configure(service, build, f"-DCMAKE_PREFIX_PATH={prefix}")
    assert configured.returncode == 0, configured.stdout + configured.stderr
    built = run(["cmake", "--build", str(build)])
    assert built.returncode == 0, built.stdout + built.stderr
    done = run([str(build / "sd_service"), str(default_engine_dir), PROMPT_TXT2IMG], env=clean_env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("1 image(s) 64x64\n") and "Seed: 42" in done.stdout
    # the installed example runs from its prefix too
    example = run([str(prefix / "bin" / "sd-generate-c"), "--help"])
    assert example.returncode == 0 and "usage" in example.stdout


def test_docs_show_the_service_example_as_built():
    docs = (CAPI.parent / "docs" / "embedding-c.md").read_text()
    for name in ("main.cpp", "CMakeLists.txt"):
        source = (CAPI / "examples" / "service" / name).read_text()
        assert source.strip() in docs, f"docs/embedding-c.md lacks examples/service/{name}"


def test_header_is_plain_c99(capi_build, tmp_path):
    """sd_deploy.h compiles as strict C99 and as C++ on its own."""
    source = tmp_path / "probe.c"
    source.write_text('#include "sd_deploy.h"\nint main(void) { return SD_OK; }\n')
    for compiler, std in (("cc", "-std=c99"), ("c++", "-std=c++17")):
        done = run(
            [compiler, std, "-Wall", "-Wextra", "-pedantic", "-Werror", "-fsyntax-only"]
            + ["-x", "c" if compiler == "cc" else "c++", f"-I{CAPI / 'include'}", str(source)]
        )
        assert done.returncode == 0, done.stderr
