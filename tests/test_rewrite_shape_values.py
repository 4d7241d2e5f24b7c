"""export/rewrite/shape_values.py: what a shape tensor holds, read without running the graph, as the
keepdims and zeros passes rely on it (a wrong read there would change a model's meaning)."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from export.rewrite.shape_values import ShapeReader, declared_names


def graph_of(nodes, inits=(), dims=("unk__7", "seq", 16)):
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))]
    outputs = [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.INT64, None)]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits)),
                              opset_imports=[helper.make_opsetid("", 18)])
    return gs.import_onnx(model)


def ints(name, values):
    return onnx.numpy_helper.from_array(np.array(values, np.int64), name)


def shape_chain(*, step=1, cast_to=TensorProto.INT32, starts=0, ends=2):
    """Cast(Concat(Slice(Cast(Shape(x), cast_to), starts, ends, 0, step), [1]), int64), as tf2onnx writes it."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Cast", ["s"], ["s32"], to=cast_to),
             helper.make_node("Slice", ["s32", "starts", "ends", "axes", "steps"], ["sl"]),
             helper.make_node("Cast", ["one"], ["one32"], to=cast_to),
             helper.make_node("Concat", ["sl", "one32"], ["cat"], axis=0),
             helper.make_node("Cast", ["cat"], ["shape"], to=TensorProto.INT64)]
    inits = [ints("starts", [starts]), ints("ends", [ends]), ints("axes", [0]), ints("steps", [step]), ints("one", [1])]
    return graph_of(nodes, inits)


def test_a_sliced_cast_shape_is_read_dimension_by_dimension():
    graph = shape_chain()
    reader = ShapeReader(declared_names(graph))
    shape, x = graph.tensors()["shape"], graph.tensors()["x"]
    # unk__7 is declared on the input, so it names the batch; seq is a name; the 1 is a constant
    assert reader.dims(shape) == [("named", "unk__7"), ("named", "seq"), 1] == [reader.dim(x, 0), reader.dim(x, 1), 1]
    assert reader.length_and_last(shape) == (3, 1)
    # without the declaration the placeholder names nothing but the axis it was read from
    assert ShapeReader().dims(shape)[0] == ("axis", id(x), 0)


@pytest.mark.parametrize("kwargs", [{"step": 2}, {"step": -1, "starts": 1, "ends": -3}])
def test_a_slice_with_another_step_is_not_read(kwargs):
    graph = shape_chain(**kwargs)
    reader = ShapeReader(declared_names(graph))
    assert reader.dims(graph.tensors()["shape"]) is None
    assert reader.length_and_last(graph.tensors()["shape"]) == (None, None)


def test_a_cast_to_a_float_type_is_not_read():
    graph = shape_chain(cast_to=TensorProto.FLOAT)
    reader = ShapeReader(declared_names(graph))
    assert reader.dims(graph.tensors()["shape"]) is None and reader.length_and_last(graph.tensors()["shape"]) == (None, None)


def test_slice_bounds_past_the_ends_are_clamped_as_onnx_does():
    graph = shape_chain(starts=-2, ends=2**31)  # the last two dims, as tf2onnx writes "to the end"
    reader = ShapeReader(declared_names(graph))
    assert reader.dims(graph.tensors()["shape"]) == [("named", "seq"), 16, 1]
