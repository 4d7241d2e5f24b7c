"""A failing pair whose fused ops are all exact says whether a choice by value went another way
(export.selection_check): a router's TopK picking another expert."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from export.norm_check import describe
from export.rewrite import rewrite_model
from export.rewrite.synth import plain_rms_constants, plain_rms_nodes
from export.selection_check import rows_that_differ
from export.validate import Side, compare

HIDDEN, EXPERTS = 8, 4


def routed_model() -> onnx.ModelProto:
    """h = RMSNorm(x); the top-2 experts of h @ router, each a row of `experts`, summed: a mixture
    of experts in miniature, its router on the norm's output."""
    rng = np.random.default_rng(0)
    nodes = plain_rms_nodes("x", "h") + [
        helper.make_node("MatMul", ["h", "router"], ["scores"], name="router_matmul"),
        helper.make_node("TopK", ["scores", "k"], ["top_scores", "top_experts"], name="router_topk", axis=-1),
        helper.make_node("Gather", ["experts", "top_experts"], ["picked"], name="pick"),
        helper.make_node("ReduceSum", ["picked", "picked_axis"], ["y"], name="combine", keepdims=0),
    ]
    constants = plain_rms_constants(HIDDEN) + [
        numpy_helper.from_array(rng.standard_normal((HIDDEN, EXPERTS)).astype(np.float32), "router"),
        numpy_helper.from_array(np.array([2], np.int64), "k"),
        numpy_helper.from_array(10 * rng.standard_normal((EXPERTS, HIDDEN)).astype(np.float32), "experts"),
        numpy_helper.from_array(np.array([-2], np.int64), "picked_axis"),
    ]
    graph = helper.make_graph(nodes, "routed", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def with_initializer(model: onnx.ModelProto, name: str, change) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    tensor = next(t for t in out.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(tensor)), name))
    return out


@pytest.fixture()
def pair_of(tmp_path):
    def save(candidate_change=None):
        reference = routed_model()
        fused, report = rewrite_model(reference, target="onnxruntime")
        assert report.fused == 1
        if candidate_change:
            fused = candidate_change(fused)
        onnx.save(reference, str(tmp_path / "reference.onnx"))
        onnx.save(fused, str(tmp_path / "fused.onnx"))
        return compare(Side(tmp_path / "reference.onnx", "ort-cpu", "reference"),
                       Side(tmp_path / "fused.onnx", "ort-cpu", "fused"), [(2, 16)], "float32")
    return save


def test_a_router_that_picks_other_experts_is_named(pair_of):
    """The candidate's router scores its first expert a little higher: some rows take it instead of
    another, their outputs are another expert's, and the pair fails. The fused norm is exact, and
    the line says which choice went another way, in how many of the 32 rows."""
    def nudge_first_expert(model):
        return with_initializer(model, "router", lambda r: r + np.array([0.3, 0, 0, 0], np.float32))

    (pair,) = pair_of(nudge_first_expert)
    assert not pair["passed"]
    check = pair["norm_check"]
    assert check["passed"] and len(check["norms"]) == 1
    (selection,) = check["selections"]["selections"]
    assert selection["node"] == "router_topk" and selection["rows"] == 32 and 0 < selection["differ"] < 32
    line = describe(check)
    assert "within one op's tolerance" in line
    assert f"TopK 'router_topk' picks other indices in {selection['differ']} of 32 rows" in line


def test_a_difference_after_the_choice_is_not_blamed_on_it(pair_of):
    """The candidate's experts differ (after the choice): the pair fails, every row picks the same
    experts, and the line says the choices do not explain it."""
    (pair,) = pair_of(lambda model: with_initializer(model, "experts", lambda e: e * 1.1))
    assert not pair["passed"]
    check = pair["norm_check"]
    assert check["selections"]["differ"] == 0
    assert "pick the same indices in both, so they do not explain it" in describe(check)


def test_a_passing_pair_runs_no_check(pair_of):
    (pair,) = pair_of()
    assert pair["passed"] and "norm_check" not in pair


def test_a_topk_row_is_the_set_it_picked():
    """The same experts in another order are the same choice; another expert is not."""
    reference = np.array([[0, 1], [2, 3], [1, 3]])
    assert rows_that_differ("TopK", reference, np.array([[1, 0], [2, 3], [1, 2]])) == (1, 3)
    assert rows_that_differ("ArgMax", np.array([[1], [2]]), np.array([[1], [3]])) == (1, 2)
    assert rows_that_differ("TopK", reference, reference[:2]) == (3, 3)  # shapes differ: every row


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
def test_a_fused_norm_off_by_an_inf_is_said_so(tmp_path):
    """x / ReduceL2(x) fused with epsilon 0 gives inf on a row too small for fp32's mean of squares,
    where the graph is finite (export/rewrite/README.md, ALIGN's embeddings): max abs, taken over
    values finite on both sides, is 0 there, so the norm check says how many values are NaN or Inf
    on one side only instead."""
    nodes = [helper.make_node("ReduceL2", ["x", "axes"], ["length"], keepdims=1),
             helper.make_node("Div", ["x", "length"], ["y"])]
    graph = helper.make_graph(nodes, "l2", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "seq", 16])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array([-1], np.int64), "axes")])
    reference = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    fused, report = rewrite_model(reference, target="onnxruntime")
    assert report.fused == 1
    onnx.save(reference, str(tmp_path / "reference.onnx"))
    onnx.save(fused, str(tmp_path / "fused.onnx"))
    x = np.random.default_rng(0).standard_normal((1, 2, 16)).astype(np.float32)
    x[0, 0] = 0
    x[0, 0, 0] = 5e-23  # its square is a subnormal; divided by 16 it rounds to 0
    (pair,) = compare(Side(tmp_path / "reference.onnx", "ort-cpu", "reference"),
                      Side(tmp_path / "fused.onnx", "ort-cpu", "fused"), [], "float32", given=[{"x": x}])
    assert not pair["passed"]
    line = describe(pair["norm_check"])
    assert line.startswith("1 of 1 fused norms are off") and "with 16 value(s) NaN or Inf on one side only at y" in line  # the whole row
