"""sd-bench: parity and latency of PyTorch, diffusers and every backend on the same work."""
