"""ONNX Runtime's symbolic shape inference as the rewriter uses it (export/rewrite/symbolic.py):
what it proves equal lets a residual Add into the fused op, so it must prove no more than holds,
and it must get past what stopped it on real models (a weight it cannot read, a broadcast it
cannot size)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import sympy
from onnx import TensorProto, helper, numpy_helper

from export.rewrite import rewrite_model
from export.rewrite.rewriter import SKELETON_CONSTANT
from export.rewrite.symbolic import _largest_of_a_broadcast
from export.rewrite.synth import plain_rms_constants, plain_rms_nodes
from normops import GRAPH

HIDDEN = 8


def _model(nodes, inputs, initializers=(), contrib_op=True, extra_outputs=()):
    """`nodes` ending in a tensor `s`, then a spelled-out RMSNorm of it into `y` (and a contrib op
    after it, which makes the rewriter ask ONNX Runtime's inference for shapes)."""
    nodes = [*nodes, *plain_rms_nodes("s", "y0" if contrib_op else "y")]
    opsets = [helper.make_opsetid("", 18)]
    if contrib_op:
        nodes.append(helper.make_node("FastGelu", ["y0"], ["y"], domain="com.microsoft"))
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
               *(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in extra_outputs)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              outputs, [*plain_rms_constants(HIDDEN), *initializers])
    return helper.make_model(graph, opset_imports=opsets)


def _run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _same_outputs(model, fused, feeds):
    for expected, got in zip(_run(model, feeds), _run(fused, feeds)):
        assert expected.shape == got.shape and GRAPH["float32"].passes(got, expected)


def _random(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_a_broadcast_it_once_met_is_not_taken_for_an_equality_later():
    """relu(a[batch, 8]) + b2[2 * other, 8] broadcasts '2 * other' against 'batch'. ONNX Runtime's
    inference noted them as equal there even without auto-merge (as batch: it prefers an input's
    name), and a later MatMul of x [batch, 4, 8] by w2 [2 * other, 8, 8] then came out
    [batch, 4, 8]: added to x in front of the norm, that passed for a residual, yet with batch 1
    and other 1 the MatMul gives 2 rows and the Add broadcasts."""
    nodes = [helper.make_node("Relu", ["a"], ["a2"]), helper.make_node("Relu", ["b"], ["b1"]),
             helper.make_node("Concat", ["b1", "b1"], ["b2"], axis=0),
             helper.make_node("Add", ["a2", "b2"], ["ab"]),
             helper.make_node("Concat", ["w", "w"], ["w2"], axis=0),
             helper.make_node("MatMul", ["x", "w2"], ["xw"]),
             helper.make_node("Add", ["xw", "x"], ["s"])]
    model = _model(nodes, [("a", ["batch", HIDDEN]), ("b", ["other", HIDDEN]), ("x", ["batch", 4, HIDDEN]),
                           ("w", ["other", HIDDEN, HIDDEN])], extra_outputs=["ab"])
    _, report = rewrite_model(model, target="tensorrt")
    assert report.counts == {"RMSNorm": 1}, report.residual_skipped
    fused, report = rewrite_model(model, target="onnxruntime")
    assert report.counts == {"RMSNorm": 1}
    _same_outputs(model, fused, {"a": _random(1, HIDDEN), "b": _random(1, HIDDEN, seed=1),
                                 "x": _random(1, 4, HIDDEN, seed=2), "w": _random(1, HIDDEN, HIDDEN, seed=3)})


def _position_embedding_model(contrib_op=True, expand=False):
    """x [batch, seq, 8] plus the first seq rows of a 16-row table ([1, Min(16, seq), 8]; with
    `expand`, expanded to x's shape first), then a residual Add of that and another [batch, seq, 8]
    input in front of the norm: the sum of a broadcast the op accepts only when Min(16, seq) is
    seq, so it is [batch, seq, 8]."""
    table = numpy_helper.from_array(_random(16, HIDDEN, seed=4), "table")
    nodes = [helper.make_node("Shape", ["x"], ["seq"], start=1, end=2),
             helper.make_node("Slice", ["table", "zero", "seq", "zero"], ["rows"]),
             helper.make_node("Unsqueeze", ["rows", "zero"], ["positions0" if expand else "positions"])]
    if expand:
        nodes += [helper.make_node("Shape", ["x"], ["x_shape"]),
                  helper.make_node("Expand", ["positions0", "x_shape"], ["positions"])]
    nodes += [helper.make_node("Add", ["x", "positions"], ["h"]),
             helper.make_node("Relu", ["other"], ["other2"]),
             helper.make_node("Add", ["h", "other2"], ["s"])]
    zero = numpy_helper.from_array(np.array([0], np.int64), "zero")
    return _model(nodes, [("x", ["batch", "seq", HIDDEN]), ("other", ["batch", "seq", HIDDEN])],
                  [table, zero], contrib_op=contrib_op)


@pytest.mark.parametrize("expand", (False, True), ids=("add", "expand"))
def test_a_broadcast_against_a_clamped_copy_of_a_dim_has_that_dim(expand):
    """BERT's position embeddings: [1, Min(512, seq), H] + [batch, seq, H]. ONNX Runtime's
    inference stopped there, so every residual Add behind it was lost (ORT-optimised BERT of hidden
    768: one of six norms fused); DistilBERT, DeBERTa-v2 and ELECTRA lost half of theirs. RoBERTa
    expands its mask that way: the inference failed there on sizes written as sympy values."""
    model = _position_embedding_model(expand=expand)
    fused, report = rewrite_model(model, target="onnxruntime")
    assert report.counts == {"AddRMSNorm": 1}, report.residual_skipped
    for seq in (1, 5, 16):
        _same_outputs(model, fused, {"x": _random(2, seq, HIDDEN), "other": _random(2, seq, HIDDEN, seed=1)})


def test_large_weights_do_not_stop_the_inference():
    """Weights over SKELETON_CONSTANT elements reach shape inference without their bytes; ONNX
    Runtime's inference read the value of any constant an Add takes and stopped at the first such
    Add (Swin's attention bias; any bias Add of a model wider than 256)."""
    model = _position_embedding_model()
    big = numpy_helper.from_array(np.ones(SKELETON_CONSTANT + 1, np.float32), "big")
    model.graph.initializer.append(big)
    model.graph.input.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [SKELETON_CONSTANT + 1]))
    model.graph.node.insert(0, helper.make_node("Add", ["c", "big"], ["side"]))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    fused, report = rewrite_model(model, target="onnxruntime")
    assert report.counts == {"AddRMSNorm": 1}, report.residual_skipped
    _same_outputs(model, fused, {"x": _random(2, 3, HIDDEN), "other": _random(2, 3, HIDDEN, seed=1),
                                 "c": _random(SKELETON_CONSTANT + 1, seed=2)})


def test_a_concats_other_axes_are_one_size():
    """Concat(a [batch, 4, 8], b [n, 4, 8]) along axis 1 runs only where n is batch, so its result
    is [batch, 8, 8]. ONNX Runtime's inference stopped at such a Concat (MobileViT: a Conv's output
    beside folded patches), so a Reshape to -1 after it, which onnx's inference leaves unknown,
    stayed unknown, and the residual Add of that with c [batch, 8, 8] was lost (5 in MobileViT)."""
    nodes = [helper.make_node("Concat", ["a", "b"], ["ab"], axis=1),
             helper.make_node("Reshape", ["ab", "rows"], ["r"]),
             helper.make_node("Relu", ["c"], ["c2"]), helper.make_node("Add", ["r", "c2"], ["s"])]
    rows = numpy_helper.from_array(np.array([-1, 8, HIDDEN], np.int64), "rows")
    model = _model(nodes, [("a", ["batch", 4, HIDDEN]), ("b", ["n", 4, HIDDEN]), ("c", ["batch", 8, HIDDEN])], [rows])
    fused, report = rewrite_model(model, target="onnxruntime")
    assert report.counts == {"AddRMSNorm": 1}, report.residual_skipped
    _same_outputs(model, fused, {"a": _random(2, 4, HIDDEN), "b": _random(2, 4, HIDDEN, seed=1),
                                 "c": _random(2, 8, HIDDEN, seed=2)})


@pytest.mark.parametrize("side", ("concat-of-constants", "reduce-of-no-shape", "none"))
def test_an_op_form_the_inference_fails_on_does_not_stop_it(side):
    """ONNX Runtime's Concat rule asserts axis 0 when it knows every input's values (a Concat of
    two constant vectors along axis -1 fails it), and its rules for reductions and element-wise ops
    fail on an input of no known shape (ConvNeXt-V2's GRN): either ended the inference for the
    whole graph, so a Reshape to -1 stayed unknown and the residual Add behind it was lost. Now a
    failing rule is stepped over, and where the inference fails outside its rules, what it found
    before stands."""
    nodes = [helper.make_node("Shape", ["a"], ["a_shape"], start=1),
             helper.make_node("Concat", ["minus_one", "a_shape"], ["target"], axis=0),
             helper.make_node("Reshape", ["a", "target"], ["a2"]),
             helper.make_node("Relu", ["b"], ["b2"]), helper.make_node("Add", ["a2", "b2"], ["s"])]
    constants = [numpy_helper.from_array(np.array([-1], np.int64), "minus_one")]
    extra = []
    if side != "none":
        nodes[:0] = [helper.make_node("Concat", ["c1", "c2"], ["c12"], axis=-1),
                     helper.make_node("Cast", ["c12"], ["c12f"], to=TensorProto.FLOAT)]
        constants += [numpy_helper.from_array(np.ones(2, np.int64), n) for n in ("c1", "c2")]
        extra = ["c12f"]
    inputs, feeds = [("a", ["batch", "seq", HIDDEN]), ("b", ["batch", "seq", HIDDEN])], {}
    if side == "reduce-of-no-shape":  # after the norm's path, so that what came before it can stand
        nodes += [helper.make_node("ReduceMax", ["d"], ["d_max"], keepdims=1),
                  helper.make_node("Mul", ["d_max", "d_max"], ["d_sq"])]
        inputs.append(("d", None))
        extra, feeds = ["d_sq"], {"d": _random(2, 5, seed=3)}
    model = _model(nodes, inputs, constants, contrib_op=False, extra_outputs=extra)
    fused, report = rewrite_model(model, target="onnxruntime")
    assert report.counts == {"AddRMSNorm": 1}, report.residual_skipped
    _same_outputs(model, fused, {"a": _random(2, 3, HIDDEN), "b": _random(2, 3, HIDDEN, seed=1), **feeds})


S = sympy.Symbol("seq", integer=True, positive=True)
T = sympy.Symbol("t", integer=True, nonnegative=True)  # a computed size: may be 0
B = sympy.Symbol("batch", integer=True, positive=True)


@pytest.mark.parametrize("sizes, expected", [
    ([sympy.Min(512, S), S], S),  # clamped copy
    ([S, sympy.Min(512, S)], S),
    ([sympy.Integer(1), S], S),
    ([sympy.Integer(512), sympy.Min(512, S)], sympy.Integer(512)),
    ([S, S], S),
    ([B, S], None),  # unrelated: either may be 1
    ([T, S + T], None),  # t may be 0: 0 against 1 gives 0, not the larger
    ([sympy.Integer(1), sympy.Integer(1)], sympy.Integer(1)),
])
def test_the_size_of_a_broadcast_is_known_only_where_it_holds_for_every_valid_run(sizes, expected):
    assert _largest_of_a_broadcast(sizes) == expected
