"""What a 1-D shape tensor holds, read dimension by dimension, without running the graph.

Exporters compute the shapes they Reshape and Expand to at run time: torch's dynamo exporter from
`Shape` slices and `Concat`, tf2onnx through int32 casts and `Slice`s of `Shape`. `ShapeReader.dims`
evaluates such a tensor to a list of dimensions, each named so that two can be compared: a static
size, a named dimension from shape inference, or (when inference knows neither) the tensor and axis
it was read from. Anything it cannot follow gives None, and the callers then leave the graph as it is.

Names that look like placeholders (`unk__57`, which onnx's inference and the tools that save its
results give dims they cannot work out) name nothing, since a saved one can never be shown equal to
the model's own dims, except where the model declares them on its inputs: tf2onnx names a dynamic
input dim `unk__120`, and inference carries that name to every dim it proves the same size. (A
placeholder another tool saved in value_info under the same name for another dim would be read as
that dim; no model seen does so, and such a mismatch would also fail the model's own Reshape.)
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .checks import constant_value
from .matcher import DEFAULT_DOMAINS, present_inputs, producer

# onnx.TensorProto's integer types: uint8 .. int64, uint32, uint64. A shape's values cast between
# them are read as unchanged: one that wrapped (a dim past 2^31) would break the model as written,
# and tf2onnx's int32 casts follow TensorFlow, whose shapes are int32 there.
INTEGER_TYPES = frozenset((2, 3, 4, 5, 6, 7, 12, 13))


def axes_of(node: gs.Node) -> list[int] | None:
    """A reduction's or Unsqueeze's axes: a constant second input (newer opsets) or the attribute."""
    inputs = present_inputs(node)
    axes = constant_value(inputs[1]) if len(inputs) > 1 else node.attrs.get("axes")
    return None if axes is None else [int(a) for a in np.asarray(axes).ravel()]


def declared_names(graph: gs.Graph) -> frozenset[str]:
    """The dimension names the graph's inputs declare."""
    return frozenset(d for t in graph.inputs if t.shape is not None for d in t.shape if isinstance(d, str) and d)


class ShapeReader:
    def __init__(self, declared: frozenset[str] = frozenset()):
        self.declared = declared

    def dim(self, tensor: gs.Tensor, axis: int):
        """A comparable name for one dimension: its static size, its named dimension from shape
        inference, or (when inference knows neither) the tensor and axis themselves."""
        size = tensor.shape[axis] if tensor.shape is not None and -len(tensor.shape) <= axis < len(tensor.shape) else None
        if isinstance(size, int) and size >= 0:
            return size
        if isinstance(size, str) and size and (not size.startswith("unk__") or size in self.declared):
            return ("named", size)
        return ("axis", id(tensor), axis % len(tensor.shape) if tensor.shape else axis)

    def dims_of_tensor(self, tensor: gs.Tensor) -> list | None:
        """Every dimension of a tensor of known rank, as `dim` names it."""
        return None if tensor.shape is None else [self.dim(tensor, i) for i in range(len(tensor.shape))]

    def dims(self, shape: gs.Tensor, reduced: gs.Tensor | None = None, source: gs.Tensor | None = None) -> list | None:
        """The dimensions a 1-D shape tensor holds, each as `dim` names it; None when any is not
        known this way. With a last-axis reduction's output `reduced` and its input `source`, an
        axis of `reduced` is named as the same axis of `source`."""
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
            axes = range(*slice(int(node.attrs.get("start", 0)), int(node.attrs.get("end", rank))).indices(rank))
            if reduced is not None and of is reduced:  # axis i of a last-axis reduction's output is axis i of its input
                return [self.dim(source, i) for i in axes]
            return [self.dim(of, i) for i in axes]
        if node.op == "Concat" and int(node.attrs.get("axis", 0)) in (0, -1):
            parts = [self.dims(t, reduced, source) for t in node.inputs]
            return None if any(p is None for p in parts) else [d for p in parts for d in p]
        if node.op in ("Reshape", "Unsqueeze", "Squeeze"):  # on a shape vector: only its layout changes
            inner = self.dims(node.inputs[0], reduced, source)
            return inner if inner is not None and (node.op != "Squeeze" or len(inner) == 1) and \
                _keeps_a_vector(node, len(inner)) else None
        if node.op == "Gather" and int(node.attrs.get("axis", 0)) == 0:
            inner, index = self.dims(node.inputs[0], reduced, source), constant_value(node.inputs[1])
            if inner is None or index is None or index.size != 1:
                return None
            i = int(index.ravel()[0])
            return [inner[i]] if -len(inner) <= i < len(inner) else None
        if node.op == "Cast" and int(node.attrs.get("to", 0)) in INTEGER_TYPES:
            return self.dims(node.inputs[0], reduced, source)
        if node.op == "Slice":
            inner = self.dims(node.inputs[0], reduced, source)
            taken = _sliced(node, len(inner)) if inner is not None else None
            return None if taken is None else [inner[i] for i in taken]
        return None

    def length_and_last(self, shape: gs.Tensor) -> tuple[int | None, int | None]:
        """(how many values a 1-D shape tensor holds, its last value), each None where not known:
        less than `dims` needs, since no dimension is named."""
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
            length, last = self.length_and_last(node.inputs[0])
            return length, last if last is not None and 0 <= last <= 127 else None  # one every integer type holds
        if node.op == "Slice":
            length = self.length_and_last(node.inputs[0])[0]
            taken = _sliced(node, length) if length is not None else None
            return (None, None) if taken is None else (len(taken), None)
        if node.op == "Concat" and int(node.attrs.get("axis", 0)) in (0, -1):
            parts = [self.length_and_last(t) for t in node.inputs]
            if any(length is None for length, _ in parts):
                return None, None
            return sum(length for length, _ in parts), parts[-1][1] if parts[-1][0] else None
        return None, None


def _sliced(node: gs.Node, length: int) -> list[int] | None:
    """The positions a Slice with constant starts, ends and (optional) axis 0 and step 1 takes from
    a vector of `length` values; None for any other Slice."""
    inputs = present_inputs(node)
    params = [constant_value(t) for t in inputs[1:]]
    if len(params) < 2 or any(p is None or np.asarray(p).size != 1 for p in params):
        return None
    starts, ends = (int(np.asarray(p).ravel()[0]) for p in params[:2])
    axis = int(np.asarray(params[2]).ravel()[0]) if len(params) > 2 else 0
    step = int(np.asarray(params[3]).ravel()[0]) if len(params) > 3 else 1
    if axis not in (0, -1) or step != 1:
        return None
    return list(range(*slice(starts, ends).indices(length)))


def _keeps_a_vector(node: gs.Node, length: int) -> bool:
    """Whether Reshape/Unsqueeze/Squeeze of a shape vector of `length` values gives a vector (or, for
    Unsqueeze/Squeeze of one value, a scalar or one-element vector) with the same values in order."""
    if node.op == "Reshape":
        target = constant_value(node.inputs[1])
        return target is not None and [int(d) for d in np.asarray(target).ravel()] in ([-1], [length])
    if node.op == "Unsqueeze":
        return axes_of(node) in ([0], [-1]) and length == 1
    return length == 1  # Squeeze of a one-element vector
