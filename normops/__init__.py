"""normops: what the fused normalisation ops are (contract, references, tolerances).

Nothing here imports TensorRT or CUDA. The torch modules live in `normops.torch_modules` so that
importing the contract does not import torch.
"""
from .contract import (
    ADD_LAYER_NORM,
    ADD_RMS_NORM,
    DEFAULT_EPSILON,
    DOMAIN,
    LAYER_NORM,
    OPS,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    RMS_NORM,
    SUPPORTED_DTYPES,
    OpSpec,
    numpy_dtype,
    op_for,
)
from .reference import REFERENCES, run_reference
from .tolerances import EXACT, GRAPH, OP, Tolerance, error_stats, tolerance_for, within

__all__ = [
    "ADD_LAYER_NORM", "ADD_RMS_NORM", "DEFAULT_EPSILON", "DOMAIN", "LAYER_NORM", "OPS",
    "PLUGIN_NAMESPACE", "PLUGIN_VERSION", "RMS_NORM", "SUPPORTED_DTYPES", "OpSpec", "numpy_dtype",
    "op_for", "REFERENCES", "run_reference", "EXACT", "GRAPH", "OP", "Tolerance", "error_stats", "tolerance_for",
    "within",
]
