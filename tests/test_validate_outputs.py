"""What validation holds each output to: its shape and type as the reference's, integers exactly,
a relative error only where it means something, NaN and Inf said as such, and a weakly typed
TensorRT engine to the tolerance of the precision it may compute in."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.errors import NormfuseError
from export.validate import (Side, compare, engine_precision, least_precise, main, output_stats, result_cell,
                             result_note)
from normops import GRAPH, error_stats


def save(path, nodes, outputs, inputs=None, initializers=()):
    """x [batch, seq] (float32) -> `nodes` -> `outputs` ((name, elem, dims) each)."""
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(*o) for o in outputs],
                              initializer=list(initializers))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def ids_model(path, offset: int):
    """The ArgMax of x over its last axis, plus `offset`: token ids out."""
    return save(path, [helper.make_node("ArgMax", ["x"], ["a"], axis=-1, keepdims=0),
                       helper.make_node("Add", ["a", "offset"], ["ids"])],
                [("ids", TensorProto.INT64, ["batch"])],
                initializers=[numpy_helper.from_array(np.array(offset, np.int64), "offset")])


def pair(tmp_path, reference, candidate, shapes=((2, 4),), dtype="float32"):
    return compare(Side(reference, "ort-cpu", "reference"), Side(candidate, "ort-cpu", "fused"), list(shapes), dtype)


def test_integer_outputs_must_match_exactly(tmp_path):
    """Token ids of 50000 and 50040 are 0.08% apart, inside any float tolerance, and other tokens."""
    (result,) = pair(tmp_path, ids_model(tmp_path / "r.onnx", 50000), ids_model(tmp_path / "c.onnx", 50040))
    stats = result["outputs"]["ids"]
    assert not result["passed"] and stats["max_abs"] == 40 and (stats["atol"], stats["rtol"]) == (0.0, 0.0)
    assert stats["tolerance_used"]["max"] == 80  # in half steps: any difference fails
    (same,) = pair(tmp_path, ids_model(tmp_path / "r.onnx", 50000), ids_model(tmp_path / "s.onnx", 50000))
    assert same["passed"] and same["outputs"]["ids"]["tolerance_used"]["max"] == 0.0


def test_an_output_of_another_shape_is_a_one_line_failure(tmp_path, capsys):
    """[2, 4] and [8]: as many values, but not the same output (a reshape back left out)."""
    reference = save(tmp_path / "r.onnx", [helper.make_node("Relu", ["x"], ["y"])], [("y", TensorProto.FLOAT, None)])
    flat = save(tmp_path / "c.onnx", [helper.make_node("Relu", ["x"], ["r"]),
                                      helper.make_node("Reshape", ["r", "flat"], ["y"])],
                [("y", TensorProto.FLOAT, None)], initializers=[numpy_helper.from_array(np.array([-1], np.int64), "flat")])
    with pytest.raises(NormfuseError, match=r"c.onnx: output 'y' has shape \[8\] at 2x4, the reference's \[2, 4\]$"):
        pair(tmp_path, reference, flat)
    assert main([str(reference), str(flat), "--shapes", "2x4"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "has shape [8]" in err


def test_an_output_of_another_type_is_refused(tmp_path):
    reference = save(tmp_path / "r.onnx", [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT16)],
                     [("y", TensorProto.FLOAT16, ["batch", "seq"])])
    widened = save(tmp_path / "c.onnx", [helper.make_node("Identity", ["x"], ["y"])],
                   [("y", TensorProto.FLOAT, ["batch", "seq"])])
    with pytest.raises(NormfuseError, match="output 'y' is float32 where the reference's is float16"):
        pair(tmp_path, reference, widened, dtype="float16")


def test_a_dropout_whose_training_mode_is_an_input_is_run_off(tmp_path):
    """Random boolean feeds would switch it on, and a model would differ from itself."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"]),
              helper.make_tensor_value_info("training_mode", TensorProto.BOOL, [])]
    model = save(tmp_path / "d.onnx", [helper.make_node("Dropout", ["x", "ratio", "training_mode"], ["y"])],
                 [("y", TensorProto.FLOAT, ["batch", "seq"])], inputs=inputs,
                 initializers=[numpy_helper.from_array(np.array(0.5, np.float32), "ratio")])
    (result,) = pair(tmp_path, model, model)
    assert result["passed"] and result["outputs"]["y"]["max_abs"] == 0
    assert result["input_shapes"]["training_mode"] == []


def test_the_relative_error_is_taken_where_the_reference_is_not_near_zero():
    """Off by 1e-6 at a reference value of 1e-9 is within the absolute tolerance; a relative
    error of 1000 there would read as a failure."""
    expected = np.array([1e-9, 1.0, -2.0], np.float32)
    actual = expected + np.array([1e-6, 2e-4, 0], np.float32)
    stats = error_stats(actual, expected, GRAPH["float32"])
    assert stats["passed"] and stats["max_rel"] == pytest.approx(2e-4, rel=1e-2)
    assert error_stats(np.float32([1e-6]), np.float32([1e-9]), GRAPH["float32"])["max_rel"] == 0.0  # none sized


def test_nan_and_inf_are_said_in_the_result():
    tol = GRAPH["float32"]
    both_nan = output_stats(np.full(4, np.nan, np.float32), np.full(4, np.nan, np.float32), tol)
    assert both_nan["passed"] and result_cell(both_nan) == "pass (no finite value to compare: NaN or Inf alike on both sides)"
    one_side = output_stats(np.float32([np.nan, 1, np.inf, 2]), np.float32([0, 1, 1, 2]), tol)
    assert result_cell(one_side) == "FAIL (2 value(s) NaN or Inf on one side only)"
    ordinary = output_stats(np.float32([0, 1]), np.float32([0, 1]), tol)
    assert result_cell(ordinary) == "pass" and result_note(ordinary) == ""
    scalar = output_stats(np.float32(np.nan), np.float32(np.nan), tol)
    assert result_note(scalar).startswith("no finite value to compare")
    empty = output_stats(np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32), tol)
    assert result_cell(empty) == "pass"


def test_a_reference_all_within_atol_of_zero_is_said_in_the_result():
    """A random model whose activations die out (SAM's neck near 1e-23) passes against any output
    near 0: the result says so, and the integer outputs' exact rule has no such floor."""
    tol = GRAPH["float32"]
    faint = np.full((2, 8), 1e-23, np.float32)
    stats = output_stats(np.zeros_like(faint), faint, tol)
    assert stats["passed"] and stats["reference_within_atol"]
    assert result_cell(stats) == ("pass (every reference value is within atol (0.0001) of 0: this shows only that "
                                  "the candidate's are too)")
    assert not output_stats(np.float32([0, 1e-5, 1]), np.float32([0, 1e-5, 1]), tol)["reference_within_atol"]
    assert not output_stats(np.int64([0, 0]), np.int64([0, 0]), tol)["reference_within_atol"]
    assert not output_stats(np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32), tol)["reference_within_atol"]


def test_a_weakly_typed_engine_is_held_to_the_precision_it_may_compute_in(tmp_path):
    """A float32 graph built with --precision fp16 computes in fp16 where TensorRT likes: the
    float32 tolerance would fail a right engine. The engine's sidecar says its precision."""
    from export.files import write_json
    from export.tensorrt_engine import sidecar_path

    assert least_precise("float32", "float16") == "float16" and least_precise("bfloat16", "float16") == "bfloat16"
    assert least_precise("float32", None) == "float32"
    plan = tmp_path / "fused.plan"
    plan.write_bytes(b"engine")
    for precision, expected in (("fp16", "float16"), ("bf16", "bfloat16"), ("strongly-typed", None), ("fp32", None)):
        write_json(sidecar_path(plan), {"precision": precision})
        assert engine_precision(plan) == expected
    assert engine_precision(tmp_path / "fused.onnx") is None
