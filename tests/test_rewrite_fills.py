"""export/rewrite/fills.py: a native norm's scale or bias written as ConstantOfShape(Shape(x))
(torch's nn.RMSNorm without a weight at opset 23) becomes a per-feature constant, so the norm is
fused; any other fill is left as it is."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from export.rewrite import rewrite_model
from export.rewrite.evaluate import run_model
from normops import GRAPH

HIDDEN = 16


def fill_graph(value=1.0, op="RMSNormalization", shape_of="x", shape_attrs=None, fill_input=1, axis=-1,
               also_added=False, constant_shape=None, x_dims=("batch", "seq", HIDDEN)):
    """x [batch, seq, HIDDEN] (batch and seq dynamic) -> op(x, scale) with the scale, or (at
    fill_input=2, LayerNormalization) the bias, a ConstantOfShape of Shape(shape_of), or of
    `constant_shape` where given (as exporters fold Shape of a static input)."""
    dtype = TensorProto.FLOAT
    fill = helper.make_tensor("value", dtype, [1], [value])
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["fill"], value=fill)]
    inits = [onnx.numpy_helper.from_array(np.linspace(0.5, 1.5, HIDDEN).astype(np.float32), "gamma")]
    if constant_shape is None:
        nodes.insert(0, helper.make_node("Shape", [shape_of], ["shape"], **(shape_attrs or {})))
    else:
        inits.append(onnx.numpy_helper.from_array(np.array(constant_shape, np.int64), "shape"))
    inputs = ["x", "fill"] if fill_input == 1 else ["x", "gamma", "fill"]
    nodes.append(helper.make_node(op, inputs, ["y"], axis=axis, epsilon=1e-5))
    outputs = [helper.make_tensor_value_info("y", dtype, None)]
    if also_added:
        nodes.append(helper.make_node("Add", ["x", "fill"], ["plus"]))
        outputs.append(helper.make_tensor_value_info("plus", dtype, None))
    graph_inputs = [helper.make_tensor_value_info("x", dtype, list(x_dims))]
    if shape_of == "other":
        graph_inputs.append(helper.make_tensor_value_info("other", dtype, ["batch", "seq", HIDDEN]))
    graph = helper.make_graph(nodes, "fill", graph_inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def feeds(model) -> dict:
    rng = np.random.default_rng(0)
    return {i.name: rng.standard_normal((2, 3, HIDDEN)).astype(np.float32) for i in model.graph.input}


@pytest.mark.parametrize("constant_shape", [[2, 3, HIDDEN], [1, 1, HIDDEN], [HIDDEN], [3, 1]])
def test_a_constant_shape_that_broadcasts_to_the_input_is_a_per_feature_scale_too(constant_shape):
    """With a static input, exporters fold Shape(x) into a constant: any constant shape that
    broadcasts to x's without growing it gives each element the fill's value."""
    model = fill_graph(2.0, constant_shape=constant_shape, x_dims=(2, 3, HIDDEN))
    out, report = rewrite_model(model, target="tensorrt")
    assert report.counts == {"RMSNorm": 1}, [r.reason for r in report.rejected]
    f = feeds(model)
    assert GRAPH["float32"].passes(run_model(out, f)[0], run_model(model, f)[0])


@pytest.mark.parametrize("value", [1.0, 2.5])
def test_a_fill_of_the_inputs_shape_is_a_per_feature_scale(value):
    model = fill_graph(value)
    out, report = rewrite_model(model, target="tensorrt")
    assert report.counts == {"RMSNorm": 1} and not report.rejected
    assert any("ConstantOfShape scale/bias fill" in n and f"'fill' (value {value:g})" in n for n in report.notes)
    assert not any(n.op_type in ("Shape", "ConstantOfShape") for n in out.graph.node)  # nothing reads them now
    (fused,) = [n for n in out.graph.node if n.domain == "normfuse"]
    gamma = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}[fused.input[1]]
    assert gamma.shape == (HIDDEN,) and np.all(gamma == value)
    f = feeds(model)
    assert GRAPH["float32"].passes(run_model(out, f)[0], run_model(model, f)[0])


def test_a_layer_norm_bias_fill_becomes_beta():
    model = fill_graph(0.25, op="LayerNormalization", fill_input=2)
    out, report = rewrite_model(model, target="tensorrt")
    assert report.counts == {"LayerNorm": 1}
    f = feeds(model)
    assert GRAPH["float32"].passes(run_model(out, f)[0], run_model(model, f)[0])


@pytest.mark.parametrize("why,kwargs", [
    ("the shape of another tensor", {"shape_of": "other"}),
    ("part of the shape", {"shape_attrs": {"start": 1}}),
    ("the fill also read elsewhere", {"also_added": True}),
    ("a norm over another axis", {"axis": 1}),
    ("a constant shape that grows the output", {"constant_shape": [4, 2, 3, HIDDEN], "x_dims": (2, 3, HIDDEN)}),
    ("a constant shape that cannot be shown to fit", {"constant_shape": [2, 3, HIDDEN]}),  # batch, seq dynamic
])
def test_other_fills_are_left_alone(why, kwargs):
    model = fill_graph(**kwargs)
    out, report = rewrite_model(model, target="tensorrt")
    assert report.fused == 0, why
    assert not any("ConstantOfShape scale/bias fill" in n for n in report.notes), why
    assert sum(n.op_type == "ConstantOfShape" for n in out.graph.node) == 1, why
