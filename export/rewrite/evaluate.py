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


class _Norm(OpRun):
    centered = False
    skip = False
    ort_outputs = False  # Skip*LayerNormalization: (y, mean, inv_std, sum)

    def _run(self, x, *args, epsilon=1e-5, **_):
        residual = None
        if self.skip:
            residual, args = args[0], args[1:]
        gamma = args[0]
        beta = args[1] if len(args) > 1 and args[1] is not None else None
        total = x if residual is None else np.asarray(x, np.float64) + np.asarray(residual, np.float64)
        name = "LayerNorm" if self.centered else "RMSNorm"
        y = run_reference(name, {"x": total, "gamma": np.asarray(gamma).reshape(-1),
                                 "beta": None if beta is None else np.asarray(beta).reshape(-1)}, epsilon)[0]
        outs = [_like(y, x.dtype)]
        if self.skip:
            if self.ort_outputs:
                outs += [np.zeros((0,), np.float32)] * 2  # mean and inv_std: unused by rewritten graphs
            outs.append(_like(total, x.dtype))
        return tuple(outs)


def _op(name, domain, centered, skip=False, ort_outputs=False):
    return type(name, (_Norm,), {"op_domain": domain, "centered": centered, "skip": skip, "ort_outputs": ort_outputs})


FUSED_OPS = [
    _op("RMSNorm", DOMAIN, False), _op("LayerNorm", DOMAIN, True),
    _op("AddRMSNorm", DOMAIN, False, skip=True), _op("AddLayerNorm", DOMAIN, True, skip=True),
    _op("SimplifiedLayerNormalization", "", False),
    _op("SkipSimplifiedLayerNormalization", "com.microsoft", False, skip=True, ort_outputs=True),
    _op("SkipLayerNormalization", "com.microsoft", True, skip=True, ort_outputs=True),
]


def run_model(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """Outputs of `model` on `feeds`, in graph-output order."""
    return ReferenceEvaluator(model, new_ops=FUSED_OPS).run(None, feeds)
