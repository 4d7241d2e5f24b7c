"""normfuse CUDA kernels and their TensorRT plugins.

Importable without TensorRT, a GPU or nvcc:
- `launch_config(op, dtype, rows, hidden)`: kernel name and launch shape, shared by the TensorRT
  `aot_impl` and the direct launcher (`plugins.launcher`), so GPU tests run what TensorRT runs.
- `get_ptx(op, x_dtype, gamma_dtype=None, arch=None)`: the PTX module (nvcc, cached on disk).
- `register_tensorrt_plugins()`: registers the four ops with `tensorrt.plugin` (imports TensorRT).
"""
from .build import ARCHES, ToolchainError, get_ptx, ptx_for_launch, ptxas_check, target_arch
from .config import LaunchConfig, epsilon_bits, kernel_name, launch_config, variants
from .trt import register_tensorrt_plugins

__all__ = [
    "ARCHES", "ToolchainError", "get_ptx", "ptx_for_launch", "ptxas_check", "target_arch", "LaunchConfig", "epsilon_bits",
    "kernel_name", "launch_config", "variants", "register_tensorrt_plugins",
]
