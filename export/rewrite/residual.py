"""The residual Add in front of a norm: fused when it is a plain same-shape sum."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .checks import NormCandidate, dtype_name
from .matcher import present_inputs, producer


def residual_add(candidate: NormCandidate, graph_outputs: set) -> tuple[tuple | None, str | None]:
    """((a, b, add_node), None) when the norm's input is `a + b` that can be fused, else (None, why)."""
    add = producer(candidate.x)
    if add is None or add.op != "Add" or (add.domain or "") not in ("", "ai.onnx"):
        return None, None  # nothing in front: no residual to speak of
    inputs = present_inputs(add)
    if len(inputs) != 2:
        return None, f"Add '{add.name}' does not have two inputs"
    a, b = inputs
    if isinstance(a, gs.Constant) or isinstance(b, gs.Constant):
        return None, f"Add '{add.name}' adds a constant (a bias, not a residual)"
    shape = candidate.x.shape
    if shape is None:
        return None, f"shape of the sum '{candidate.x.name}' is unknown"
    for t in (a, b):
        if t.shape is None or list(t.shape) != list(shape):
            return None, f"Add '{add.name}' broadcasts ({t.name}: {t.shape} vs {shape})"
        if dtype_name(t) != dtype_name(candidate.x):
            return None, f"Add '{add.name}' mixes dtypes"
    # Equal static sizes or equal dim names are equal at run time; an unknown dim (None) on both
    # sides is not: [1, H] + [5, H] would broadcast, which the fused ops do not.
    if any(d is None for d in shape):
        return None, f"Add '{add.name}' operand shapes cannot be shown equal ({shape})"
    return (a, b, add), None


def sum_is_used_elsewhere(candidate: NormCandidate, graph_outputs: set) -> bool:
    inside = {id(n) for n in candidate.nodes}
    x = candidate.x
    return x.name in graph_outputs or any(id(c) not in inside for c in x.outputs)
