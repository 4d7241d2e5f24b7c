"""The fused-op contract: one definition of each normfuse op.

Everything else (torch modules, the rewriter, the CUDA kernels, the TensorRT plugins and the
tests) reads op names, inputs, outputs and attributes from here rather than spelling them again.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DOMAIN = "normfuse"
PLUGIN_NAMESPACE = "normfuse"
PLUGIN_VERSION = "1"
DEFAULT_EPSILON = 1e-5

# dtypes the ops accept for x / residual / y. gamma and beta are both the input dtype or both float32.
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
STATISTICS_DTYPE = "float32"  # mean and variance always accumulate in fp32


@dataclass(frozen=True)
class OpSpec:
    """Signature of one fused op. Normalisation is always over the last axis."""

    name: str
    inputs: tuple[str, ...]
    optional_inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    has_residual: bool
    centered: bool  # LayerNorm subtracts the mean, RMSNorm does not
    attributes: dict = field(default_factory=lambda: {"epsilon": DEFAULT_EPSILON})

    @property
    def qualified_name(self) -> str:
        return f"{PLUGIN_NAMESPACE}::{self.name}"

    @property
    def all_inputs(self) -> tuple[str, ...]:
        return self.inputs + self.optional_inputs


RMS_NORM = OpSpec("RMSNorm", ("x", "gamma"), (), ("y",), has_residual=False, centered=False)
LAYER_NORM = OpSpec("LayerNorm", ("x", "gamma"), ("beta",), ("y",), has_residual=False, centered=True)
ADD_RMS_NORM = OpSpec(
    "AddRMSNorm", ("x", "residual", "gamma"), (), ("y", "sum"), has_residual=True, centered=False
)
ADD_LAYER_NORM = OpSpec(
    "AddLayerNorm", ("x", "residual", "gamma"), ("beta",), ("y", "sum"), has_residual=True, centered=True
)

OPS: dict[str, OpSpec] = {op.name: op for op in (RMS_NORM, LAYER_NORM, ADD_RMS_NORM, ADD_LAYER_NORM)}


def op_for(centered: bool, residual: bool) -> OpSpec:
    """The op that fuses a norm of the given kind, with or without the residual Add."""
    for op in OPS.values():
        if op.centered == centered and op.has_residual == residual:
            return op
    raise KeyError((centered, residual))


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype for a contract dtype name; bfloat16 comes from ml_dtypes (an onnx dependency)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)
