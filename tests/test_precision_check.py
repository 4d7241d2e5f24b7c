"""A failing half-precision pair whose fused ops are all right is judged again against the reference
run in float32 (export.precision_check): the half reference's own rounding is no truth to meet."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.backends import make_runner
from export.precision_check import Float32Reference, widen_graph
from export.rewrite import rewrite_model
from export.validate import Side, compare
from test_norm_check import fused_names, with_epsilon

HIDDEN = 256
NUMPY = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
ELEMENT = {"bfloat16": TensorProto.BFLOAT16, "float16": TensorProto.FLOAT16}


def amplified_norm(dtype: str = "bfloat16", scale: float = 4.0) -> onnx.ModelProto:
    """exp(scale * RMSNorm(x)), the norm spelled out in `dtype` with no casts: written so, every step
    rounds to `dtype`, and exp turns the last bits the reference loses into relative error past the
    graph tolerance, while the fused op rounds once. `scale` a power of two, so that it rounds nothing."""
    gamma = np.random.default_rng(0).uniform(0.5, 1.5, HIDDEN).astype(NUMPY[dtype])
    nodes = [helper.make_node("Pow", ["x", "two"], ["squares"]),
             helper.make_node("ReduceMean", ["squares", "axes"], ["mean_square"], keepdims=1),
             helper.make_node("Add", ["mean_square", "eps"], ["shifted"]),
             helper.make_node("Sqrt", ["shifted"], ["rms"]),
             helper.make_node("Div", ["x", "rms"], ["normed"]),
             helper.make_node("Mul", ["normed", "gamma"], ["y"]),
             helper.make_node("Mul", ["y", "scale"], ["scaled"], name="amplifier_scale"),
             helper.make_node("Exp", ["scaled"], ["out"])]
    constants = [numpy_helper.from_array(np.array(value, NUMPY[dtype]), name)
                 for name, value in (("two", 2.0), ("eps", 1e-6), ("scale", scale))]
    constants += [numpy_helper.from_array(np.array([-1], np.int64), "axes"), numpy_helper.from_array(gamma, "gamma")]
    graph = helper.make_graph(nodes, "amplified", [helper.make_tensor_value_info("x", ELEMENT[dtype], ["batch", "seq", HIDDEN])],
                              [helper.make_tensor_value_info("out", ELEMENT[dtype], ["batch", "seq", HIDDEN])], constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


@pytest.fixture
def amplified(tmp_path):
    reference, fused = tmp_path / "reference.onnx", tmp_path / "fused.onnx"
    onnx.save(amplified_norm(), str(reference))
    model, report = rewrite_model(amplified_norm(), target="tensorrt")
    assert report.counts == {"RMSNorm": 1}
    onnx.save(model, str(fused))
    return reference, fused


def test_a_fused_graph_nearer_the_float32_run_passes_against_it(amplified):
    reference, fused = amplified
    pair, = compare(Side(reference, "onnx-reference", "reference"), Side(fused, "onnx-reference", "fused"), [(2, 16)],
                    "bfloat16")
    assert pair["passed"] and pair["judged_against"] == "reference in float32@ort-cpu"
    assert not pair["against_half_reference"]["out"]["passed"]  # against the bf16 reference it fails
    check = pair["float32_check"]
    assert check["passed"] and check["candidate_nearer"]
    distances = check["outputs"]["out"]
    assert distances["candidate"]["mean_abs"] < distances["reference"]["mean_abs"] / 2
    assert pair["norm_check"]["passed"]  # the float32 opinion is asked only once every fused op is right


def test_the_validate_command_and_the_report_say_what_it_was_judged_against(amplified, capsys, tmp_path):
    from export.report import markdown
    from export.validate import main as validate_main

    reference, fused = amplified
    assert validate_main([str(reference), str(fused), "--backend", "onnx-reference", "--shapes", "2x16"]) == 0
    out = capsys.readouterr().out
    assert "PASS 2x16 out (fused@onnx-reference vs reference in float32@ort-cpu)" in out
    line = next(line for line in out.splitlines() if "against the reference run in float32" in line)
    assert "within bfloat16's tolerance of the float32 run" in line and "reference's own rounding" in line
    pairs = compare(Side(reference, "onnx-reference", "reference"), Side(fused, "onnx-reference", "fused"), [(2, 16)],
                    "bfloat16")
    report = {"config": {"norm": "rmsnorm", "preset": "tiny", "dtype": "bfloat16", "layers": 1, "hidden": HIDDEN,
                         "heads": 1, "ffn": 8, "exporter": "dynamo", "opset": 18, "batch": 2, "seq": 16},
              "rewrite": {"fused": 1, "expected_norms": 1, "counts": {}, "nodes_before": 8, "nodes_after": 3, "rejected": []},
              "validation": pairs, "bench": [], "skipped": [], "stage_seconds": {}}
    text = markdown(report)
    assert "| reference in float32@ort-cpu | fused@onnx-reference | 2x16 | out |" in text
    assert "fused@onnx-reference 2x16: against the reference run in float32" in text


def test_a_wrong_op_outside_the_norms_stays_failed(amplified, tmp_path):
    """The fused op is right, the scale after it is not (4 -> 4.25): further from the float32 run
    than the reference, and outside the tolerance of it, so the pair fails with the line saying so."""
    from export.validate import describe_float32

    reference, fused = amplified
    model = onnx.load(str(fused))
    scale = next(t for t in model.graph.initializer if t.name == "scale")
    scale.CopyFrom(numpy_helper.from_array(np.array(4.25, ml_dtypes.bfloat16), "scale"))
    onnx.save(model, str(tmp_path / "wrong.onnx"))
    pair, = compare(Side(reference, "onnx-reference", "reference"), Side(tmp_path / "wrong.onnx", "onnx-reference", "fused"),
                    [(2, 16)], "bfloat16")
    assert not pair["passed"] and pair["norm_check"]["passed"]
    assert not pair["float32_check"]["passed"] and not pair["float32_check"]["candidate_nearer"]
    assert "against_half_reference" not in pair and "judged_against" not in pair
    assert describe_float32(pair).endswith("the fused graph is further from it than the reference, and outside "
                                           "bfloat16's tolerance of it")


def test_a_wrong_fused_op_is_never_judged_against_float32(amplified, tmp_path):
    reference, fused = amplified
    broken = with_epsilon(fused, tmp_path / "broken.onnx", fused_names(fused)[0], 0.5)
    pair, = compare(Side(reference, "onnx-reference", "reference"), Side(broken, "onnx-reference", "fused"), [(2, 16)],
                    "bfloat16")
    assert not pair["passed"] and not pair["norm_check"]["passed"] and "float32_check" not in pair


def test_a_float32_pair_is_never_judged_again(rewritten, tmp_path):
    graphs = rewritten("rmsnorm")
    broken = with_epsilon(graphs["fused"], tmp_path / "broken.onnx", fused_names(graphs["fused"])[0], 1e-2)
    pairs = compare(Side(graphs["reference"], "ort-cpu", "reference"), Side(broken, "ort-cpu", "fused"), [(1, 8)],
                    "float32")
    assert not pairs[0]["passed"] and "float32_check" not in pairs[0]


def half_graph(dtype: str) -> onnx.ModelProto:
    """Every place a half type can be named: an input, an initializer, a Constant, a
    ConstantOfShape, a Cast, an If's branches and the declared values."""
    element, npd = ELEMENT[dtype], NUMPY[dtype]
    branch = lambda name, value: helper.make_graph(  # noqa: E731
        [helper.make_node("Constant", [], [f"{name}_value"], value=numpy_helper.from_array(np.array([value], npd))),
         helper.make_node("Mul", ["x", f"{name}_value"], [f"{name}_out"])], name, [],
        [helper.make_tensor_value_info(f"{name}_out", element, None)])
    nodes = [helper.make_node("Cast", ["wide"], ["narrow"], to=element),
             helper.make_node("Add", ["x", "narrow"], ["sum"]),
             helper.make_node("Constant", [], ["third"], value=numpy_helper.from_array(np.array(1 / 3, npd))),
             helper.make_node("Mul", ["sum", "third"], ["scaled"]),
             helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("ConstantOfShape", ["shape"], ["ones"], value=numpy_helper.from_array(np.array([1.0], npd))),
             helper.make_node("Add", ["scaled", "ones"], ["plus_one"]),
             helper.make_node("If", ["flag"], ["branched"], then_branch=branch("then", 3.0), else_branch=branch("else", 5.0)),
             helper.make_node("Add", ["plus_one", "branched"], ["out_half"]),
             helper.make_node("Add", ["out_half", "bias"], ["out"])]
    graph = helper.make_graph(
        nodes, "half", [helper.make_tensor_value_info("x", element, [2, 3]),
                        helper.make_tensor_value_info("wide", TensorProto.FLOAT, [2, 3]),
                        helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("out", element, [2, 3])],
        [numpy_helper.from_array(np.array([0.1, 0.2, 0.3], npd), "bias")],
        value_info=[helper.make_tensor_value_info("sum", element, [2, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_widening_leaves_no_half_type_and_computes_in_float32(dtype, tmp_path):
    model = half_graph(dtype)
    widen_graph(model.graph)
    onnx.checker.check_model(model, full_check=True)
    text = str(model)
    assert "FLOAT16" not in text and "BFLOAT16" not in text
    assert "data_type: 10" not in text and "data_type: 16" not in text and "elem_type: 10" not in text \
        and "elem_type: 16" not in text
    onnx.save(half_graph(dtype), str(tmp_path / "half.onnx"))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3)).astype(NUMPY[dtype])
    wide = rng.standard_normal((2, 3)).astype(np.float32)
    widened = Float32Reference(tmp_path / "half.onnx")
    try:
        for flag, factor in ((True, 3.0), (False, 5.0)):
            got = widened.run({"x": x, "wide": wide, "flag": np.array(flag)})["out"]
            assert got.dtype == np.float32
            # float64 arithmetic on the same (half) input and the half constants, as float32 would compute them
            third = float(np.array(1 / 3, NUMPY[dtype]).astype(np.float64))
            bias = np.array([0.1, 0.2, 0.3], NUMPY[dtype]).astype(np.float64)
            x64 = x.astype(np.float64)
            narrow = wide.astype(NUMPY[dtype]).astype(np.float64)  # the model's own Cast, widened to float32
            expected = (x64 + wide.astype(np.float64)) * third + 1 + factor * x64 + bias
            assert np.allclose(got, expected, rtol=1e-6, atol=1e-6)
            assert not np.allclose(got, (x64 + narrow) * third + 1 + factor * x64 + bias, rtol=1e-6, atol=1e-6)
    finally:
        widened.close()


def test_a_tensor_attribute_it_does_not_know_is_refused():
    model = half_graph("float16")
    model.graph.node.append(helper.make_node("Custom", [], ["c"], domain="example",
                                             payload=numpy_helper.from_array(np.array([1.0], np.float16))))
    with pytest.raises(ValueError, match="Custom.*payload tensor is not widened"):
        widen_graph(model.graph)


def test_a_float32_reference_is_run_from_its_own_folder_and_leaves_nothing(amplified, tmp_path):
    reference, _ = amplified
    before = sorted(p.name for p in reference.parent.iterdir())
    widened = Float32Reference(reference)
    x = np.random.default_rng(0).standard_normal((1, 2, HIDDEN)).astype(ml_dtypes.bfloat16)
    out = widened.run({"x": x})["out"]
    folder = widened._folder.name
    widened.close()
    runner = make_runner(reference, "onnx-reference", optimization="none")
    assert out.dtype == np.float32 and out.shape == runner.run({"x": x})["out"].shape
    assert sorted(p.name for p in reference.parent.iterdir()) == before
    import os
    assert not os.path.exists(folder)


def test_a_local_function_is_widened_too(tmp_path):
    """An exporter may leave a function in the model (onnxscript's): its casts and constants are
    widened with the graph's, so the float32 run has no fp16 step hidden inside a call."""
    from export.precision_check import widen_model

    third = numpy_helper.from_array(np.array(1 / 3, np.float16))
    function = helper.make_function(
        "local", "Narrowed", ["a"], ["b"],
        [helper.make_node("Cast", ["a"], ["a_half"], to=TensorProto.FLOAT16),
         helper.make_node("Constant", [], ["third"], value=third),
         helper.make_node("Mul", ["a_half", "third"], ["b"])],
        opset_imports=[helper.make_opsetid("", 18)])
    graph = helper.make_graph([helper.make_node("Narrowed", ["x"], ["y"], domain="local")], "calls",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [4])])
    model = helper.make_model(graph, functions=[function], ir_version=9,
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("local", 1)])
    onnx.save(model, str(tmp_path / "half.onnx"))
    widen_model(model)
    assert "FLOAT16" not in str(model) and "data_type: 10" not in str(model)
    x = np.array([1.0001, 2.0, 3.0, 1e-3], np.float32)
    widened = Float32Reference(tmp_path / "half.onnx")
    try:
        y = widened.run({"x": x})["y"]
    finally:
        widened.close()
    expected = x.astype(np.float64) * float(np.float16(1 / 3))
    assert y.dtype == np.float32 and np.allclose(y, expected, rtol=1e-6, atol=0)
    assert not np.allclose(y, x.astype(np.float16).astype(np.float64) * float(np.float16(1 / 3)), rtol=1e-6, atol=0)


def test_nan_where_the_float32_run_has_a_number_is_never_nearer():
    """A fused graph that gives NaN where the float32 run has numbers is not nearer than a reference
    with a small difference, though over the values finite on both it differs by nothing."""
    from export.precision_check import check_against_float32, describe
    from normops import GRAPH

    wide = {"y": np.array([0.387, 1.0, np.inf], np.float32)}
    expected = {"y": np.array([0.3875, 1.0, np.inf], np.float16)}
    actual = {"y": np.array([np.nan, 1.0, np.inf], np.float16)}
    check = check_against_float32(wide, expected, actual, GRAPH["float16"])
    assert check["outputs"]["y"]["candidate"] == {"max_abs": 0.0, "mean_abs": 0.0, "unlike": 1}
    assert check["outputs"]["y"]["reference"]["unlike"] == 0  # the same Inf on both sides is alike
    assert not check["candidate_nearer"] and not check["passed"]
    assert "the fused graph by max 0 (mean 0, and 1 value(s) NaN or Inf where it has another)" in describe(check, "float16")
