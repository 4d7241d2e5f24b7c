"""export/rewrite/keepdims.py and the mean written as a sum: a last-axis reduction taken with
keepdims=0 whose axis a Reshape (and an Expand to the same shape) puts back, as torch's dynamo
exporter writes var and var_mean, is one reduction with keepdims=1, so the norm around it is fused;
a sum divided by the row length is a mean. Shapes that do not give exactly the axis back are left
as written, and a sum divided by anything else is not a mean."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from export.rewrite import rewrite_model
from export.rewrite.evaluate import run_model
from normops import GRAPH

HIDDEN = 16


def ints(name, values):
    return onnx.numpy_helper.from_array(np.array(values, np.int64), name)


def floats(name, value):
    return onnx.numpy_helper.from_array(np.array(value, np.float32), name)


def restored_rms(restore="shape-of-reduced", expand=True, divisor=float(HIDDEN), dims=("batch", "seq", HIDDEN), axis=-1):
    """y = x / sqrt(restore(ReduceSum(x * x, [-1], keepdims=0)) / divisor + eps): the RMSNorm spelling
    of a hand-written sum, its axis put back the way `restore` says:
    - "shape-of-reduced": Reshape(r, Concat(Reshape(Shape(r, 0, 1), [-1]), Reshape(Shape(r, 1, 2), [-1]), [1])),
      torch's form, then (with `expand`) Expand to Concat(Shape(x, 0, 2), [1]);
    - "gather": the shape as Concat(Unsqueeze(Gather(Shape(x), 0)), Unsqueeze(Gather(Shape(x), 1)), [1]);
    - "constant": Reshape(r, [2, 3, 1]) (a static input);
    - "runtime": Reshape(r, shape) with the shape a graph input;
    - "unsqueeze": Unsqueeze(r, [axis]);
    - "middle": Reshape(r, Concat(Shape(r, 0, 1), [1], Shape(r, 1, 2))): with `axis` 1, the reduced
      axis put back where it was, the middle one."""
    inits = [ints("last", [axis]), ints("flat", [-1]), ints("one", [1]), floats("n", divisor), floats("eps", 1e-6),
             ints("zero_i", 0), ints("one_i", 1), ints("axis0", [0])]
    nodes = [helper.make_node("Mul", ["x", "x"], ["sq"]),
             helper.make_node("ReduceSum", ["sq", "last"], ["r"], keepdims=0)]
    if restore == "shape-of-reduced":
        nodes += [helper.make_node("Shape", ["r"], ["r0"], start=0, end=1), helper.make_node("Shape", ["r"], ["r1"], start=1, end=2),
                  helper.make_node("Reshape", ["r0", "flat"], ["r0f"]), helper.make_node("Reshape", ["r1", "flat"], ["r1f"]),
                  helper.make_node("Concat", ["r0f", "r1f", "one"], ["shape"], axis=0)]
    elif restore == "gather":
        nodes += [helper.make_node("Shape", ["x"], ["xs"]),
                  helper.make_node("Gather", ["xs", "zero_i"], ["d0"], axis=0), helper.make_node("Gather", ["xs", "one_i"], ["d1"], axis=0),
                  helper.make_node("Unsqueeze", ["d0", "axis0"], ["d0v"]), helper.make_node("Unsqueeze", ["d1", "axis0"], ["d1v"]),
                  helper.make_node("Concat", ["d0v", "d1v", "one"], ["shape"], axis=0)]
    elif restore == "middle":
        nodes += [helper.make_node("Shape", ["r"], ["r0"], start=0, end=1), helper.make_node("Shape", ["r"], ["r1"], start=1, end=2),
                  helper.make_node("Concat", ["r0", "one", "r1"], ["shape"], axis=0)]
    elif restore == "constant":
        inits.append(ints("shape", [2, 3, 1]))
    if restore == "unsqueeze":
        inits.append(ints("at", [axis]))
        nodes.append(helper.make_node("Unsqueeze", ["r", "at"], ["kept"]))
    else:
        nodes.append(helper.make_node("Reshape", ["r", "shape"], ["kept"]))
    if expand:
        nodes += [helper.make_node("Shape", ["x"], ["rows"], start=0, end=2),
                  helper.make_node("Concat", ["rows", "one"], ["rows1"], axis=0),
                  helper.make_node("Expand", ["kept", "rows1"], ["ms_sum"])]
    nodes += [helper.make_node("Div", ["ms_sum" if expand else "kept", "n"], ["ms"]),
              helper.make_node("Add", ["ms", "eps"], ["ms_eps"]), helper.make_node("Sqrt", ["ms_eps"], ["rms"]),
              helper.make_node("Div", ["x", "rms"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))]
    if restore == "runtime":
        inputs.append(helper.make_tensor_value_info("shape", TensorProto.INT64, [3]))
    graph = helper.make_graph(nodes, "restored", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def assert_same_outputs(model, out):
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, HIDDEN)).astype(np.float32)}
    if len(model.graph.input) > 1:
        feeds["shape"] = np.array([2, 3, 1], np.int64)
    assert GRAPH["float32"].passes(run_model(out, feeds)[0], run_model(model, feeds)[0])


@pytest.mark.parametrize("restore,expand,dims", [
    ("shape-of-reduced", True, ("batch", "seq", HIDDEN)),
    ("shape-of-reduced", False, ("batch", "seq", HIDDEN)),
    ("gather", True, ("batch", "seq", HIDDEN)),
    ("constant", False, (2, 3, HIDDEN)),
    ("constant", True, (2, 3, HIDDEN)),
    ("unsqueeze", False, ("batch", "seq", HIDDEN)),
])
def test_a_reduction_whose_axis_is_put_back_is_fused(restore, expand, dims):
    model = restored_rms(restore, expand, dims=dims)
    out, report = rewrite_model(model, target="tensorrt")
    assert report.counts == {"RMSNorm": 1}, [r.reason for r in report.rejected]
    assert [n.op_type for n in out.graph.node] == ["RMSNorm"]  # the shape arithmetic went with it
    assert any("keepdims=0" in note for note in report.notes)
    assert_same_outputs(model, out)


@pytest.mark.parametrize("restore,axis", [("runtime", -1), ("middle", 1), ("unsqueeze", 1)])
def test_a_reshape_not_shown_to_give_the_rows_back_is_left_alone(restore, axis):
    """A shape given at run time cannot be read; a reduction over the middle axis is no last-axis one."""
    model = restored_rms(restore, expand=False, axis=axis)
    out, report = rewrite_model(model, target="tensorrt")
    assert report.fused == 0 and not any("keepdims=0" in note for note in report.notes)
    assert len(out.graph.node) == len(model.graph.node)
    assert_same_outputs(model, out)


def test_a_sum_divided_by_other_than_the_row_length_is_not_a_mean():
    model = restored_rms("constant", expand=False, divisor=HIDDEN + 1.0, dims=(2, 3, HIDDEN))
    out, report = rewrite_model(model, target="tensorrt")
    assert report.fused == 0
    assert [r.reason for r in report.rejected] == [f"the sum over the last axis is divided by {HIDDEN + 1}, "
                                                   f"not by the row length {HIDDEN}"]
    assert_same_outputs(model, out)


def test_an_expand_that_grows_the_reduction_is_kept():
    """Reshape puts the axis back; an Expand to [2, 3, HIDDEN] then repeats each row's sum along it:
    the Reshape becomes keepdims=1, the Expand stays, and no norm is fused (the sum is no longer per row)."""
    model = restored_rms("constant", expand=True, dims=(2, 3, HIDDEN))
    grow = ints("grown", [2, 3, HIDDEN])
    model.graph.initializer.append(grow)
    for node in model.graph.node:
        if node.op_type == "Expand":
            node.input[1] = "grown"
    out, report = rewrite_model(model, target="tensorrt")
    assert report.fused == 0 and "Expand" in [n.op_type for n in out.graph.node]
    assert_same_outputs(model, out)


def test_a_rewritten_graph_is_left_as_it_is():
    once, _ = rewrite_model(restored_rms(), target="onnx")
    twice, report = rewrite_model(once, target="onnx")
    assert report.fused == 0 and report.notes == []
    assert [n.op_type for n in twice.graph.node] == [n.op_type for n in once.graph.node]


def jax2tf_layernorm(fraction: float = 1.0 / HIDDEN, tail=(1,)):
    """Flax's LayerNorm on the rows of a 2-D input as jax2tf and tf2onnx write it (Google's Magika
    ships one): sums taken with keepdims=0, arithmetic on them, then the axis put back by a Reshape
    and an Expand to a shape sliced from the input's at run time through int32:
        rows = Cast(Concat(Slice(Cast(Shape(x), int32), [0], [1], [0]), tail), int64)
        mean = restore(ReduceSum(x) * fraction), var = restore(max(0, ReduceSum(x * x) * fraction - mean^2))
        y = (x - mean) * (Reciprocal(Sqrt(var + eps)) * gamma) + beta"""
    rng = np.random.default_rng(1)
    inits = [ints("ax1", [1]), ints("zero", [0]), onnx.numpy_helper.from_array(np.array(tail, np.int32), "tail"),
             floats("fraction", fraction), floats("clamp", 0.0), floats("eps", 1e-6),
             floats("gamma", 1 + 0.1 * rng.standard_normal((1, HIDDEN))), floats("beta", 0.1 * rng.standard_normal((1, HIDDEN)))]
    nodes = [helper.make_node("ReduceSum", ["x", "ax1"], ["s"], keepdims=0),
             helper.make_node("Mul", ["x", "x"], ["sq"]), helper.make_node("ReduceSum", ["sq", "ax1"], ["q"], keepdims=0),
             helper.make_node("Mul", ["s", "fraction"], ["mean"]), helper.make_node("Mul", ["q", "fraction"], ["msq"]),
             helper.make_node("Mul", ["mean", "mean"], ["mean2"]), helper.make_node("Sub", ["msq", "mean2"], ["diff"]),
             helper.make_node("Max", ["clamp", "diff"], ["var"]),
             helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Cast", ["shape"], ["shape32"], to=TensorProto.INT32),
             helper.make_node("Slice", ["shape32", "zero", "ax1", "zero"], ["batch"]),
             helper.make_node("Concat", ["batch", "tail"], ["rows32"], axis=0),
             helper.make_node("Cast", ["rows32"], ["rows"], to=TensorProto.INT64)]
    for name in ("mean", "var"):
        nodes += [helper.make_node("Reshape", [name, "rows"], [f"{name}_r"]), helper.make_node("Expand", [f"{name}_r", "rows"], [f"{name}_k"])]
    nodes += [helper.make_node("Add", ["var_k", "eps"], ["var_eps"]), helper.make_node("Sqrt", ["var_eps"], ["std"]),
              helper.make_node("Reciprocal", ["std"], ["inv"]), helper.make_node("Mul", ["inv", "gamma"], ["scale"]),
              helper.make_node("Sub", ["x", "mean_k"], ["centred"]), helper.make_node("Mul", ["centred", "scale"], ["normed"]),
              helper.make_node("Add", ["normed", "beta"], ["y"])]
    graph = helper.make_graph(nodes, "jax2tf_layernorm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def rows_feeds():
    return {"x": (3.0 + np.random.default_rng(0).standard_normal((5, HIDDEN))).astype(np.float32)}


def test_a_2d_rows_sums_put_back_after_arithmetic_by_a_shape_read_at_run_time_are_fused():
    """The axis goes back after `* (1 / n)`, a square, a difference and a clamp, through a shape
    whose first value is only known at run time: for a vector of row sums, Reshape to [d, 1] can
    only be [rows, 1], so the chain is written again on keepdims=1 sums and the LayerNorm is fused."""
    model = jax2tf_layernorm()
    out, report = rewrite_model(model, target="tensorrt")
    assert report.counts == {"LayerNorm": 1}, [r.reason for r in report.rejected]
    assert [n.op_type for n in out.graph.node] == ["LayerNorm"]
    assert any("took 2 last-axis reduction(s)" in note for note in report.notes), report.notes
    feeds = rows_feeds()
    assert GRAPH["float32"].passes(run_model(out, feeds)[0], run_model(model, feeds)[0])


def test_a_sum_multiplied_by_other_than_the_inverse_row_length_is_not_a_mean():
    model = jax2tf_layernorm(fraction=1.0 / (HIDDEN + 1))
    out, report = rewrite_model(model, target="tensorrt")
    assert report.fused == 0
    assert {r.reason for r in report.rejected} == {f"the sum over the last axis is multiplied by {1.0 / (HIDDEN + 1):g}, "
                                                   f"not by 1 / {HIDDEN} (the row length)"}
    feeds = rows_feeds()
    np.testing.assert_array_equal(run_model(out, feeds)[0], run_model(model, feeds)[0])


def test_a_reshape_of_row_sums_to_more_than_two_values_is_left_alone():
    """[d, 1, 1] is no restore of a vector's axis (the model broadcasts it to [5, 5, HIDDEN])."""
    model = jax2tf_layernorm(tail=(1, 1))
    out, report = rewrite_model(model, target="tensorrt")
    assert report.fused == 0 and not any("keepdims=0" in note for note in report.notes)
    feeds = rows_feeds()
    np.testing.assert_array_equal(run_model(out, feeds)[0], run_model(model, feeds)[0])


def zero_subtraction(rows_of_x: bool = True, fill: float = 0.0):
    """y = Identity(x - Expand(fill, shape)): shape is x's rows and 1 (Concat(Shape(x, 0, 1), [1])),
    or the constant [3, 1] against an x of one row."""
    inits = [floats("fill", [fill]), ints("one", [1]), ints("three_rows", [3, 1])]
    nodes = [helper.make_node("Shape", ["x"], ["rows"], start=0, end=1),
             helper.make_node("Concat", ["rows", "one"], ["rows1"], axis=0),
             helper.make_node("Expand", ["fill", "rows1" if rows_of_x else "three_rows"], ["zeros"]),
             helper.make_node("Sub", ["x", "zeros"], ["d"]), helper.make_node("Identity", ["d"], ["y"])]
    dims = ["batch", HIDDEN] if rows_of_x else [1, HIDDEN]
    graph = helper.make_graph(nodes, "zeros", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("rows_of_x,fill,dropped", [(True, 0.0, True), (True, 1.0, False), (False, 0.0, False)])
def test_a_subtraction_of_zeros_is_dropped_only_where_it_changes_nothing(rows_of_x, fill, dropped):
    """x - broadcast(0) is x when the zeros' shape cannot grow x's; not for other values, nor for
    zeros of 3 rows against an x of one (the difference has 3)."""
    model = zero_subtraction(rows_of_x, fill)
    out, report = rewrite_model(model, target="tensorrt")
    assert any("subtraction(s) of zeros" in note for note in report.notes) == dropped
    assert ("Sub" in [n.op_type for n in out.graph.node]) != dropped
    x = np.random.default_rng(0).standard_normal((1, HIDDEN)).astype(np.float32)
    np.testing.assert_array_equal(run_model(out, {"x": x})[0], run_model(model, {"x": x})[0])


def guarded(condition: str, rows_of_x: bool = True):
    """y = Identity(Where(n - ddof > 0, x, Expand(NaN, shape))), jax2onnx's guard on jnp.var's
    divisor: `condition` "true" (64 - 0 > 0), "false" (64 - 64 > 0) or "input" (a graph input, not
    a constant); the NaN fill has x's rows and 1 column, or 3 rows against an x of one."""
    inits = [floats("n", 64.0), onnx.numpy_helper.from_array(np.array(0 if condition != "false" else 64, np.int64), "ddof"),
             floats("zero", 0.0), floats("nan", [np.nan]), ints("one", [1]), ints("three_rows", [3, 1])]
    nodes = [helper.make_node("Cast", ["ddof"], ["ddof_f"], to=TensorProto.FLOAT),
             helper.make_node("Sub", ["n", "ddof_f"], ["n_ddof"]),
             helper.make_node("Shape", ["x"], ["rows"], start=0, end=1),
             helper.make_node("Concat", ["rows", "one"], ["rows1"], axis=0),
             helper.make_node("Expand", ["nan", "rows1" if rows_of_x else "three_rows"], ["nans"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1] if rows_of_x else [1, 1])]
    if condition == "input":
        inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    else:
        nodes.append(helper.make_node("Greater", ["n_ddof", "zero"], ["cond"]))
    nodes += [helper.make_node("Where", ["cond", "x", "nans"], ["g"]), helper.make_node("Identity", ["g"], ["y"])]
    graph = helper.make_graph(nodes, "guarded", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("condition,rows_of_x,dropped", [("true", True, True), ("false", True, True),
                                                          ("input", True, False), ("true", False, False)])
def test_a_where_is_bypassed_only_where_its_constant_condition_decides_it(condition, rows_of_x, dropped):
    """Where(True, x, fill) is x, Where(False, x, fill) the fill, when the condition is worked out
    from constants (`n - Cast(ddof) > 0`) and the fill cannot grow what is taken; not when the
    condition is an input, nor when the fill has 3 rows against an x of one."""
    model = guarded(condition, rows_of_x)
    out, report = rewrite_model(model, target="tensorrt")
    assert any("Where(s) with a constant condition" in note for note in report.notes) == dropped
    assert ("Where" in [n.op_type for n in out.graph.node]) != dropped
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 1)).astype(np.float32)}
    if condition == "input":
        feeds["cond"] = np.array(True)
    np.testing.assert_array_equal(run_model(out, feeds)[0], run_model(model, feeds)[0])
