"""x - 0 and Where(True, x, fill), written with shape arithmetic, recognised as x
(rewriter._drop_identities bypasses them).

Flax's RMSNorm runs the code of its LayerNorm with a mean of zeros, and jax2tf with tf2onnx writes
that mean out: a zero constant Expanded to the rows, Reshaped and Expanded again to [rows, 1]
(`x - broadcast(0)`), which hides the RMSNorm's x from the patterns. A subtraction is dropped when
its second input is all zeros (a zero constant, or Expand, Reshape or Cast of zeros) and its shape,
read as `shape_values.ShapeReader` reads shapes, broadcasts into the first input's without growing
it: then every value and the shape are the first input's (x - 0 is x, NaN and infinities too).

jax2onnx writes jnp.var's division by n - ddof behind `Where(n - ddof > 0, var, NaN broadcast to
var's shape)`. With n and ddof constants the condition is a constant, and a Where whose condition
is all true (or all false) is the operand it takes, when neither the condition nor the other
operand can grow it.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .checks import constant_value
from .matcher import DEFAULT_DOMAINS, producer
from .shape_values import ShapeReader


def minus_zeros(node: gs.Node, reader: ShapeReader) -> gs.Tensor | None:
    """x, where `node` is such a Sub(x, zeros); else None."""
    if node.op != "Sub" or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    x, zeros = node.inputs
    zero_dims, x_dims = _zeros_dims(zeros, reader), reader.dims_of_tensor(x)
    if zero_dims is None or x_dims is None or x.dtype != node.outputs[0].dtype or not _broadcasts_into(zero_dims, x_dims):
        return None
    return x


def decided_where(node: gs.Node, reader: ShapeReader) -> gs.Tensor | None:
    """The operand a Where with a constant condition always takes, where neither the condition nor
    the other operand can grow it (their shapes read as `reader` reads them, or as a fill's); else None."""
    if node.op != "Where" or len(node.inputs) != 3 or len(node.outputs) != 1:
        return None
    condition = constant_value(node.inputs[0])
    if condition is None or condition.dtype != np.bool_ or condition.size == 0 or (condition.any() and not condition.all()):
        return None
    taken, other = (node.inputs[1], node.inputs[2]) if condition.all() else (node.inputs[2], node.inputs[1])
    taken_dims, other_dims = (_fill_dims(t, reader) or reader.dims_of_tensor(t) for t in (taken, other))
    if taken_dims is None or other_dims is None or taken.dtype != node.outputs[0].dtype:
        return None
    if not _broadcasts_into([int(d) for d in condition.shape], taken_dims) or not _broadcasts_into(other_dims, taken_dims):
        return None
    return taken


def _zeros_dims(tensor: gs.Tensor, reader: ShapeReader) -> list | None:
    """The dimensions of a tensor that is all zeros, as `reader` names them; None when it is not
    known to be zeros, or its shape is not known."""
    return _fill_dims(tensor, reader, lambda value: not np.any(value))


def _fill_dims(tensor: gs.Tensor, reader: ShapeReader, holds=lambda value: True) -> list | None:
    """The dimensions of a tensor filled from a small constant whose value `holds` (a constant, or
    Expand, Reshape or Cast of one), as `reader` names them; None when it is no such tensor, or its
    shape is not known."""
    value = constant_value(tensor)
    if value is not None:
        return [int(d) for d in np.shape(value)] if holds(value) else None
    node = producer(tensor)
    if node is None or (node.domain or "") not in DEFAULT_DOMAINS or not node.inputs:
        return None
    if node.op == "Cast":
        return _fill_dims(node.inputs[0], reader, holds)
    if node.op not in ("Expand", "Reshape") or len(node.inputs) < 2:
        return None
    inner, target = _fill_dims(node.inputs[0], reader, holds), reader.dims(node.inputs[1])
    if inner is None or target is None:
        return None
    return target if node.op == "Reshape" else _broadcast(inner, target)


def _broadcast(a: list, b: list) -> list | None:
    """numpy's broadcast of two shapes of named dims; None where it cannot be told."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        da, db = (a[-i] if i <= len(a) else 1), (b[-i] if i <= len(b) else 1)
        if da == db or db == 1:
            out.append(da)
        elif da == 1:
            out.append(db)
        else:
            return None
    return out[::-1]


def _broadcasts_into(small: list, big: list) -> bool:
    """Whether `small` broadcasts against `big` without changing `big`."""
    return len(small) <= len(big) and all(s == 1 or s == b for s, b in zip(small[::-1], big[::-1]))
