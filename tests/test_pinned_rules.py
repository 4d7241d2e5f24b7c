"""Rules that a mutation of the code left every other test passing: each test here fails when its
rule is broken (a check loosened, a dtype kept, a run of the proof dropped)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.rewrite import rewrite_model
from export.rewrite.evaluate import run_model
from export.rewrite.synth import NormSpec, build, random_feeds

HALF = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


def rms_model(x_type, hidden: int, leading=(2, 3), *, input_cast=None, output_cast=None, fraction=None):
    """y = x / sqrt(mean(x^2) + 1e-5), x of `x_type`; `input_cast` casts x first (the norm then works
    in that type), `output_cast` casts y last, `fraction` writes the mean as ReduceSum times it."""
    n = helper.make_node
    work = input_cast or x_type
    d = HALF[work]
    inits = [numpy_helper.from_array(np.array(2.0, d), "two"), numpy_helper.from_array(np.array(1e-5, d), "eps"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes")]
    nodes, x = [], "x"
    if input_cast:
        nodes.append(n("Cast", ["x"], ["x_cast"], to=input_cast))
        x = "x_cast"
    nodes.append(n("Pow", [x, "two"], ["squares"]))
    if fraction is None:
        nodes.append(n("ReduceMean", ["squares", "axes"], ["mean_square"]))
    else:
        inits.append(numpy_helper.from_array(np.array(fraction, d), "fraction"))
        nodes += [n("ReduceSum", ["squares", "axes"], ["total"]), n("Mul", ["total", "fraction"], ["mean_square"])]
    nodes += [n("Add", ["mean_square", "eps"], ["var"]), n("Sqrt", ["var"], ["root"]),
              n("Reciprocal", ["root"], ["inverse"]), n("Mul", [x, "inverse"], ["y" if not output_cast else "normed"])]
    if output_cast:
        nodes.append(n("Cast", ["normed"], ["y"], to=output_cast))
    shape = [*leading, hidden]
    graph = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", x_type, shape)],
                              [helper.make_tensor_value_info("y", output_cast or work, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_a_norm_of_a_narrowed_input_keeps_the_narrowing_cast_outside():
    """x fp32 cast to fp16, normalised in fp16: the Cast is the model's own rounding (and overflow,
    at 1e5), so the fused op reads its output, and NaN stands where the graph has it."""
    model = rms_model(TensorProto.FLOAT, 16, input_cast=TensorProto.FLOAT16, output_cast=TensorProto.FLOAT)
    out, report = rewrite_model(model, target="tensorrt")
    assert report.fused == 1 and [n.op_type for n in out.graph.node] == ["Cast", "RMSNorm", "Cast"]
    feeds = {"x": np.full((2, 3, 16), 1e5, np.float32)}
    np.testing.assert_array_equal(np.isnan(run_model(out, feeds)[0]), np.isnan(run_model(model, feeds)[0]))


@pytest.mark.parametrize("x_type,hidden", [(TensorProto.FLOAT, 4096), (TensorProto.FLOAT16, 16)])
def test_a_sum_divided_by_one_more_than_the_row_length_is_no_mean(x_type, hidden):
    """sum * 1/(n+1): at hidden 4096 in fp32 the result is within the graph's tolerance of a mean's,
    and a half type's 1/n is rounded: the checks, not the proof, must refuse it."""
    _, report = rewrite_model(rms_model(x_type, hidden, fraction=1.0 / (hidden + 1)), target="tensorrt")
    assert report.fused == 0 and any(f"not by 1 / {hidden}" in r.reason for r in report.rejected)


def test_a_bfloat16_sum_times_a_wrong_fraction_is_refused():
    _, report = rewrite_model(build(NormSpec(kind="rms", dtype="bfloat16", mean="sum_fraction",
                                             mutation="wrong_fraction", hidden=16)), target="tensorrt")
    assert report.fused == 0 and any("not by 1 / 16" in r.reason for r in report.rejected)


def test_an_fp16_variance_averaged_in_bfloat16_is_narrowed():
    """bf16 holds fewer digits than fp16: averaging fp16 squares in bf16 narrows them."""
    _, report = rewrite_model(build(NormSpec(kind="layer", dtype="float16", mutation="variance_in_half")),
                              target="tensorrt")
    assert report.fused == 0 and any("narrows float16 to bfloat16" in r.reason for r in report.rejected)


def test_an_fp16_norm_with_an_fp32_output_keeps_its_output_type_on_onnx_runtime():
    """The Cast after the fused op gives y the norm's own output type (fp32 here), not the op's."""
    import onnxruntime as ort

    model = rms_model(TensorProto.FLOAT16, 16, output_cast=TensorProto.FLOAT)
    out, report = rewrite_model(model, target="onnxruntime")
    assert report.fused == 1
    feeds = random_feeds(model)
    y = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert y.dtype == np.float32


def test_the_proof_refuses_a_candidate_whose_epsilon_was_misread(monkeypatch):
    """The proof's run at a small input scale is where epsilon shows: a candidate carrying twice the
    graph's epsilon must fail it (at unit scale the two agree within tolerance)."""
    from export.rewrite import rewriter

    read = rewriter.build_candidate

    def doubled(*args, **kwargs):
        candidate = read(*args, **kwargs)
        candidate.epsilon *= 2
        return candidate

    monkeypatch.setattr(rewriter, "build_candidate", doubled)
    _, report = rewrite_model(build(NormSpec(kind="rms", epsilon=1e-5)), target="tensorrt")
    assert report.fused == 0
    assert any(r.reason.startswith("numerical proof failed at input scale 0.01") for r in report.rejected)


def test_one_fp16_ops_tolerance_is_about_its_rounding():
    """normops.OP for fp16 takes the op's one rounding (2^-11 relative) with room, not 5e-3 off."""
    from normops import OP

    e = np.linspace(0.5, 2, 101)
    assert OP["float16"].passes(e * (1 + 2 ** -11), e) and not OP["float16"].passes(e * (1 + 5e-3), e)


def test_the_references_compute_in_float64_whatever_they_are_given():
    """fp16 rows of 300: their squares overflow fp16, not the float64 references."""
    from normops.reference import layer_norm, rms_norm

    y = rms_norm(np.full((1, 8), 300, np.float16), np.ones(8, np.float16))
    assert y.dtype == np.float64 and np.allclose(y, 1.0)
    assert np.allclose(np.abs(layer_norm(np.array([[300, -300] * 4], np.float16), np.ones(8, np.float16))), 1.0,
                       rtol=1e-4)


def test_the_float64_cut_of_an_fp16_norm_holds_no_half_type():
    from pathlib import Path

    from export.norm_truth import cut_in_float64, run_in_float64

    model = onnx.shape_inference.infer_shapes(build(NormSpec(kind="layer", dtype="float16", casts="llama", hidden=64)))
    y = model.graph.output[0].name
    cut = cut_in_float64(model.graph, Path("."), ["x"], [y], model.opset_import, model.ir_version)
    assert {a.i for n in cut.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"} <= \
        {TensorProto.DOUBLE}
    assert {t.data_type for t in cut.graph.initializer} <= {TensorProto.DOUBLE, TensorProto.INT64}
    (values,) = run_in_float64(cut, [{"x": np.random.default_rng(0).standard_normal((2, 5, 64))}])
    assert values[y].dtype == np.float64


def test_a_scale_of_more_than_one_row_is_not_one_value_per_feature():
    import onnx_graphsurgeon as gs

    from export.rewrite.checks import Rejected, _per_feature

    with pytest.raises(Rejected, match="not one value per feature"):
        _per_feature(gs.Constant("w", np.ones((2, 16), np.float32)), 16, 2, "scale")


def test_an_inverse_root_written_with_exponent_one_half_is_refused_for_it():
    model = rms_model(TensorProto.FLOAT, 16)
    graph = model.graph
    nodes = [n for n in graph.node if n.op_type not in ("Sqrt", "Reciprocal")]
    nodes.insert(len(nodes) - 1, helper.make_node("Pow", ["var", "half"], ["inverse"]))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), "half"))
    _, report = rewrite_model(model, target="tensorrt")
    assert report.fused == 0 and any("exponent is 0.5" in r.reason for r in report.rejected)
