"""Float64 numpy references of the fused ops: the ground truth every implementation is held to."""
from __future__ import annotations

import numpy as np

from .contract import DEFAULT_EPSILON, OPS


def _f64(a):
    return None if a is None else np.asarray(a).astype(np.float64)


def rms_norm(x, gamma, epsilon: float = DEFAULT_EPSILON) -> np.ndarray:
    x = _f64(x)
    inv_rms = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + epsilon)
    return x * inv_rms * _f64(gamma)


def layer_norm(x, gamma, beta=None, epsilon: float = DEFAULT_EPSILON) -> np.ndarray:
    x = _f64(x)
    centred = x - np.mean(x, axis=-1, keepdims=True)
    inv_std = 1.0 / np.sqrt(np.mean(centred * centred, axis=-1, keepdims=True) + epsilon)
    y = centred * inv_std * _f64(gamma)
    return y if beta is None else y + _f64(beta)


def add_rms_norm(x, residual, gamma, epsilon: float = DEFAULT_EPSILON):
    total = _f64(x) + _f64(residual)
    return rms_norm(total, gamma, epsilon), total


def add_layer_norm(x, residual, gamma, beta=None, epsilon: float = DEFAULT_EPSILON):
    total = _f64(x) + _f64(residual)
    return layer_norm(total, gamma, beta, epsilon), total


REFERENCES = {
    "RMSNorm": rms_norm,
    "LayerNorm": layer_norm,
    "AddRMSNorm": add_rms_norm,
    "AddLayerNorm": add_layer_norm,
}


def run_reference(op_name: str, inputs: dict, epsilon: float = DEFAULT_EPSILON) -> tuple[np.ndarray, ...]:
    """Evaluate op `op_name` on named inputs; always returns a tuple ordered as the op's outputs."""
    spec = OPS[op_name]
    args = [inputs.get(name) for name in spec.all_inputs]
    out = REFERENCES[op_name](*args, epsilon=epsilon)
    return out if isinstance(out, tuple) else (out,)
