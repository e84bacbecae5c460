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
