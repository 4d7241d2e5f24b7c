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
size or named dimension from shape inference. One case needs no dimension read: the sums of a 2-D
input's rows are a vector, and Reshape keeps the element count, so a Reshape of it to a shape of two
values ending in 1 can only give [rows, 1] (a first value of 0 or -1 is read as the rows too, and
any other fails in the model as written); an Expand to that same shape tensor is then the identity.
jax2tf and tf2onnx write Flax's LayerNorm this way, with the row count sliced from the input's shape
and cast between int32 and int64 (Google's Magika).

The axis may be put back after some arithmetic on the reduced values, as jax2tf writes
`mean = sum * (1 / n)` and `var = max(0, mean_of_squares - mean * mean)` before restoring either:
element-wise ops whose other inputs are one-element constants give the same values with the axis
kept, so the chain is written again on keepdims=1 reductions. Anything else is left as written.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .checks import constant_value
from .emit import UniqueNames
from .matcher import DEFAULT_DOMAINS, present_inputs, producer

RESTORABLE = ("ReduceMean", "ReduceSum")


# element-wise ops a reduced value may pass through before its axis is put back
ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Sqrt", "Reciprocal", "Neg", "Abs")
LONGEST_CHAIN = 16


def restore_keepdims(graph: gs.Graph, graph_outputs: set, names: UniqueNames, scope: str = "main") -> list[str]:
    """Replace each such reduction-and-restore with one reduction keeping its axis; returns the notes."""
    restored = 0
    kept_of: dict[int, gs.Tensor] = {}  # a reduced tensor, or one of a chain on it -> its keepdims=1 form
    for restore in list(graph.nodes):
        if restore.op not in ("Reshape", "Unsqueeze") or (restore.domain or "") not in DEFAULT_DOMAINS \
                or not restore.inputs or not restore.outputs:
            continue
        chain = _chain_to_reductions(restore.inputs[0])
        if chain is None:
            continue
        nodes, reductions = chain
        if not all(_puts_it_back_last(restore, reduction.outputs[0], reduction.inputs[0]) for reduction in reductions):
            continue
        end = restore.outputs[0]
        expand = end.outputs[0] if len(end.outputs) == 1 else None
        if expand is not None and expand.op == "Expand" and (expand.domain or "") in DEFAULT_DOMAINS \
                and end.name not in graph_outputs \
                and all(_expands_to_itself(expand, restore, reduction) for reduction in reductions):
            end = expand.outputs[0]  # expanded to the shape it has: the identity
        if end.name in graph_outputs:
            continue  # a graph output keeps its name and producer
        kept = _kept_form(graph, restore.inputs[0], nodes, kept_of, names)
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


def _chain_to_reductions(tensor: gs.Tensor) -> tuple[list[gs.Node], list[gs.Node]] | None:
    """(the element-wise nodes from last-axis keepdims=0 reductions to `tensor`, in the order they
    run; those reductions), or None when `tensor` is not computed that way. The other inputs of
    the element-wise nodes must be constants of one element and rank 0 or 1, which broadcast alike
    whether the reduced axis is kept or not; the reductions must read inputs of one rank."""
    nodes: list[gs.Node] = []
    reductions: list[gs.Node] = []
    seen: set[int] = set()

    def visit(t: gs.Tensor) -> bool:
        node = producer(t)
        if node is None or id(node) in seen:
            return node is not None
        seen.add(id(node))
        if _drops_the_last_axis(node):
            reductions.append(node)
            return True
        if node.op not in ELEMENTWISE or (node.domain or "") not in DEFAULT_DOMAINS or len(node.outputs) != 1 \
                or len(nodes) >= LONGEST_CHAIN:
            return False
        for operand in present_inputs(node):
            value = constant_value(operand)
            if value is not None:
                if value.size != 1 or value.ndim > 1:
                    return False
            elif not visit(operand):
                return False
        nodes.append(node)  # after its inputs: the order they run in
        return True

    if not visit(tensor) or not reductions or len({len(r.inputs[0].shape) for r in reductions}) != 1:
        return None
    return nodes, reductions


def _kept_form(graph: gs.Graph, tensor: gs.Tensor, nodes: list[gs.Node], kept_of: dict, names: UniqueNames) -> gs.Tensor:
    """`tensor` computed again with its reduced axis kept: each reduction once with keepdims=1, then
    the element-wise `nodes` on those. Forms made for an earlier restore are used again."""
    def kept(t: gs.Tensor) -> gs.Tensor:
        if id(t) in kept_of:
            return kept_of[id(t)]
        node = producer(t)
        if _drops_the_last_axis(node):
            source = node.inputs[0]
            out = gs.Variable(names(f"{t.name}_keepdims"), dtype=t.dtype, shape=list(source.shape[:-1]) + [1])
            graph.nodes.append(gs.Node(node.op, names(f"{node.name}_keepdims"), {**node.attrs, "keepdims": 1},
                                       list(node.inputs), [out], domain=node.domain))
        else:
            inputs = [operand if constant_value(operand) is not None else kept(operand) for operand in node.inputs]
            shape = next(i.shape for i in inputs if constant_value(i) is None)
            out = gs.Variable(names(f"{t.name}_keepdims"), dtype=t.dtype, shape=None if shape is None else list(shape))
            graph.nodes.append(gs.Node(node.op, names(f"{node.name}_keepdims"), dict(node.attrs), inputs, [out],
                                       domain=node.domain))
        kept_of[id(t)] = out
        return out

    return kept(tensor)


def _axes(node: gs.Node) -> list[int] | None:
    """A reduction's or Unsqueeze's axes: a constant second input (newer opsets) or the attribute."""
    inputs = present_inputs(node)
    axes = constant_value(inputs[1]) if len(inputs) > 1 else node.attrs.get("axes")
    return None if axes is None else [int(a) for a in np.asarray(axes).ravel()]


def _wanted(source: gs.Tensor) -> list:
    """The reduction's shape with its axis kept, each dimension as `_dim` names it."""
    return [_dim(source, i) for i in range(len(source.shape) - 1)] + [1]


def _puts_it_back_last(restore: gs.Node, reduced: gs.Tensor, source: gs.Tensor) -> bool:
    """Whether Reshape gives the reduced values their source's shape with its last axis 1, or
    Unsqueeze inserts an axis after the last one."""
    if restore.op == "Unsqueeze":
        return _axes(restore) in ([-1], [len(source.shape) - 1])
    if len(restore.inputs) < 2:
        return False
    if len(source.shape) == 2:  # a vector of row sums: [d, 1] can only be [rows, 1] (the module's doc)
        return _two_values_ending_in_one(restore.inputs[1])
    return _dims_of(restore.inputs[1], reduced, source) == _wanted(source)


def _expands_to_itself(expand: gs.Node, restore: gs.Node, reduction: gs.Node) -> bool:
    """Whether Expand gives the restored values the shape they have."""
    reduced, source = reduction.outputs[0], reduction.inputs[0]
    if len(source.shape) == 2 and restore.op == "Reshape" and expand.inputs[1] is restore.inputs[1]:
        return True  # the Reshape ran with that shape, so the values have it
    return _dims_of(expand.inputs[1], reduced, source) == _wanted(source)


def _two_values_ending_in_one(shape: gs.Tensor) -> bool:
    """Whether a shape tensor is a vector of two values whose last is 1, read through the integer
    casts and slices tf2onnx writes: (length, last value) of each piece, as far as they are known."""
    length, last = _length_and_last(shape)
    return length == 2 and last == 1


INTEGER_TYPES = frozenset((2, 3, 4, 5, 6, 7, 12, 13))  # onnx.TensorProto: uint8 .. int64, uint32, uint64


def _length_and_last(shape: gs.Tensor) -> tuple[int | None, int | None]:
    value = constant_value(shape)
    if value is not None:
        flat = np.asarray(value).ravel()
        return (len(flat), int(flat[-1]) if len(flat) else None) if value.ndim == 1 else (None, None)
    node = producer(shape)
    if node is None or (node.domain or "") not in DEFAULT_DOMAINS:
        return None, None
    if node.op == "Shape" and node.inputs[0].shape is not None:
        rank = len(node.inputs[0].shape)
        return len(range(*slice(int(node.attrs.get("start", 0)), int(node.attrs.get("end", rank))).indices(rank))), None
    if node.op == "Cast" and int(node.attrs.get("to", 0)) in INTEGER_TYPES:
        length, last = _length_and_last(node.inputs[0])
        return length, last if last is not None and 0 <= last <= 127 else None  # one every integer type holds
    if node.op == "Slice":
        inputs = present_inputs(node)
        length = _length_and_last(inputs[0])[0]
        params = [constant_value(t) for t in inputs[1:]]
        if length is None or any(p is None for p in params) or len(params) < 2:
            return None, None
        starts, ends = (int(np.asarray(p).ravel()[0]) for p in params[:2])
        axes = [int(a) for a in np.asarray(params[2]).ravel()] if len(params) > 2 else [0]
        steps = [int(a) for a in np.asarray(params[3]).ravel()] if len(params) > 3 else [1]
        if axes not in ([0], [-1]) or steps != [1] or any(np.asarray(p).size != 1 for p in params):
            return None, None
        return len(range(*slice(starts, ends).indices(length))), None
    if node.op == "Concat" and int(node.attrs.get("axis", 0)) in (0, -1):
        parts = [_length_and_last(t) for t in node.inputs]
        if any(length is None for length, _ in parts):
            return None, None
        return sum(length for length, _ in parts), parts[-1][1] if parts[-1][0] else None
    return None, None


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
