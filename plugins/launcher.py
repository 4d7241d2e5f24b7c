"""Launch the normfuse kernels directly on a GPU, as TensorRT's plugin would.

The launcher loads the PTX that `build.ptx_for_launch` returns and launches it with the
`config.launch_config` shape and the argument order of `trt.aot_impl` (inputs, rows, hidden,
epsilon bits, outputs), so the GPU tests prove the kernel TensorRT embeds. It uses CuPy's driver
bindings for module loading and launches and takes torch CUDA tensors (CuPy has no bfloat16).
`run` first refuses, with `check_operands`, what the kernel would misread from raw pointers: a
strided tensor, a residual unlike x, a gamma or beta that is not [hidden] in x's dtype or float32,
a beta in another dtype than gamma.
"""
from __future__ import annotations

import math
import os
import tempfile
from functools import lru_cache
from typing import Any

from normops import DEFAULT_EPSILON, OPS

from . import build, config

# a torch tensor's dtype prints as "torch.float32", a numpy array's (ml_dtypes' bfloat16 too) as "float32"
_DTYPE_NAMES = {f"{prefix}{name}": name for name in ("float32", "float16", "bfloat16") for prefix in ("torch.", "")}


def dtype_name(tensor: Any) -> str:
    """"float32", "float16" or "bfloat16" for a torch tensor or a numpy array."""
    name = _DTYPE_NAMES.get(str(tensor.dtype))
    if name is None:
        raise TypeError(f"unsupported dtype {tensor.dtype}")
    return name


def _contiguous(tensor: Any) -> bool:
    return tensor.is_contiguous() if hasattr(tensor, "is_contiguous") else bool(tensor.flags.c_contiguous)


def named_inputs(op: str, inputs: tuple[Any, ...]) -> dict[str, Any]:
    """Inputs given in contract order (x, [residual], gamma, [beta]), by name."""
    spec = OPS[op]
    names = spec.inputs + (("beta",) if "beta" in spec.optional_inputs else ())
    if len(inputs) != len(names):
        raise TypeError(f"{op} takes {names}, got {len(inputs)} tensors")
    return dict(zip(names, inputs))


def rows_and_hidden(shape: tuple[int, ...]) -> tuple[int, int]:
    """What the kernels see of x: rows of `hidden` (last axis) elements."""
    hidden = int(shape[-1]) if len(shape) else 1
    return (int(math.prod(shape)) // hidden if hidden else 0), hidden


_LOADED: list[Any] = []


@lru_cache(maxsize=None)
def _function(ptx: str, kernel: str) -> Any:
    import cupy

    from .build import check_driver_loads, driver_cuda_version, ptx_release

    check_driver_loads(ptx_release(ptx), driver_cuda_version(), f"{kernel} is")
    # CuPy loads PTX from a file (the driver JIT-compiles it for the device, as TensorRT does).
    fd, path = tempfile.mkstemp(suffix=".ptx")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(ptx)
        module = cupy.RawModule(path=path)
        _LOADED.append(module)  # keep every loaded module alive for the process
        return module.get_function(kernel)
    finally:
        os.unlink(path)


class Launch:
    """A prepared launch: resolves the kernel once, then `__call__` only enqueues it."""

    def __init__(self, op: str, x_dtype: str, gamma_dtype: str, rows: int, hidden: int,
                 layout: tuple[int, ...] | None = None, arch: str | None = None):
        self.spec = OPS[op]
        self.cfg = config.launch_config(op, x_dtype, rows, hidden, layout=layout)
        self.ptx = build.ptx_for_launch(op, x_dtype, gamma_dtype, self.cfg, arch)
        self.function = _function(self.ptx, self.cfg.kernel)
        self.rows, self.hidden = rows, hidden

    def __call__(self, inputs: list[int], outputs: list[int], epsilon: float = DEFAULT_EPSILON,
                 stream: int = 0) -> None:
        """Enqueue on `stream` (a cudaStream_t as int). inputs/outputs are device pointers in contract order."""
        import cupy
        import numpy as np

        if self.rows == 0:
            return
        args = ([np.uint64(p) for p in inputs]
                + [np.int32(self.rows), np.int32(self.hidden), np.int32(config.epsilon_bits(epsilon))]
                + [np.uint64(p) for p in outputs])
        with cupy.cuda.ExternalStream(stream):
            self.function((int(self.cfg.grid),), (self.cfg.block,), tuple(args), shared_mem=self.cfg.shared_mem)


def check_operands(op: str, named: dict[str, Any]) -> None:
    """Refuse what the kernel would read wrongly instead of failing: it takes raw pointers, so a
    residual of another shape or dtype than x, a scale that is not [hidden], a beta in another
    dtype than gamma, or a strided tensor would be read as garbage."""
    x = named["x"]
    x_dtype = dtype_name(x)
    hidden = rows_and_hidden(tuple(x.shape))[1]
    for name, t in named.items():
        if not _contiguous(t):
            raise ValueError(f"{op}: {name} must be contiguous")
        dtype = dtype_name(t)
        if name == "residual" and (dtype != x_dtype or tuple(t.shape) != tuple(x.shape)):
            raise ValueError(f"{op}: residual is {dtype} {tuple(t.shape)}, x is {x_dtype} {tuple(x.shape)}; they must match")
        if name in ("gamma", "beta"):
            if tuple(t.shape) != (hidden,):
                raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected ({hidden},) for hidden {hidden}")
            if dtype not in (x_dtype, "float32"):
                raise ValueError(f"{op}: {name} is {dtype}; it must be x's dtype ({x_dtype}) or float32")
    if "beta" in named and dtype_name(named["beta"]) != dtype_name(named["gamma"]):
        raise ValueError(f"{op}: gamma is {dtype_name(named['gamma'])} and beta {dtype_name(named['beta'])}; "
                         "they must share one dtype")


def check_outputs(op: str, x: Any, outputs: tuple[Any, ...]) -> None:
    """Outputs given by the caller are written through raw pointers too: one per op output, each
    contiguous and shaped and typed like x."""
    names = OPS[op].outputs
    if len(outputs) != len(names):
        raise TypeError(f"{op} writes {names}, got {len(outputs)} output tensors")
    for name, t in zip(names, outputs):
        if not t.is_contiguous() or tuple(t.shape) != tuple(x.shape) or t.dtype != x.dtype:
            raise ValueError(f"{op}: output {name} must be a contiguous {x.dtype} tensor of shape {tuple(x.shape)}, "
                             f"got {'a strided ' if not t.is_contiguous() else ''}{t.dtype} {tuple(t.shape)}")


def check_device(op: str, tensors: dict[str, Any]) -> None:
    """Every tensor on the GPU the kernel runs on (x's)."""
    device = tensors["x"].device
    for name, t in tensors.items():
        if not t.is_cuda or t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device}; every tensor must be on x's CUDA device ({device})")


def run(op: str, *inputs: Any, epsilon: float = DEFAULT_EPSILON, layout: tuple[int, ...] | None = None,
        outputs: tuple[Any, ...] | None = None) -> tuple[Any, ...]:
    """Run op on torch CUDA tensors given in contract order (x, [residual], gamma, [beta]).

    Returns the outputs (y, [sum]) as torch tensors shaped like x. Tensors must be contiguous.
    """
    import torch

    spec = OPS[op]
    named = named_inputs(op, inputs)
    check_operands(op, named)
    x, gamma = named["x"], named["gamma"]
    rows, hidden = rows_and_hidden(tuple(x.shape))
    if outputs is None:
        outputs = tuple(torch.empty_like(x) for _ in spec.outputs)
    check_outputs(op, x, outputs)
    check_device(op, {**named, **dict(zip(spec.outputs, outputs))})
    launch = Launch(op, dtype_name(x), dtype_name(gamma), rows, hidden, layout=layout)
    launch([t.data_ptr() for t in inputs], [t.data_ptr() for t in outputs], epsilon,
           torch.cuda.current_stream().cuda_stream)
    return outputs
