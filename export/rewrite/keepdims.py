"""A last-axis reduction taken with keepdims=0 and given its axis back, made one with keepdims=1.

torch's dynamo exporter writes `var`, `var_mean` and the sums behind them as
`Reduce*(t, [-1], keepdims=0)`, then puts the reduced axis back:
`Reshape(r, Concat(Shape(r) pieces, [1]))`, often followed by `Expand(., Concat(Shape(x) pieces,
[1]))` to x's rows; hand-written `x.sum(-1).unsqueeze(-1)` is `Unsqueeze(r, [-1])`. The Reshape
appends an axis of size 1 to r's shape (row-major order is kept), as does Unsqueeze at the end, and
an Expand to the shape its input already has is the identity: together they are exactly
`Reduce*(t, [-1], keepdims=1)`, the form the norm patterns and the proof know.

The shapes are read, not guessed: each shape tensor is evaluated dimension by dimension (constants,
`Shape` slices, `Concat`, `Gather`, flattening `Reshape`, `Unsqueeze`, `Squeeze`), and a dimension
is compared with the reduced tensor's either as the same tensor's same axis or as the same static
size or named dimension from shape inference. Anything else is left as written.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .checks import constant_value
from .emit import UniqueNames
from .matcher import DEFAULT_DOMAINS, present_inputs, producer

RESTORABLE = ("ReduceMean", "ReduceSum")


def restore_keepdims(graph: gs.Graph, graph_outputs: set, names: UniqueNames, scope: str = "main") -> list[str]:
    """Replace each such reduction-and-restore with one reduction keeping its axis; returns the notes."""
    restored = 0
    for restore in list(graph.nodes):
        if restore.op not in ("Reshape", "Unsqueeze") or (restore.domain or "") not in DEFAULT_DOMAINS \
                or not restore.inputs or not restore.outputs:
            continue
        reduction = producer(restore.inputs[0])
        if not _drops_the_last_axis(reduction):
            continue
        reduced, source = reduction.outputs[0], reduction.inputs[0]
        wanted = [_dim(source, i) for i in range(len(source.shape) - 1)] + [1]
        if not _puts_it_back_last(restore, reduced, source, wanted):
            continue
        end = restore.outputs[0]
        expand = end.outputs[0] if len(end.outputs) == 1 else None
        if expand is not None and expand.op == "Expand" and (expand.domain or "") in DEFAULT_DOMAINS \
                and end.name not in graph_outputs and _dims_of(expand.inputs[1], reduced, source) == wanted:
            end = expand.outputs[0]  # expanded to the shape it has: the identity
        if end.name in graph_outputs:
            continue  # a graph output keeps its name and producer
        kept = gs.Variable(names(f"{reduced.name}_keepdims"), dtype=reduced.dtype, shape=list(source.shape[:-1]) + [1])
        graph.nodes.append(gs.Node(reduction.op, names(f"{reduction.name}_keepdims"), {**reduction.attrs, "keepdims": 1},
                                   list(reduction.inputs), [kept], domain=reduction.domain))
        for consumer in list(end.outputs):  # the restore, now unread, goes with the graph's clean-up
            for i, t in enumerate(consumer.inputs):
                if t is end:
                    consumer.inputs[i] = kept
        restored += 1
    where = "" if scope == "main" else f" in {scope}"
    return [f"took {restored} last-axis reduction(s) written with keepdims=0 and their axis put back by "
            f"Reshape/Unsqueeze/Expand as keepdims=1{where}"] if restored else []


def _drops_the_last_axis(node: gs.Node | None) -> bool:
    """A RESTORABLE reduction over the last axis alone, with keepdims=0, of an input of known rank >= 2."""
    if node is None or node.op not in RESTORABLE or (node.domain or "") not in DEFAULT_DOMAINS \
            or int(node.attrs.get("keepdims", 1)) != 0 or len(node.outputs) != 1:
        return False
    source = node.inputs[0]
    if source.shape is None or len(source.shape) < 2:
        return False
    axes = _axes(node)
    rank = len(source.shape)
    return axes is not None and len(axes) == 1 and axes[0] in (-1, rank - 1)


def _axes(node: gs.Node) -> list[int] | None:
    """A reduction's or Unsqueeze's axes: a constant second input (newer opsets) or the attribute."""
    inputs = present_inputs(node)
    axes = constant_value(inputs[1]) if len(inputs) > 1 else node.attrs.get("axes")
    return None if axes is None else [int(a) for a in np.asarray(axes).ravel()]


def _puts_it_back_last(restore: gs.Node, reduced: gs.Tensor, source: gs.Tensor, wanted: list) -> bool:
    """Whether Reshape gives the reduced values the shape `wanted` (the source's, its last axis 1),
    or Unsqueeze inserts an axis after the last one."""
    if restore.op == "Unsqueeze":
        return _axes(restore) in ([-1], [len(source.shape) - 1])
    return len(restore.inputs) > 1 and _dims_of(restore.inputs[1], reduced, source) == wanted


def _dim(tensor: gs.Tensor, axis: int):
    """A comparable name for one dimension: its static size, its named dimension from shape
    inference, or (when inference knows neither) the tensor and axis themselves."""
    size = tensor.shape[axis] if tensor.shape is not None and -len(tensor.shape) <= axis < len(tensor.shape) else None
    if isinstance(size, int) and size >= 0:
        return size
    if isinstance(size, str) and size and not size.startswith("unk__"):
        return ("named", size)
    return ("axis", id(tensor), axis % len(tensor.shape) if tensor.shape else axis)


def _dims_of(shape: gs.Tensor, reduced: gs.Tensor, source: gs.Tensor) -> list | None:
    """The dimensions a 1-D shape tensor holds, each as `_dim` names it (an axis of the reduction's
    output is the same axis of its input); None when any is not known this way."""
    value = constant_value(shape)
    if value is not None:
        dims = [int(d) for d in np.asarray(value).ravel()]
        return dims if value.ndim <= 1 and all(d >= 1 for d in dims) else None  # 0 and -1 are Reshape's wildcards
    node = producer(shape)
    if node is None or (node.domain or "") not in DEFAULT_DOMAINS:
        return None
    if node.op == "Shape":
        of = node.inputs[0]
        if of.shape is None:
            return None
        rank = len(of.shape)
        start, end = (int(node.attrs.get("start", 0)), int(node.attrs.get("end", rank)))
        axes = range(*slice(start, end).indices(rank))
        if of is reduced:  # axis i of a last-axis reduction's output is axis i of its input
            return [_dim(source, i) for i in axes]
        return [_dim(of, i) for i in axes]
    if node.op == "Concat" and int(node.attrs.get("axis", 0)) in (0, -1):
        parts = [_dims_of(t, reduced, source) for t in node.inputs]
        return None if any(p is None for p in parts) else [d for p in parts for d in p]
    if node.op in ("Reshape", "Unsqueeze", "Squeeze"):  # on a shape vector: only its layout changes
        inner = _dims_of(node.inputs[0], reduced, source)
        return inner if inner is not None and (node.op != "Squeeze" or len(inner) == 1) and \
            _keeps_a_vector(node, len(inner)) else None
    if node.op == "Gather" and int(node.attrs.get("axis", 0)) == 0:
        inner, index = _dims_of(node.inputs[0], reduced, source), constant_value(node.inputs[1])
        if inner is None or index is None or index.size != 1:
            return None
        i = int(index.ravel()[0])
        return [inner[i]] if -len(inner) <= i < len(inner) else None
    return None


def _keeps_a_vector(node: gs.Node, length: int) -> bool:
    """Whether Reshape/Unsqueeze/Squeeze of a shape vector of `length` values gives a vector (or, for
    Unsqueeze/Squeeze of one value, a scalar or one-element vector) with the same values in order."""
    if node.op == "Reshape":
        target = constant_value(node.inputs[1])
        return target is not None and [int(d) for d in np.asarray(target).ravel()] in ([-1], [length])
    if node.op == "Unsqueeze":
        return _axes(node) in ([0], [-1]) and length == 1
    return length == 1  # Squeeze of a one-element vector
