"""x - 0, written with shape arithmetic, given back as x.

Flax's RMSNorm runs the code of its LayerNorm with a mean of zeros, and jax2tf with tf2onnx writes
that mean out: a zero constant Expanded to the rows, Reshaped and Expanded again to [rows, 1]
(`x - broadcast(0)`), which hides the RMSNorm's x from the patterns. A subtraction is dropped when
its second input is all zeros (a zero constant, or Expand, Reshape or Cast of zeros) and its shape,
read as `shape_values.ShapeReader` reads shapes, broadcasts into the first input's without growing
it: then every value and the shape are the first input's (x - 0 is x, NaN and infinities too).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .checks import constant_value
from .matcher import DEFAULT_DOMAINS, producer
from .shape_values import ShapeReader, declared_names


def drop_zero_subtractions(graph: gs.Graph, graph_outputs: set, scope: str = "main") -> list[str]:
    """Bypass each such Sub; returns the notes."""
    reader = ShapeReader(declared_names(graph))
    dropped = 0
    for node in graph.nodes:
        if node.op != "Sub" or (node.domain or "") not in DEFAULT_DOMAINS or len(node.inputs) != 2 \
                or len(node.outputs) != 1 or node.outputs[0].name in graph_outputs:
            continue
        x, zeros = node.inputs
        zero_dims, x_dims = _zeros_dims(zeros, reader), reader.dims_of_tensor(x)
        if zero_dims is None or x_dims is None or x.dtype != node.outputs[0].dtype \
                or not _broadcasts_into(zero_dims, x_dims):
            continue
        out = node.outputs[0]
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = x
        node.inputs.clear()
        node.outputs.clear()
        dropped += 1
    where = "" if scope == "main" else f" in {scope}"
    return [f"bypassed {dropped} subtraction(s) of zeros broadcast to the rows{where}"] if dropped else []


def _zeros_dims(tensor: gs.Tensor, reader: ShapeReader) -> list | None:
    """The dimensions of a tensor that is all zeros, as `reader` names them; None when it is not
    known to be zeros, or its shape is not known."""
    value = constant_value(tensor)
    if value is not None:
        return [int(d) for d in np.shape(value)] if not np.any(value) else None
    node = producer(tensor)
    if node is None or (node.domain or "") not in DEFAULT_DOMAINS or not node.inputs:
        return None
    if node.op == "Cast":
        return _zeros_dims(node.inputs[0], reader)
    if node.op not in ("Expand", "Reshape") or len(node.inputs) < 2:
        return None
    inner, target = _zeros_dims(node.inputs[0], reader), reader.dims(node.inputs[1])
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
