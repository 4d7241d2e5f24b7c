"""Run a rewritten graph on onnx's reference evaluator, fused ops included.

The fused ops of every target (normfuse's, ONNX Runtime's contrib ops) are evaluated with the
normops float64 references, so a rewritten graph can be compared with its original on any dtype
without TensorRT, a GPU or an ONNX Runtime build that has the op.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from normops import DOMAIN, run_reference


def _like(value: np.ndarray, dtype) -> np.ndarray:
    return np.asarray(value).astype(dtype)


def reference_norm(centered: bool, x, residual=None, gamma=None, beta=None, bias=None,
                   epsilon: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """float64 (y, sum) of LayerNorm (centered) or RMSNorm of x [+ residual] [+ bias], by the normops
    references; gamma, beta and bias may carry leading 1s, and a missing gamma is ones."""
    total = np.asarray(x, np.float64)
    if residual is not None:
        total = total + np.asarray(residual, np.float64)
    if bias is not None:  # ONNX Runtime's Skip ops add an input bias into the sum
        total = total + np.asarray(bias, np.float64).reshape(-1)
    flat = {name: None if v is None else np.asarray(v).reshape(-1) for name, v in (("gamma", gamma), ("beta", beta))}
    if flat["gamma"] is None:
        flat["gamma"] = np.ones(total.shape[-1])
    y = run_reference("LayerNorm" if centered else "RMSNorm", {"x": total, **flat}, epsilon)[0]
    return y, total


class _Norm(OpRun):
    centered = False
    skip = False
    ort_outputs = False  # Skip*LayerNormalization: (y, mean, inv_std, sum)
    params = ("gamma", "beta")  # inputs after x (and the residual), in order

    def _run(self, x, *args, epsilon=1e-5, **_):
        residual = None
        if self.skip:
            residual, args = args[0], args[1:]
        given = {name: value for name, value in zip(self.params, args) if value is not None}
        y, total = reference_norm(self.centered, x, residual, given["gamma"], given.get("beta"), given.get("bias"),
                                  epsilon)
        outs = [_like(y, x.dtype)]
        if self.skip:
            if self.ort_outputs:
                outs += [np.zeros((0,), np.float32)] * 2  # mean and inv_std: unused by rewritten graphs
            outs.append(_like(total, x.dtype))
        return tuple(outs)


def _op(name, domain, centered, skip=False, ort_outputs=False, params=("gamma", "beta")):
    return type(name, (_Norm,), {"op_domain": domain, "centered": centered, "skip": skip,
                                 "ort_outputs": ort_outputs, "params": params})


FUSED_OPS = [
    _op("RMSNorm", DOMAIN, False), _op("LayerNorm", DOMAIN, True),
    _op("AddRMSNorm", DOMAIN, False, skip=True), _op("AddLayerNorm", DOMAIN, True, skip=True),
    _op("SimplifiedLayerNormalization", "", False),
    _op("SkipSimplifiedLayerNormalization", "com.microsoft", False, skip=True, ort_outputs=True, params=("gamma", "bias")),
    _op("SkipLayerNormalization", "com.microsoft", True, skip=True, ort_outputs=True, params=("gamma", "beta", "bias")),
]


def run_model(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """Outputs of `model` on `feeds`, in graph-output order."""
    return ReferenceEvaluator(model, new_ops=FUSED_OPS).run(None, feeds)
