"""A last-axis reduction taken with keepdims=0 and given its axis back, made one with keepdims=1.

torch's dynamo exporter writes `var`, `var_mean` and the sums behind them as
`Reduce*(t, [-1], keepdims=0)`, then puts the reduced axis back:
`Reshape(r, Concat(Shape(r) pieces, [1]))`, often followed by `Expand(., Concat(Shape(x) pieces,
[1]))` to x's rows; hand-written `x.sum(-1).unsqueeze(-1)` is `Unsqueeze(r, [-1])`. The Reshape
appends an axis of size 1 to r's shape (row-major order is kept), as does Unsqueeze at the end, and
an Expand to the shape its input already has is the identity: together they are exactly
`Reduce*(t, [-1], keepdims=1)`, the form the norm patterns and the proof know.

The shapes are read, not guessed: each shape tensor is evaluated dimension by dimension
(`shape_values.ShapeReader`: constants, `Shape` slices, `Concat`, `Gather`, `Slice`, integer
`Cast`s, flattening `Reshape`, `Unsqueeze`, `Squeeze`), and a dimension is compared with the
reduced tensor's either as the same tensor's same axis or as the same static size or named
dimension from shape inference. One case needs no dimension read: the sums of a 2-D
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

import onnx_graphsurgeon as gs

from .checks import constant_value
from .emit import UniqueNames
from .matcher import DEFAULT_DOMAINS, present_inputs, producer, replace_uses
from .shape_values import ShapeReader, axes_of, declared_names

RESTORABLE = ("ReduceMean", "ReduceSum", "ReduceSumSquare")


# element-wise ops a reduced value may pass through before its axis is put back
ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Sqrt", "Reciprocal", "Neg", "Abs")
LONGEST_CHAIN = 16


def restore_keepdims(graph: gs.Graph, graph_outputs: set, names: UniqueNames, scope: str = "main") -> list[str]:
    """Replace each such reduction-and-restore with one reduction keeping its axis; returns the notes."""
    restored = 0
    reader = ShapeReader(declared_names(graph))
    kept_of: dict[int, gs.Tensor] = {}  # a reduced tensor, or one of a chain on it -> its keepdims=1 form
    for restore in list(graph.nodes):
        if restore.op not in ("Reshape", "Unsqueeze") or (restore.domain or "") not in DEFAULT_DOMAINS \
                or not restore.inputs or not restore.outputs:
            continue
        chain = _chain_to_reductions(restore.inputs[0])
        if chain is None:
            continue
        _, reductions = chain
        if not all(_puts_it_back_last(restore, reduction.outputs[0], reduction.inputs[0], reader) for reduction in reductions):
            continue
        end = restore.outputs[0]
        expand = end.outputs[0] if len(end.outputs) == 1 else None
        if expand is not None and expand.op == "Expand" and (expand.domain or "") in DEFAULT_DOMAINS \
                and end.name not in graph_outputs \
                and all(_expands_to_itself(expand, restore, reduction, reader) for reduction in reductions):
            end = expand.outputs[0]  # expanded to the shape it has: the identity
        if end.name in graph_outputs:
            continue  # a graph output keeps its name and producer
        replace_uses(end, _kept_form(graph, restore.inputs[0], kept_of, names))  # the restore goes with clean-up
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
    axes = axes_of(node)
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


def _kept_form(graph: gs.Graph, tensor: gs.Tensor, kept_of: dict, names: UniqueNames) -> gs.Tensor:
    """`tensor` (computed as `_chain_to_reductions` found) computed again with its reduced axis kept:
    each reduction once with keepdims=1, then the element-wise nodes on those. Forms made for an
    earlier restore are used again."""
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


def _wanted(source: gs.Tensor, reader: ShapeReader) -> list:
    """The reduction's shape with its axis kept, each dimension as `ShapeReader.dim` names it."""
    return [reader.dim(source, i) for i in range(len(source.shape) - 1)] + [1]


def _puts_it_back_last(restore: gs.Node, reduced: gs.Tensor, source: gs.Tensor, reader: ShapeReader) -> bool:
    """Whether Reshape gives the reduced values their source's shape with its last axis 1, or
    Unsqueeze inserts an axis after the last one."""
    if restore.op == "Unsqueeze":
        return axes_of(restore) in ([-1], [len(source.shape) - 1])
    if len(restore.inputs) < 2:
        return False
    if len(source.shape) == 2:  # a vector of row sums: [d, 1] can only be [rows, 1] (the module's doc)
        return reader.length_and_last(restore.inputs[1]) == (2, 1)
    return reader.dims(restore.inputs[1], reduced, source) == _wanted(source, reader)


def _expands_to_itself(expand: gs.Node, restore: gs.Node, reduction: gs.Node, reader: ShapeReader) -> bool:
    """Whether Expand gives the restored values the shape they have."""
    reduced, source = reduction.outputs[0], reduction.inputs[0]
    if len(source.shape) == 2 and restore.op == "Reshape" and expand.inputs[1] is restore.inputs[1]:
        return True  # the Reshape ran with that shape, so the values have it
    return reader.dims(expand.inputs[1], reduced, source) == _wanted(source, reader)
