"""Constant expressions that compute a norm's scale, folded into gamma when that reads no weights.

Gemma scales by `(1 + w)`, and half-precision exports often scale by `Cast(w)`. The pattern binds
gamma to the expression's output, which is always correct (the expression stays in the graph and
feeds the fused op). When `w` is a constant whose bytes are already in memory and nothing else
uses the expression, it is folded into one new constant, as the op contract asks. Weights stored
as external data are never read: their expression stays in the graph and the report says so.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from normops import SUPPORTED_DTYPES, numpy_dtype

from .checks import NormCandidate, constant_value, dtype_name, is_external, is_overridable
from .matcher import present_inputs, producer

FOLDABLE = ("Add", "Cast")


def fold_gamma(candidate: NormCandidate) -> str | None:
    """Fold the expression producing candidate.gamma into a constant; returns a note, or None. A
    weight that is also a graph input (checks.is_overridable: its value may be replaced) is never folded."""
    gamma = candidate.gamma
    node = producer(gamma) if gamma is not None else None
    if node is None or node.op not in FOLDABLE or (node.domain or "") not in ("", "ai.onnx"):
        return None
    what = "Gemma's (1 + w)" if node.op == "Add" else "Cast(w)"
    weight, value = _operands(node)
    if weight is None:
        return None
    if len(gamma.outputs) != 1:
        return f"gamma of '{candidate.output.name}' is {what} ('{node.name}'), also used elsewhere: left in the graph"
    if is_overridable(weight):
        return f"gamma of '{candidate.output.name}' is {what} ('{node.name}') of a weight that is also a graph input: left in the graph"
    if is_external(weight):
        return f"gamma of '{candidate.output.name}' is {what} ('{node.name}') of an external weight: left in the graph"
    w = np.asarray(weight.values)
    folded = (w.astype(np.float64) + value) if node.op == "Add" else w
    to = dtype_name(gamma)
    candidate.gamma = gs.Constant(f"{gamma.name}_folded", np.asarray(folded).astype(numpy_dtype(to)))
    return f"folded {what} ('{node.name}') into the gamma of '{candidate.output.name}'"


def _operands(node: gs.Node):
    """(weight constant, added scalar) of `1 + w` or `Cast(w)`; (None, None) for anything else."""
    inputs = present_inputs(node)
    if node.op == "Cast":
        w = inputs[0]
        return (w, 0.0) if isinstance(w, gs.Constant) and dtype_name(w) in SUPPORTED_DTYPES else (None, None)
    if len(inputs) != 2:
        return None, None
    for w, other in (inputs, inputs[::-1]):
        one = constant_value(other)
        if isinstance(w, gs.Constant) and one is not None and one.size == 1 and len(w.shape) >= 1:
            return w, float(one.reshape(()))
    return None, None
