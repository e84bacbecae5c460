"""sd-deploy: Stable Diffusion from PyTorch to ONNX and TensorRT, run by a numpy runtime.

Nothing heavy is imported here: `sd_deploy.runtime` must load without torch or onnx.
"""

__version__ = "0.1.0"
