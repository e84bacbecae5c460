"""The PyTorch reference backend: what it promises beyond running the modules."""

from __future__ import annotations

import torch

from sd_deploy.benchmarks.torch_backend import TorchBackend


def test_cuda_fp32_reference_turns_tf32_off(tiny_models):
    # PyTorch's default lets cuDNN convolutions run fp32 as TF32: measured on an H200, that
    # put the tiny UNet 7.5e-4 (rel L2) off the CPU's, against 1.4e-6 with IEEE fp32.
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    try:
        conv.fp32_precision = matmul.fp32_precision = "tf32"
        TorchBackend(tiny_models, device="cpu")
        assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")
        TorchBackend(tiny_models, device="cuda")  # constructing it touches no GPU
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
    finally:
        conv.fp32_precision, matmul.fp32_precision = before


def test_an_engine_dir_from_before_clip_skip_runs_the_last_layer(tiny_models, tiny_engine_fp32):
    """sd-bench's reference on an engine dir whose text_encoder has no clip_skip input (an
    export from before Clip skip): the module gets Clip skip 1, the layer that graph reads."""
    import dataclasses

    import numpy as np

    from sd_deploy.engine_dir import read_manifest

    spec = read_manifest(tiny_engine_fp32).components["text_encoder"]
    assert [t.name for t in spec.inputs] == ["input_ids", "clip_skip"]
    old = dataclasses.replace(spec, inputs=spec.inputs[:1])
    backend = TorchBackend(tiny_models)
    ids = np.random.default_rng(0).integers(0, 400, (2, 77)).astype(np.int32)
    got = backend.open(tiny_engine_fp32, old).run({"input_ids": ids})["text_embeddings"]
    now = backend.open(tiny_engine_fp32, spec)
    want = now.run({"input_ids": ids, "clip_skip": np.ones(1, np.int32)})["text_embeddings"]
    np.testing.assert_array_equal(got, want)
