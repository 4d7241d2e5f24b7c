"""The residual Add in front of a norm: fused when it is a plain same-shape sum."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .checks import NormCandidate, dtype_name
from .matcher import present_inputs, producer


def _standard(node: gs.Node | None, op: str) -> bool:
    return node is not None and node.op == op and (node.domain or "") in ("", "ai.onnx")


def row_preserving_reshape(candidate: NormCandidate) -> gs.Node | None:
    """The Reshape in front of the norm when it only regroups the leading axes: the last axis,
    hidden, is the same static size before and after, so every row of its input is a row of its
    output and a norm over the last axis commutes with it (OPT flattens [batch, seq, hidden] to
    [tokens, hidden] between the residual Add and the norm)."""
    reshape = producer(candidate.x)
    if not _standard(reshape, "Reshape") or not reshape.inputs:
        return None
    data = reshape.inputs[0]
    for shape in (data.shape, candidate.x.shape):
        if not shape or shape[-1] != candidate.hidden:
            return None
    return reshape


def residual_add(candidate: NormCandidate, graph_outputs: set) -> tuple[tuple | None, str | None]:
    """((a, b, add_node), None) when the norm's input is `a + b` that can be fused, else (None, why).

    The sum may reach the norm through a Reshape that keeps the rows (`row_preserving_reshape`);
    the fused op then works in the sum's shape and a Reshape follows it (see `emit`)."""
    reshape = row_preserving_reshape(candidate)
    add = producer(reshape.inputs[0] if reshape is not None else candidate.x)
    if not _standard(add, "Add"):
        return None, None  # nothing in front: no residual to speak of
    inputs = present_inputs(add)
    if len(inputs) != 2:
        return None, f"Add '{add.name}' does not have two inputs"
    a, b = inputs
    if isinstance(a, gs.Constant) or isinstance(b, gs.Constant):
        return None, f"Add '{add.name}' adds a constant (a bias, not a residual)"
    total = add.outputs[0]
    shape = total.shape
    if shape is None:
        return None, f"shape of the sum '{total.name}' is unknown"
    differing = [t for t in (a, b) if t.shape is None or list(t.shape) != list(shape)]
    differing.sort(key=lambda t: _how_shapes_differ(t.shape, shape) != "broadcasts")  # the plain reason first
    if differing:
        t = differing[0]
        return None, f"Add '{add.name}' {_how_shapes_differ(t.shape, shape)} ({t.name}: {t.shape} vs {shape})"
    for t in (a, b):
        if dtype_name(t) != dtype_name(candidate.x):
            return None, f"Add '{add.name}' mixes dtypes"
    # Equal static sizes or equal dim names are equal at run time; an unknown dim (None) on both
    # sides is not: [1, H] + [5, H] would broadcast, which the fused ops do not.
    if any(d is None for d in shape):
        return None, f"Add '{add.name}' operand shapes cannot be shown equal ({shape})"
    return (a, b, add), None


def _how_shapes_differ(operand, total) -> str:
    """'broadcasts' when the sizes show it; otherwise the sizes are only not known to be equal
    (two dims without a name in common, as shape inference leaves a Reshape to -1)."""
    if operand is not None and (len(operand) < len(total) or any(
            o != t and (o == 1 or isinstance(o, int) and isinstance(t, int)) for o, t in zip(operand, total))):
        return "broadcasts"
    return "operand shapes cannot be shown equal"


def sum_is_used_elsewhere(candidate: NormCandidate, graph_outputs: set) -> bool:
    if candidate.through_reshape is not None:
        return True  # the Add's output stays (the Reshape reads it; unused, cleanup removes that)
    inside = {id(n) for n in candidate.nodes}
    x = candidate.x
    return x.name in graph_outputs or any(id(c) not in inside for c in x.outputs)
