"""A failing validation says where the difference comes from: each fused op alone, on the values
the reference computed at its inputs (export.norm_check)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from export.norm_check import check_fused_norms, describe
from export.validate import Side, compare
from normops import GRAPH
from test_decode import merged_decoder


def with_epsilon(source, target, node_name: str, epsilon: float):
    model = onnx.load(str(source))
    node = next(n for n in model.graph.node if n.name == node_name)
    next(a for a in node.attribute if a.name == "epsilon").f = epsilon
    onnx.save(model, str(target))
    return target


def fused_names(path) -> list[str]:
    return [n.name for n in onnx.load(str(path), load_external_data=False).graph.node if n.name.startswith("normfuse_")]


@pytest.mark.parametrize("backend, target", [("ort-cpu", "fused"), ("onnx-reference", "trt")])
def test_a_wrong_fused_op_is_named_and_the_others_pass(rewritten, tmp_path, backend, target):
    """One fused op given a wrong epsilon fails the pair, and the check names it alone (the TensorRT
    target's plugin ops run in the reference evaluator with the normops references)."""
    graphs = rewritten("rmsnorm")
    names = fused_names(graphs[target])
    assert len(names) > 2
    broken = with_epsilon(graphs[target], tmp_path / "broken.onnx", names[1], 0.5)
    pairs = compare(Side(graphs["reference"], backend, "reference"), Side(broken, backend, "broken"), [(1, 8), (2, 8)],
                    "float32")
    assert not pairs[0]["passed"] and not pairs[1]["passed"]
    check = pairs[0]["norm_check"]
    assert "norm_check" not in pairs[1]  # once per candidate: the first pair that fails
    assert [n["node"] for n in check["norms"] if not n["passed"]] == [names[1]]
    assert len(check["norms"]) == len(names) and not check["not_checked"] and not check["passed"]
    assert describe(check).startswith(f"1 of {len(names)} fused norms are off on the reference's own values, beyond one op's tolerance (normops.OP): {names[1]}")
    # the line names the tensor that leaves that norm unfused when given to --exclude
    y = next(n.output[0] for n in onnx.load(str(broken)).graph.node if n.name == names[1])
    assert f"(--exclude {y} leaves that norm as written)" in describe(check)
    from export.rewrite import rewrite_file

    report = rewrite_file(graphs["reference"], tmp_path / "excluded.onnx", target="tensorrt" if target == "trt" else "onnxruntime",
                          exclude=frozenset({y}))
    assert [e["output"] for e in report.excluded] == [y] and report.fused == len(names) - 1


def test_a_passing_pair_is_not_checked(rewritten):
    graphs = rewritten("layernorm")
    pairs = compare(Side(graphs["reference"], "ort-cpu", "reference"), Side(graphs["fused"], "ort-cpu", "fused"),
                    [(1, 8)], "float32")
    assert pairs[0]["passed"] and "norm_check" not in pairs[0]


def test_each_norm_of_a_quantised_model_matches_on_the_reference_values(exported, tmp_path):
    """After ONNX Runtime's quantize_dynamic every MatMul reads int8 from DynamicQuantizeLinear; the
    fused Skip ops, run on the reference's own values, match it (their last-bit differences are what
    int8 rounding can grow downstream), and the reference file's folder is left as it was."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from export.backends import random_feeds
    from export.rewrite import rewrite_file

    folder = tmp_path / "model"
    folder.mkdir()
    quantised = folder / "quantised.onnx"
    quantize_dynamic(str(exported("rmsnorm")), str(quantised), weight_type=QuantType.QInt8)
    fused = tmp_path / "fused.onnx"
    rewrite_file(quantised, fused, target="onnxruntime")
    assert any(n.op_type == "DynamicQuantizeLinear" for n in onnx.load(str(fused)).graph.node)
    check = check_fused_norms(quantised, "ort-cpu", fused, "ort-cpu", random_feeds(quantised, 2, 8), GRAPH["float32"])
    assert check["passed"] and len(check["norms"]) == len(fused_names(fused)) > 2
    assert any(len(n["outputs"]) == 2 for n in check["norms"])  # a Skip op's sum is compared too
    assert sorted(p.name for p in folder.iterdir()) == ["quantised.onnx"]


def test_the_report_and_the_validate_command_say_which_norm_is_off(rewritten, tmp_path, capsys):
    from export.report import markdown
    from export.validate import main as validate_main

    graphs = rewritten("rmsnorm")
    name = fused_names(graphs["fused"])[0]
    broken = with_epsilon(graphs["fused"], tmp_path / "broken.onnx", name, 0.5)
    assert validate_main([str(graphs["reference"]), str(broken), "--shapes", "1x8"]) == 1
    said = [line for line in capsys.readouterr().out.splitlines() if "reference's own values" in line]
    assert len(said) == 1 and name in said[0]

    def with_second_output(source, target):  # one line per pair, not per output
        model = onnx.load(str(source))
        model.graph.output.append(onnx.helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, None))
        onnx.save(model, str(target))
        return target

    y = next(n for n in onnx.load(str(broken)).graph.node if n.name == name).output[0]  # in both models
    assert validate_main([str(with_second_output(graphs["reference"], tmp_path / "ref2.onnx")),
                          str(with_second_output(broken, tmp_path / "broken2.onnx")), "--shapes", "1x8"]) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL") + out.count("PASS") == 2 and out.count("reference's own values") == 1
    pairs = compare(Side(graphs["reference"], "ort-cpu", "reference"), Side(broken, "ort-cpu", "fused"), [(1, 8)], "float32")
    report = {"config": {"norm": "rmsnorm", "preset": "tiny", "dtype": "float32", "layers": 1, "hidden": 8, "heads": 1,
                         "ffn": 8, "exporter": "dynamo", "opset": 18, "batch": 1, "seq": 8},
              "rewrite": {"fused": 3, "expected_norms": 3, "counts": {}, "nodes_before": 1, "nodes_after": 1, "rejected": []},
              "validation": pairs, "bench": [], "skipped": [], "stage_seconds": {}}
    text = markdown(report)
    assert "fused@ort-cpu 1x8: 1 of " in text and f"(normops.OP): {name} (" in text


def test_external_weights_are_read_and_nothing_is_left_beside_them(exported, tmp_path):
    """A reference with its weights in a file of their own runs from a temporary copy beside it (so
    the weights are found) that is gone afterwards; the fused model's own external weights load."""
    from export.rewrite import rewrite_file

    folder = tmp_path / "model"
    folder.mkdir()
    reference = folder / "model.onnx"
    onnx.save(onnx.load(str(exported("layernorm"))), str(reference), save_as_external_data=True,
              location="model.onnx.data", size_threshold=256)
    fused = tmp_path / "fused" / "fused.onnx"
    fused.parent.mkdir()
    rewrite_file(reference, fused, target="onnxruntime")
    name = fused_names(fused)[0]
    broken = with_epsilon(fused, fused.parent / "broken.onnx", name, 0.5)
    before = sorted(p.name for p in folder.iterdir())
    pairs = compare(Side(reference, "ort-cpu", "reference"), Side(broken, "ort-cpu", "fused"), [(1, 8)], "float32")
    assert [n["node"] for n in pairs[0]["norm_check"]["norms"] if not n["passed"]] == [name]
    assert sorted(p.name for p in folder.iterdir()) == before == ["model.onnx", "model.onnx.data"]


def test_a_check_that_cannot_run_is_said_and_the_verdict_stands(rewritten, tmp_path, monkeypatch):
    import export.norm_check

    def cannot(*args, **kwargs):
        raise OSError("Read-only file system")

    graphs = rewritten("rmsnorm")
    broken = with_epsilon(graphs["fused"], tmp_path / "broken.onnx", fused_names(graphs["fused"])[0], 0.5)
    monkeypatch.setattr(export.norm_check, "check_fused_norms", cannot)
    pairs = compare(Side(graphs["reference"], "ort-cpu", "reference"), Side(broken, "ort-cpu", "fused"), [(1, 8)], "float32")
    assert not pairs[0]["passed"]
    assert "the check could not run (OSError: Read-only file system)" in describe(pairs[0]["norm_check"])


def test_fused_ops_in_the_branch_the_inputs_take_are_checked(exported, tmp_path):
    """In a merged model the If's branch is chosen by an input: the check takes that branch in both
    models and names the fused op that is off; the pair of the other branch passes."""
    from export.rewrite import rewrite_file

    reference = merged_decoder(exported("rmsnorm"), tmp_path / "merged.onnx")  # the If as Optimum writes it
    fused = tmp_path / "fused.onnx"
    rewrite_file(reference, fused, target="onnxruntime")
    model = onnx.load(str(fused))
    then = next(a.g for a in model.graph.node[0].attribute if a.name == "then_branch")
    names = [n.name for n in then.node if n.name.startswith("normfuse_")]
    next(a for a in next(n for n in then.node if n.name == names[1]).attribute if a.name == "epsilon").f = 0.5
    onnx.save(model, str(tmp_path / "broken.onnx"))
    pairs = compare(Side(reference, "ort-cpu", "reference"), Side(tmp_path / "broken.onnx", "ort-cpu", "fused"),
                    [(1, 8)], "float32")
    taken, other = pairs  # use_cache_branch true, then false
    assert taken["switches"] == {"use_cache_branch": True} and not taken["passed"] and other["passed"]
    check = taken["norm_check"]
    assert [n["node"] for n in check["norms"] if not n["passed"]] == [names[1]]
    assert len(check["norms"]) == len(names) and not check["not_checked"]


def test_fused_ops_in_each_branch_are_checked_alone_though_every_output_passes(exported, tmp_path):
    """A merged decoder's first step (use_cache_branch false) runs the else branch: its fused ops
    are checked on that pair's inputs, so an epsilon 10x off there fails that pair."""
    from export.rewrite import rewrite_file

    reference = merged_decoder(exported("rmsnorm"), tmp_path / "merged.onnx")
    fused = tmp_path / "fused.onnx"
    rewrite_file(reference, fused, target="onnxruntime")
    model = onnx.load(str(fused))
    branches = {a.name: a.g for a in model.graph.node[0].attribute}
    names = [n.name for n in branches["else_branch"].node if n.name.startswith("normfuse_")]
    node = next(n for n in branches["else_branch"].node if n.name == names[0])
    epsilon = next(a for a in node.attribute if a.name == "epsilon")
    epsilon.f *= 10
    onnx.save(model, str(tmp_path / "broken.onnx"))
    taken, other = compare(Side(reference, "ort-cpu", "reference"), Side(tmp_path / "broken.onnx", "ort-cpu", "fused"),
                           [(1, 8)], "float32")
    assert taken["passed"] and len(taken["op_check"]["norms"]) == len(names)
    assert other["switches"] == {"use_cache_branch": False} and not other["passed"]
    assert all(s["passed"] for s in other["outputs"].values())
    assert [n["node"] for n in other["norm_check"]["norms"] if not n["passed"]] == [names[0]]


@pytest.mark.parametrize("factor", [10, 0])
@pytest.mark.parametrize("backend, target", [("ort-cpu", "fused"), ("onnx-reference", "trt")])
def test_an_epsilon_ten_times_off_fails_though_the_outputs_are_within_the_graphs_tolerance(rewritten, tmp_path,
                                                                                         backend, target, factor):
    """On unit-scale inputs a norm's epsilon barely moves its output: the graph's tolerance lets an
    epsilon of 1e-4 for 1e-5 through, one op's tolerance (normops.OP), checked on every pair set,
    does not; an epsilon of 0 moves it by less than one op's rounding even, and fails with the
    inputs scaled to where epsilon counts. The right graph passes with the check said."""
    graphs = rewritten("rmsnorm")
    names = fused_names(graphs[target])
    epsilon = next(a.f for n in onnx.load(str(graphs[target])).graph.node if n.name == names[0]
                   for a in n.attribute if a.name == "epsilon")
    broken = with_epsilon(graphs[target], tmp_path / "broken.onnx", names[0], epsilon * factor)
    pairs = compare(Side(graphs["reference"], backend, "reference"), Side(broken, backend, "broken"), [(1, 8)],
                    "float32")
    (pair,) = pairs
    assert all(s["passed"] for s in pair["outputs"].values()) and not pair["passed"]
    (off,) = [n for n in pair["norm_check"]["norms"] if not n["passed"]]
    assert off["node"] == names[0] and not all(s["passed"] for s in off["at_epsilon_scale"].values())
    assert all(s["passed"] for s in off["outputs"].values()) is (factor == 0)  # 0 shows at epsilon's scale only
    (right,) = compare(Side(graphs["reference"], backend, "reference"), Side(graphs[target], backend, "fused"), [(1, 8)],
                       "float32")
    assert right["passed"] and right["op_check"]["passed"] and len(right["op_check"]["norms"]) == len(names)
    assert all(n["against"] == "float64" and "at_epsilon_scale" in n for n in right["op_check"]["norms"])
    assert "norm_check" not in right


def test_an_op_that_reads_one_value_twice_is_checked(tmp_path):
    """RMSNorm(x + x): the fused Skip op reads x as input and as residual; its model alone takes x once."""
    import numpy as np
    from onnx import TensorProto, helper

    from export.rewrite import rewrite_file
    from export.rewrite.synth import plain_rms_constants, plain_rms_nodes

    nodes = [helper.make_node("Add", ["x", "x"], ["s"])] + plain_rms_nodes("s", "y")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=plain_rms_constants(16))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "r.onnx"))
    report = rewrite_file(tmp_path / "r.onnx", tmp_path / "f.onnx", target="onnxruntime")
    assert report.fused == 1
    fused = onnx.load(str(tmp_path / "f.onnx"))
    (op,) = [n for n in fused.graph.node if n.name.startswith("normfuse_")]
    assert list(op.input[:2]) == ["x", "x"]
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 4, 16)).astype(np.float32)}
    check = check_fused_norms(tmp_path / "r.onnx", "ort-cpu", tmp_path / "f.onnx", "ort-cpu", feeds, GRAPH["float32"])
    assert check["passed"] and len(check["norms"]) == 1 and not check["not_checked"]


def test_a_reference_spelling_that_loses_digits_does_not_fail_the_fused_op(tmp_path):
    """E[x^2] - E[x]^2 is a LayerNorm's variance in exact arithmetic; in fp32, on rows whose mean
    (30) is large beside their spread, it loses digits the fused op keeps. Each op is judged
    against the reference's own nodes run in float64, which that spelling means, not against its
    fp32 values: the right op passes, and a wrong epsilon there still fails."""
    import numpy as np

    from export.rewrite import rewrite_file
    from export.rewrite.synth import NormSpec, build

    onnx.save(build(NormSpec(kind="layer", variance="moments", hidden=512)), str(tmp_path / "r.onnx"))
    assert rewrite_file(tmp_path / "r.onnx", tmp_path / "f.onnx", target="onnxruntime").fused == 1
    (x,) = [i for i in onnx.load(str(tmp_path / "r.onnx")).graph.input]
    shape = [d.dim_value or 2 for d in x.type.tensor_type.shape.dim]
    given = [{x.name: (30 + np.random.default_rng(0).standard_normal(shape)).astype(np.float32)}]
    (pair,) = compare(Side(tmp_path / "r.onnx", "ort-cpu", "reference"), Side(tmp_path / "f.onnx", "ort-cpu", "fused"),
                      [], "float32", given=given)
    assert pair["passed"], pair
    (norm,) = pair["op_check"]["norms"]
    assert norm["against"] == "float64" and norm["passed"]
    (name,) = fused_names(tmp_path / "f.onnx")
    epsilon = next(a.f for n in onnx.load(str(tmp_path / "f.onnx")).graph.node if n.name == name
                   for a in n.attribute if a.name == "epsilon")
    broken = with_epsilon(tmp_path / "f.onnx", tmp_path / "broken.onnx", name, epsilon * 10)
    (pair,) = compare(Side(tmp_path / "r.onnx", "ort-cpu", "reference"), Side(broken, "ort-cpu", "fused"),
                      [], "float32", given=[{x.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}])
    assert not pair["passed"] and not pair["norm_check"]["passed"]


def test_inputs_are_scaled_to_where_epsilon_counts_by_a_power_of_two():
    import numpy as np

    from export.norm_check import at_epsilon_scale

    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float16)
    ids = np.arange(4, dtype=np.int64)
    scaled = at_epsilon_scale({"x": x, "residual": x, "ids": ids}, 1e-5)
    ratio = scaled["x"].astype(np.float64) / np.where(x == 0, 1, x).astype(np.float64)
    factor = float(ratio.flat[0])
    assert scaled["x"].dtype == np.float16 and np.log2(factor) == round(np.log2(factor))  # exact in every dtype
    assert 0.5e-5 < float(np.mean(scaled["x"].astype(np.float64) ** 2)) < 2e-5
    assert np.array_equal(scaled["residual"], scaled["x"]) and np.array_equal(scaled["ids"], ids)
    for odd in (np.zeros((2, 8), np.float32), np.full((2, 8), np.inf, np.float32)):  # left as they are
        assert np.array_equal(at_epsilon_scale({"x": odd}, 1e-5)["x"], odd)


@pytest.mark.parametrize("epsilon", [None, 10.0])
def test_a_skip_op_wrapped_in_reshapes_is_checked_with_them(tmp_path, epsilon):
    """ONNX Runtime's Skip ops take rank 2 or 3, so at rank 4 (SAM's [batch, height, width,
    channels]) the rewrite puts Reshapes to rows and back around the op: the op is checked together
    with them, from and to values the reference holds (it went unchecked), and a wrong epsilon in it
    is found."""
    from export.rewrite import rewrite_file
    from export.rewrite.synth import NormSpec, build

    reference = tmp_path / "reference.onnx"
    onnx.save(build(NormSpec(kind="layer", residual="private"), leading=(1, 4, 4)), str(reference))
    fused = tmp_path / "fused.onnx"
    rewrite_file(reference, fused, target="onnxruntime")
    ops = [n.op_type for n in onnx.load(str(fused)).graph.node]
    assert "SkipLayerNormalization" in ops and ops.count("Reshape") >= 3
    if epsilon is not None:
        fused = with_epsilon(fused, tmp_path / "broken.onnx", fused_names(fused)[0], epsilon)
    pairs = compare(Side(reference, "ort-cpu", "reference"), Side(fused, "ort-cpu", "fused"), [(1, 8)], "float32")
    check = pairs[0].get("op_check") or pairs[0]["norm_check"]
    assert not check["not_checked"] and len(check["norms"]) == 1 and check["norms"][0]["against"] == "float64"
    assert check["passed"] is (epsilon is None) and pairs[0]["passed"] is (epsilon is None)


def test_an_op_reading_a_computed_shape_is_judged_against_float64(tmp_path):
    """OPT reshapes its residual sum between the Add and the norm by a shape it computes: the fused
    op's unit reads that int64 shape, which the float64 cut keeps as int64 (made float64, the
    Reshape refused it and the op was judged against the reference's values instead)."""
    from onnx import TensorProto, helper, numpy_helper

    from export.rewrite import rewrite_file

    f32 = TensorProto.FLOAT
    nodes = [helper.make_node("Add", ["x", "r"], ["s"]), helper.make_node("Shape", ["x"], ["rows_shape"]),
             helper.make_node("Reshape", ["s", "rows_shape"], ["h"]),
             helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5)]
    inits = [numpy_helper.from_array(np.linspace(0.5, 1.5, 16).astype(np.float32), "gamma"),
             numpy_helper.from_array(np.linspace(-0.5, 0.5, 16).astype(np.float32), "beta")]
    graph = helper.make_graph(nodes, "opt", [helper.make_tensor_value_info(n, f32, ["batch", "seq", 16]) for n in "xr"],
                              [helper.make_tensor_value_info("y", f32, None)], inits)
    reference = tmp_path / "reference.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(reference))
    fused = tmp_path / "fused.onnx"
    assert rewrite_file(reference, fused, target="onnxruntime").fused == 1
    pairs = compare(Side(reference, "ort-cpu", "reference"), Side(fused, "ort-cpu", "fused"), [(2, 8)], "float32")
    check = pairs[0]["op_check"]
    assert pairs[0]["passed"] and [n["against"] for n in check["norms"]] == ["float64"]
