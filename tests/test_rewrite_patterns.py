"""Every norm spelling the rewriter knows is fused, on every target, and the result computes the same.

Graphs come from export.rewrite.synth (onnx.helper, no torch); rewritten graphs run on onnx's
reference evaluator with the fused ops evaluated by the normops references.
"""
from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import onnx
import pytest

from export.rewrite import TARGETS, rewrite_model
from export.rewrite.evaluate import run_model
from export.rewrite.synth import CASTS, INVERSES, SCALES, SQUARES, VARIANCES, NormSpec, build, random_feeds
from normops import GRAPH


def assert_same(original, rewritten, dtype):
    feeds = random_feeds(original, seed=1)
    expected, actual = run_model(original, feeds), run_model(rewritten, feeds)
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert GRAPH[dtype].passes(a, e), float(np.max(np.abs(a.astype(np.float64) - e.astype(np.float64))))


def fused_ops(model):
    return [n.op_type for n in model.graph.node]


STRUCTURE = [NormSpec(kind=k, square=s, inverse=i, scale=c, bias=b)
             for k, s, i, c in itertools.product(("rms", "layer"), SQUARES, INVERSES, SCALES)
             for b in ((False, True) if k == "layer" else (False,))]


@pytest.mark.parametrize("spec", STRUCTURE, ids=NormSpec.describe)
def test_every_structural_spelling_fuses_to_one_op(spec):
    model = build(spec)
    out, report = rewrite_model(model, target="tensorrt")
    assert report.fused == 1, [r.reason for r in report.rejected]
    expected = "LayerNorm" if spec.kind == "layer" else "RMSNorm"
    assert fused_ops(out) == [expected]
    assert report.fusions[0].kind == expected and report.fusions[0].epsilon == pytest.approx(spec.epsilon, rel=1e-6)
    assert not any("add no epsilon" in note for note in report.notes)
    assert_same(model, out, spec.dtype)


# LayerNorm's variance in each spelling (Flax's E[x^2] - E[x]^2, jax2onnx's float64 mean), with and
# without jax2onnx's constant-row guard, and epsilon as Flax's CastLike(eps, x)
VARIANCE_SPELLINGS = [NormSpec(kind="layer", dtype=d, casts="llama" if d != "float32" else "none", variance=v, guard=g,
                               epsilon_castlike=c, square=sq)
                      for d, v, g, c, sq in itertools.product(("float32", "bfloat16"), VARIANCES, (False, True),
                                                              (False, True), SQUARES)]


@pytest.mark.parametrize("spec", VARIANCE_SPELLINGS, ids=NormSpec.describe)
def test_every_variance_spelling_fuses_to_one_op(spec):
    model = build(spec)
    out, report = rewrite_model(model, target="tensorrt")
    assert report.fused == 1, [r.reason for r in report.rejected]
    assert fused_ops(out) == ["LayerNorm"]
    assert report.fusions[0].epsilon == pytest.approx(spec.epsilon, rel=1e-6)
    assert_same(model, out, spec.dtype)


# No Add of epsilon at all: torch's exporter, with its optimiser on (the default), removes `+ eps` for
# an eps of 1e-8 or less as an Add of zero (Helium's RMSNorm; hand-written BERT LayerNorms, 1e-12)
EPSILON_DROPPED = [NormSpec(kind=k, dtype=d, casts="llama" if d != "float32" else "none", inverse=i, scale=c,
                            variance=v, epsilon_dropped=True,
                            bias=not (c == "inverse" and d != "float32"))  # synth adds that bias after the cast back
                   for k, d, i, c, v in itertools.product(("rms", "layer"), ("float32", "float16"), INVERSES,
                                                          ("right", "inverse"), ("centred", "moments"))
                   if not (k == "rms" and v != "centred")]


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # the row of zeros: 0 / 0, on purpose
@pytest.mark.parametrize("spec", EPSILON_DROPPED, ids=NormSpec.describe)
def test_a_norm_without_epsilon_fuses_with_epsilon_zero(spec):
    model = build(spec)
    adds = [sum(n.op_type == "Add" for n in m.graph.node) for m in (model, build(replace(spec, epsilon_dropped=False)))]
    assert adds[0] == adds[1] - 1
    out, report = rewrite_model(model, target="tensorrt")
    assert report.fused == 1, [r.reason for r in report.rejected]
    assert fused_ops(out) == ["LayerNorm" if spec.kind == "layer" else "RMSNorm"]
    assert report.fusions[0].epsilon == 0.0
    assert sum("add no epsilon" in note for note in report.notes) == 1
    assert_same(model, out, spec.dtype)
    # a row of zeros is 0 / 0 in the graph as written, and NaN in the fused op too
    feeds = random_feeds(model, seed=1)
    name = model.graph.input[0].name
    feeds[name][..., 0, :] = 0
    expected, actual = run_model(model, feeds)[0], run_model(out, feeds)[0]
    assert np.isnan(expected[..., 0, :]).all() and np.isnan(actual[..., 0, :]).all()
    assert GRAPH[spec.dtype].passes(actual, expected)


# L2 norms, x / sqrt(sum(x^2) + eps) (or x / ReduceL2(x), no epsilon), in every inverse, scale, dtype and
# target: each is the RMSNorm with epsilon eps / n and its scale / sqrt(n)
L2_SPELLINGS = [NormSpec(kind="rms", statistic=st, dtype=d, casts="llama" if d != "float32" else "none", inverse=i,
                         scale=c, residual=r, hidden=48)
                for st, d, i, c, r in itertools.product(("row_sum", "reduce_l2"), ("float32", "float16"), INVERSES,
                                                        ("none", "right", "gemma"), ("none", "exposed"))
                if not (st == "reduce_l2" and i not in ("div", "sqrt_reciprocal"))]


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # the row of zeros below: 0 / 0 without epsilon
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("spec", L2_SPELLINGS, ids=NormSpec.describe)
def test_an_l2_norm_fuses_as_the_rmsnorm_it_equals(spec, target):
    model = build(spec)
    out, report = rewrite_model(model, target=target)
    assert report.fused == 1, [r.reason for r in report.rejected]
    (fusion,) = report.fusions
    assert fusion.kind == ("AddRMSNorm" if spec.residual != "none" and target != "onnx" else "RMSNorm")
    assert fusion.pattern.startswith("l2norm")
    want = 0.0 if spec.statistic == "reduce_l2" else spec.epsilon / spec.hidden
    assert fusion.epsilon == pytest.approx(want, rel=1e-6)
    assert sum("L2 norm(s)" in note for note in report.notes) == 1
    # ReduceL2 has no epsilon that an exporter could have dropped: no advice about torch's optimiser
    assert any("add no epsilon" in note for note in report.notes) == spec.epsilon_dropped
    assert not [n for n in out.graph.node if n.op_type in ("ReduceSum", "ReduceL2", "Sqrt")]
    assert_same(model, out, spec.dtype)
    # small rows, where epsilon is most of the sum: its place is checked too
    feeds = random_feeds(model, seed=2)
    feeds = {k: (v * 1e-3).astype(v.dtype) for k, v in feeds.items()}
    for e, a in zip(run_model(model, feeds), run_model(out, feeds)):
        assert GRAPH[spec.dtype].passes(a, e)


def test_an_l2_norms_scale_not_in_memory_is_multiplied_in_the_graph():
    """A scale the rewrite may not read (a graph input here; external weights alike) gets a Mul by
    1 / sqrt(n) in front of the fused op, which TensorRT and ONNX Runtime fold when they build."""
    model = build(NormSpec(kind="rms", statistic="row_sum", scale="right", hidden=16))
    gamma = next(n for n in model.graph.node if n.op_type == "Mul" and n.output[0] == model.graph.output[0].name)
    weight = next(t for t in model.graph.initializer if t.name in gamma.input)
    model.graph.initializer.remove(weight)
    model.graph.input.append(onnx.helper.make_tensor_value_info(weight.name, onnx.TensorProto.FLOAT, [16]))
    out, report = rewrite_model(model)
    assert fused_ops(out) == ["Mul", "RMSNorm"]
    factor = next(onnx.numpy_helper.to_array(t) for t in out.graph.initializer if t.name in out.graph.node[0].input)
    assert float(factor) == pytest.approx(0.25)
    assert_same(model, out, "float32")


def _rows_model(nodes) -> onnx.ModelProto:
    """`nodes` from x [2, 16] to y, with the constants `axes` ([-1]) and `eps` (1e-6) to read."""
    graph = onnx.helper.make_graph(nodes, "rows", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 16])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 16])],
                                   [onnx.numpy_helper.from_array(np.array([-1], np.int64), "axes"),
                                    onnx.numpy_helper.from_array(np.array(1e-6, np.float32), "eps")])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])


def test_an_l2_norm_with_epsilon_outside_the_root_is_no_rmsnorm():
    """x / (||x|| + eps) and F.normalize's x / max(||x||, eps): left as written."""
    for outside in ("Add", "Max"):
        out, report = rewrite_model(_rows_model([onnx.helper.make_node("ReduceL2", ["x", "axes"], ["length"], keepdims=1),
                                                 onnx.helper.make_node(outside, ["length", "eps"], ["guarded"]),
                                                 onnx.helper.make_node("Div", ["x", "guarded"], ["y"])]))
        assert report.fused == 0 and fused_ops(out) == ["ReduceL2", outside, "Div"]


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
def test_an_l2_norm_without_epsilon_parts_from_the_graph_on_rows_too_small_for_fp32():
    """x / ReduceL2(x) is fused as the RMSNorm with epsilon 0, whose mean of squares underflows to 0
    (and gives inf) on a row whose root mean square is below about 3e-23, where the graph's sum of
    squares is still a nonzero subnormal and its result finite, though inexact: the difference
    export/rewrite/README.md states, which ALIGN's image embeddings meet at random init. Ordinary
    rows agree."""
    import onnxruntime as ort

    model = _rows_model([onnx.helper.make_node("ReduceL2", ["x", "axes"], ["length"], keepdims=1),
                         onnx.helper.make_node("Div", ["x", "length"], ["y"])])
    out, report = rewrite_model(model, target="onnxruntime")
    assert report.fused == 1
    x = np.zeros((2, 16), np.float32)
    x[0, 0] = 5e-23  # its square is a subnormal; divided by 16 it rounds to 0
    x[1] = np.random.default_rng(0).standard_normal(16)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    expected, actual = run(model), run(out)
    assert np.isfinite(expected).all() and 0.5 < expected[0, 0] < 1.5  # 1 in exact arithmetic
    assert np.isinf(actual[0, 0])
    np.testing.assert_allclose(actual[1], expected[1], rtol=1e-5)


@pytest.mark.parametrize("guard", ("Clip", "Max"))
def test_a_mean_square_clamped_at_epsilon_is_no_rmsnorm(guard):
    """x / sqrt(max(mean(x^2), eps)), as Gemma3n's AltUp scales magnitudes with torch.clamp: equal to
    an RMSNorm without epsilon only where the mean square passes eps, so it is left as written."""
    nodes = [onnx.helper.make_node("Mul", ["x", "x"], ["square"]),
             onnx.helper.make_node("ReduceMean", ["square", "axes"], ["mean"], keepdims=1),
             onnx.helper.make_node(guard, ["mean", "eps"], ["guarded"]),
             onnx.helper.make_node("Sqrt", ["guarded"], ["root"]),
             onnx.helper.make_node("Div", ["x", "root"], ["y"])]
    out, report = rewrite_model(_rows_model(nodes))
    assert report.fused == 0 and fused_ops(out) == ["Mul", "ReduceMean", guard, "Sqrt", "Div"]


def test_a_half_precision_row_fraction_is_proven_as_the_mean_it_stands_for():
    """sum * (1/3) in fp16 holds 1/3 as 0.33325; E[x^2] - E[x]^2 on rows of 3 amplified that rounding
    past the proof's fp32 tolerance, and this LayerNorm was refused (found by the property tests)."""
    spec = NormSpec(kind="layer", dtype="float16", scale="none", bias=False, axes_input=False, epsilon=1e-12,
                    mean="sum_fraction", variance="moments", hidden=3)
    model = build(spec)
    out, report = rewrite_model(model, target="tensorrt")
    assert report.fused == 1, [r.reason for r in report.rejected]
    assert_same(model, out, spec.dtype)


@pytest.mark.parametrize("casts", ("none", "llama"))
def test_a_row_fraction_in_float64_stays_in_float64_in_the_proof(casts):
    """A half-type LayerNorm whose variance is averaged in float64 as sum * 0.5: the proof widened
    that fraction to float32 as if it were the half type's, its Mul then read two types, and the
    norm was refused ('could not be checked'); with the model's casts to float32 around it, only the
    inside was fused, and a second rewrite fused again (found by the property tests)."""
    spec = NormSpec(kind="layer", dtype="float16", inverse="sqrt_reciprocal", casts=casts, scale="none", bias=False,
                    axes_input=False, epsilon=1e-12, mean="sum_fraction", variance="float64", hidden=2)
    model = build(spec)
    for target in ("tensorrt", "onnxruntime"):
        out, report = rewrite_model(model, target=target)
        assert report.fused == 1 and len(out.graph.node) == 1, [r.reason for r in report.rejected]
        assert_same(model, out, spec.dtype)
        assert rewrite_model(out, target=target)[1].fused == 0


@pytest.mark.parametrize("variance", ("moments", "moments_clamped"))
def test_moments_variance_swapped_is_not_a_norm(variance):
    """E[x]^2 - E[x^2] is minus the variance: nothing may fuse as a LayerNorm."""
    model = build(NormSpec(kind="layer", variance=variance))
    sub = next(n for n in model.graph.node if n.op_type == "Sub" and not any(i == "x" for i in n.input))
    sub.input[:] = list(sub.input)[::-1]
    out, report = rewrite_model(model)
    assert all(f.kind != "LayerNorm" for f in report.fusions)
    assert "LayerNorm" not in fused_ops(out)


def test_fast_variance_is_computed_the_sound_way_when_the_moments_cancel():
    """Where E[x^2] - E[x]^2 cancels (a large mean, a small spread) the graph as written loses the
    variance in float32; the fused op keeps it, so it is closer to the float64 truth than the graph."""
    from export.rewrite.evaluate import reference_norm

    model = build(NormSpec(kind="layer", variance="moments_clamped", scale="none", bias=False, epsilon=1e-6, hidden=64))
    out, report = rewrite_model(model)
    assert report.fused == 1
    rng = np.random.default_rng(0)
    x = (1000.0 + 0.01 * rng.standard_normal((2, 5, 64))).astype(np.float32)
    truth = reference_norm(True, x, epsilon=1e-6)[0]
    as_written, fused = run_model(model, {"x": x})[0], run_model(out, {"x": x})[0]
    assert np.max(np.abs(fused - truth)) < 1e-2 < np.max(np.abs(as_written - truth))


# tf2onnx's spellings: the mean as GlobalAveragePool (rank 3), Keras' RMSNorm with gamma on the inverse root
TF_SPELLINGS = ([NormSpec(kind=k, mean="global_pool", inverse=i, dtype=d, casts="llama" if d != "float32" else "none")
                 for k, i, d in itertools.product(("rms", "layer"), INVERSES, ("float32", "float16"))]
                + [NormSpec(kind="rms", scale="inverse", inverse=i, mean=m, dtype=d, casts=c)
                   for i, m, (d, c) in itertools.product(INVERSES, ("reduce", "global_pool"),
                                                         (("float32", "none"), ("bfloat16", "scale_then_cast")))])


@pytest.mark.parametrize("spec", TF_SPELLINGS, ids=NormSpec.describe)
def test_tf2onnx_spellings_fuse_to_one_op(spec):
    model = build(spec)
    out, report = rewrite_model(model, target="tensorrt")
    assert report.fused == 1, [r.reason for r in report.rejected]
    assert fused_ops(out) == ["LayerNorm" if spec.kind == "layer" else "RMSNorm"]
    assert_same(model, out, spec.dtype)


def _insert_after(model, tensor: str, op: str, *constants) -> None:
    """Put `op(tensor, *constants)` between `tensor` and its consumers (as paddle2onnx writes them)."""
    out = f"{tensor}_{op.lower()}"
    for node in model.graph.node:
        node.input[:] = [out if i == tensor else i for i in node.input]
    names = []
    for k, value in enumerate(constants):
        names.append(f"{out}_c{k}")
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value, np.float32), names[-1]))
    after = next(i for i, n in enumerate(model.graph.node) if tensor in n.output) + 1
    model.graph.node.insert(after, onnx.helper.make_node(op, [tensor, *names], [out]))


@pytest.mark.parametrize("kind", ("rms", "layer"))
def test_identity_nodes_and_products_with_one_are_seen_through(kind):
    """paddle2onnx: an Identity after the residual Add and Mul(var, 1) before epsilon's Add."""
    model = build(NormSpec(kind=kind, residual="exposed"))
    add = next(n for n in model.graph.node if n.op_type == "Add" and set(n.input) == {"x", "r"})
    _insert_after(model, add.output[0], "Identity")
    eps_add = next(n for n in model.graph.node if n.op_type == "Add" and n.input[1].startswith("c_"))
    _insert_after(model, eps_add.input[0], "Mul", np.ones((1,)))
    out, report = rewrite_model(model)
    assert report.fused == 1 and report.fusions[0].residual, [r.reason for r in report.rejected]
    assert "bypassed 1 Identity node(s), 1 Mul(s) by 1" in report.notes
    assert_same(model, out, "float32")


def test_a_product_with_one_that_broadcasts_is_not_seen_through():
    """Mul(var, ones[1, 1, 1]) on a rank-2 variance changes its shape: not an identity, and no norm."""
    model = build(NormSpec(kind="rms"), leading=(5,))
    eps_add = next(n for n in model.graph.node if n.op_type == "Add" and n.input[1].startswith("c_"))
    _insert_after(model, eps_add.input[0], "Mul", np.ones((1, 1, 1)))
    out, report = rewrite_model(model)
    assert report.fused == 0 and not any("Mul(s) by 1" in n for n in report.notes)


def test_a_gamma_with_leading_ones_in_memory_is_reshaped_without_a_node():
    """tf2onnx stores Keras' gamma and beta as [1, 1, hidden]: the fused op gets [hidden] constants, no Reshape."""
    model = build(NormSpec(kind="layer"))
    for init in model.graph.initializer:
        if list(init.dims) == [16]:
            init.dims[:] = [1, 1, 16]
    out, report = rewrite_model(model)
    assert report.fused == 1 and fused_ops(out) == ["LayerNorm"]
    assert all(list(i.dims) == [16] for i in out.graph.initializer if i.name in out.graph.node[0].input[1:])
    assert_same(model, out, "float32")


HALF = [NormSpec(kind=k, dtype=d, casts=c, scale=s, square=sq, inverse=inv)
        for k, d, c, s, (sq, inv) in itertools.product(("rms", "layer"), ("float16", "bfloat16"), CASTS,
                                                       ("none", "right", "left", "gemma", "cast_w"),
                                                       (("pow", "sqrt_reciprocal"), ("mul", "div")))]


@pytest.mark.parametrize("spec", HALF, ids=NormSpec.describe)
def test_half_precision_with_casts_anywhere(spec):
    model = build(spec)
    out, report = rewrite_model(model, target="tensorrt")
    assert report.fused == 1, [r.reason for r in report.rejected]
    assert "Cast" not in fused_ops(out) or spec.casts == "none"
    assert_same(model, out, spec.dtype)


# (dtype, epsilon, dropped): fused where epsilon bounds the factor within the half type's normal range
ROUNDED_FACTORS = [("float16", 1e-6, False, True), ("bfloat16", 1e-6, False, True), ("bfloat16", 1e-12, False, True),
                   ("float16", 1e-12, False, False), ("float16", 1e-6, True, False), ("bfloat16", 1e-6, True, False)]


@pytest.mark.parametrize("kind", ("rms", "layer"))
@pytest.mark.parametrize("inverse", ("sqrt_reciprocal", "div"))
@pytest.mark.parametrize("dtype,epsilon,dropped,fused", ROUNDED_FACTORS)
def test_a_factor_cast_back_is_fused_while_epsilon_keeps_it_a_rounding(kind, inverse, dtype, epsilon, dropped, fused):
    """DeepSeek V4's `x * rsqrt(mean(x.float()^2) + eps).to(x.dtype)`: the inverse root (or the root x
    is divided by) cast back to x's type. Its eps 1e-6 bounds the inverse root by 1000; fp16's
    largest value 65504 needs eps >= 2.3e-10, its smallest normal a root eps >= 3.7e-9, and with no
    epsilon neither type has a bound: refused, with the reason."""
    spec = NormSpec(kind=kind, dtype=dtype, casts="factor", inverse=inverse, epsilon=epsilon, epsilon_dropped=dropped)
    model = build(spec)
    assert any(n.op_type == "Cast" and n.input[0].startswith(("reciprocal", "sqrt")) for n in model.graph.node)
    out, report = rewrite_model(model, target="tensorrt")
    if fused:
        assert report.fused == 1 and "Cast" not in fused_ops(out), [r.reason for r in report.rejected]
        assert_same(model, out, dtype)
        return
    assert report.fused == 0
    (rejection,) = report.rejected
    root = inverse == "div"
    assert ("smallest normal value" if root else "become inf") in rejection.reason and f"cast to {dtype}" in rejection.reason


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_a_factor_that_overflows_the_half_type_is_more_than_a_rounding():
    """Why the bound: at eps 1e-12 in fp16, a row of 1e-5s has mean square 1e-10, an inverse root of
    about 1e5 that fp16 holds as inf, and the graph gives inf where the norm is 1."""
    model = build(NormSpec(kind="rms", dtype="float16", casts="factor", scale="none", epsilon=1e-12))
    (y,) = run_model(model, {"x": np.full((2, 5, 16), 1e-5, np.float16)})
    assert np.isinf(y).all()
    out, report = rewrite_model(model, target="tensorrt")
    assert report.fused == 0 and "become inf" in report.rejected[0].reason


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("residual", ("none", "private", "exposed"))
@pytest.mark.parametrize("kind", ("rms", "layer"))
@pytest.mark.parametrize("axes", ("input-1", "attr+"))
def test_targets_residuals_and_axes(target, residual, kind, axes):
    spec = NormSpec(kind=kind, dtype="float16", casts="llama", residual=residual,
                    axes_input=axes.startswith("input"), positive_axis=axes.endswith("+"))
    model = build(spec)
    out, report = rewrite_model(model, target=target)
    assert report.fused == 1
    fusion = report.fusions[0]
    with_residual = residual != "none" and target != "onnx"
    assert fusion.residual is with_residual
    assert fusion.sum_exposed is (with_residual and residual == "exposed")
    ops = fused_ops(out)
    if target == "tensorrt":
        assert ops[0] == ("Add" if with_residual else "") + ("LayerNorm" if kind == "layer" else "RMSNorm")
        node = out.graph.node[0]
        attrs = {a.name for a in node.attribute}
        assert node.domain == "normfuse" and {"plugin_namespace", "plugin_version", "epsilon"} <= attrs
        if kind == "layer":
            assert len(node.input) == (4 if with_residual else 3)  # beta is always given to the plugin
    elif target == "onnxruntime" and with_residual:
        assert ops[0] == ("SkipLayerNormalization" if kind == "layer" else "SkipSimplifiedLayerNormalization")
    elif target == "onnx":
        assert ("LayerNormalization" if kind == "layer" else "RMSNormalization") in ops
        assert {o.domain: o.version for o in out.opset_import}[""] >= (17 if kind == "layer" else 23)
    assert_same(model, out, spec.dtype)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("spec", [NormSpec(), NormSpec(kind="layer", residual="exposed", dtype="float16", casts="llama"),
                                  NormSpec(residual="private", scale="gemma"), NormSpec(kind="layer", bias=False)],
                         ids=NormSpec.describe)
def test_rewriting_a_rewritten_graph_changes_nothing(target, spec):
    once, first = rewrite_model(build(spec), target=target)
    twice, second = rewrite_model(once, target=target)
    assert first.fused == 1 and second.fused == 0 and not second.rejected
    assert [(n.op_type, list(n.input), list(n.output)) for n in twice.graph.node] == \
           [(n.op_type, list(n.input), list(n.output)) for n in once.graph.node]


def test_symbolic_leading_dims_and_any_rank():
    for leading in ((), (3,), ("batch", "seq"), ("batch", 2, 3, "heads")):
        for residual in ("none", "exposed"):
            spec = NormSpec(kind="rms", residual=residual)
            model = build(spec, leading=leading)
            out, report = rewrite_model(model)
            assert report.fused == 1 and report.fusions[0].residual is (residual != "none"), leading
            assert_same(model, out, "float32")


def test_gemma_and_cast_scales_are_folded_into_gamma():
    for scale, words in (("gemma", "(1 + w)"), ("cast_w", "Cast(w)")):
        spec = NormSpec(dtype="float16", casts="scale_then_cast", scale=scale)
        model = build(spec)
        out, report = rewrite_model(model)
        assert fused_ops(out) == ["RMSNorm"]
        assert any(words in note for note in report.notes)
        assert_same(model, out, "float16")


def test_report_lists_fusion_details():
    spec = replace(NormSpec(kind="layer", residual="exposed"), epsilon=1e-6)
    _, report = rewrite_model(build(spec))
    data = report.as_dict()
    fusion = data["fusions"][0]
    assert fusion["kind"] == "AddLayerNorm" and fusion["residual"] and fusion["sum_exposed"]
    assert fusion["epsilon"] == pytest.approx(1e-6) and len(fusion["nodes_removed"]) == 11
    assert report.counts == {"AddLayerNorm": 1}


PLUGIN_DTYPES = [NormSpec(kind="layer", dtype=d, casts=c, scale=s, bias=b, residual=r)
                 for d, c, s, b, r in itertools.product(("float16", "bfloat16"), ("none", "llama", "scale_then_cast"),
                                                        ("none", "right", "cast_w"), (False, True), ("none", "private"))]


@pytest.mark.parametrize("spec", PLUGIN_DTYPES, ids=NormSpec.describe)
def test_tensorrt_target_gives_the_plugins_a_dtype_combination_they_declare(spec):
    """gamma and beta reach a plugin in one dtype, x's or float32 (the kernels are specialised on
    one parameter dtype); a combination outside plugins.trt's autotune list fails the engine build."""
    import onnx_graphsurgeon as gs

    from export.rewrite.checks import dtype_name
    from normops import OPS
    from plugins.trt import TRT_TYPE_NAME, type_combinations

    out, report = rewrite_model(build(spec), target="tensorrt")
    assert report.fused == 1, [r.reason for r in report.rejected]
    graph = gs.import_onnx(out)
    (node,) = [n for n in graph.nodes if n.op in OPS]
    names = OPS[node.op].all_inputs + OPS[node.op].outputs
    dtypes = dict(zip(names, (dtype_name(t) for t in node.inputs + node.outputs)))
    assert dtypes["gamma"] == dtypes["beta"]
    assert ", ".join(TRT_TYPE_NAME[dtypes[n]] for n in names) in type_combinations(node.op)
    assert_same(build(spec), out, spec.dtype)


def _native_model(op, dtype, residual, with_bias=True, axis=-1, opset=None):
    from onnx import helper, numpy_helper

    from export.rewrite.synth import ONNX_TYPES
    from normops import numpy_dtype

    h, t = 8, ONNX_TYPES[dtype]
    nodes, x = [], "x"
    if residual:
        nodes.append(helper.make_node("Add", ["x", "r"], ["h"], name="add"))
        x = "h"
    inputs = [x, "gamma"] + (["beta"] if op == "LayerNormalization" and with_bias else [])
    attrs = {"epsilon": 1e-6}
    nodes.append(helper.make_node(op, inputs, ["y"], name="norm", axis=axis, **attrs))
    outputs = [helper.make_tensor_value_info("y", t, None)]
    if residual == "exposed":
        outputs.append(helper.make_tensor_value_info("h", t, None))
    inits = [numpy_helper.from_array(np.linspace(0.5, 1.5, h).astype(numpy_dtype(dtype)), "gamma"),
             numpy_helper.from_array(np.linspace(-0.5, 0.5, h).astype(numpy_dtype(dtype)), "beta")]
    graph = helper.make_graph(nodes, "native", [helper.make_tensor_value_info(n, t, [2, 3, h]) for n in "xr"][: 2 if residual else 1],
                              outputs, initializer=inits[: len(inputs) - 1])
    opset = opset or (23 if op == "RMSNormalization" else 17)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


NATIVE = [("LayerNormalization", True), ("LayerNormalization", False), ("RMSNormalization", False),
          ("SimplifiedLayerNormalization", False)]


@pytest.mark.parametrize("op,with_bias", NATIVE)
@pytest.mark.parametrize("residual", (None, "private", "exposed"))
@pytest.mark.parametrize("dtype", ("float32", "float16"))
def test_native_norms_and_their_residual_add(op, with_bias, residual, dtype):
    model = _native_model(op, dtype, residual, with_bias)
    out, report = rewrite_model(model, target="tensorrt")
    centered = op == "LayerNormalization"
    assert fused_ops(out) == [("Add" if residual else "") + ("LayerNorm" if centered else "RMSNorm")]
    assert report.fusions[0].epsilon == pytest.approx(1e-6, rel=1e-3)
    assert_same(model, out, dtype)
    out, report = rewrite_model(model, target="onnxruntime")
    assert report.fused == (1 if residual or op == "RMSNormalization" else 0)
    if dtype == "float32" or residual:
        assert_same(model, out, dtype)


@pytest.mark.parametrize("op", ["LayerNormalization", "RMSNormalization"])
@pytest.mark.parametrize("dtype", ("float32", "float16"))
def test_native_norms_with_statistics_in_their_own_type_are_fused(op, dtype):
    """stash_type 0: statistics in x's type, one computation with 1 in float32 (the proof's type);
    in fp16 the fused op's float32 statistics are the more precise (onnx's evaluator has no kernel
    for 0, so the proof refused these with its NotImplementedError)."""
    model = _native_model(op, dtype, None)
    model.graph.node[0].attribute.append(onnx.helper.make_attribute("stash_type", 0))
    out, report = rewrite_model(model, target="tensorrt")
    assert fused_ops(out) == ["LayerNorm" if op == "LayerNormalization" else "RMSNorm"] and not report.rejected
    if dtype == "float32":  # the original on ONNX Runtime (onnx's evaluator cannot run it)
        import onnxruntime as ort

        feeds = random_feeds(model, seed=1)
        expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
        assert GRAPH[dtype].passes(run_model(out, feeds)[0], expected[0])


@pytest.mark.parametrize("through", ["float16", "bfloat16", "float64"])
def test_a_statistic_narrowed_below_x_type_is_no_norm(through):
    """x float32, its mean square cast to `through` for epsilon, the root and its inverse, and back:
    through fp16 a row past fp16's range gives 0 (the mean square overflows) and bf16 rounds by
    0.6%, neither of which the fused op would do; through float64 it is a norm."""
    from onnx import TensorProto, helper, numpy_helper

    from export.rewrite.synth import ONNX_TYPES
    from normops import numpy_dtype

    h, n = 16, helper.make_node
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(1e-5, numpy_dtype(through)), "eps"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes")]
    nodes = [n("Pow", ["x", "two"], ["squares"]), n("ReduceMean", ["squares", "axes"], ["mean_square"]),
             n("Cast", ["mean_square"], ["narrow"], to=ONNX_TYPES[through]), n("Add", ["narrow", "eps"], ["var"]),
             n("Sqrt", ["var"], ["root"]), n("Reciprocal", ["root"], ["inverse"]),
             n("Cast", ["inverse"], ["factor"], to=TensorProto.FLOAT), n("Mul", ["x", "factor"], ["y"])]
    f32 = TensorProto.FLOAT
    model = helper.make_model(helper.make_graph(nodes, "narrowed", [helper.make_tensor_value_info("x", f32, [2, 3, h])],
                                                [helper.make_tensor_value_info("y", f32, [2, 3, h])], inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    _, report = rewrite_model(model, target="tensorrt")
    if through == "float64":
        assert report.fused == 1
    else:
        assert report.fused == 0 and f"narrows a statistic to {through}" in report.rejected[0].reason


def test_native_norm_over_more_than_the_last_axis_is_rejected():
    _, report = rewrite_model(_native_model("LayerNormalization", "float32", None, axis=1))
    assert report.fused == 0 and "not the last axis" in report.rejected[0].reason


@pytest.mark.parametrize("op,with_bias", NATIVE)
def test_a_native_norms_scale_gives_the_last_axis_that_inference_lost(op, with_bias):
    """MobileViT folds patches with Reshapes to sizes computed at run time, so no inference knows
    the last axis of the norms behind them; a native norm's [H] scale does (the op takes a scale
    broadcastable to the normalised axis). A decomposed norm's scale is a Mul that may broadcast,
    and a [1] scale broadcasts to any axis: neither tells the size."""
    model = _native_model(op, "float32", None, with_bias)
    model.graph.input[0].type.tensor_type.shape.dim[-1].dim_param = "hidden"
    out, report = rewrite_model(model, target="tensorrt")
    assert report.fused == 1 and report.fusions[0].hidden == 8, [r.reason for r in report.rejected]
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)}
    assert GRAPH["float32"].passes(run_model(out, feeds)[0], run_model(model, feeds)[0])
    for gamma in model.graph.initializer:
        gamma.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(gamma)[:1], gamma.name))
    _, report = rewrite_model(model, target="tensorrt")
    assert report.fused == 0 and "not static ('hidden')" in report.rejected[0].reason


def test_a_decomposed_norms_scale_does_not_give_the_last_axis():
    model = build(NormSpec(kind="rms", hidden=8))
    model.graph.input[0].type.tensor_type.shape.dim[-1].dim_param = "hidden"
    _, report = rewrite_model(model, target="tensorrt")
    assert report.fused == 0 and "not static ('hidden')" in report.rejected[0].reason


def test_residual_add_with_unknown_dims_is_not_fused():
    """[1, H] + [5, H] broadcasts; with both leading dims unknown (None) that cannot be ruled out,
    so the Add stays outside the norm. A named dim is the same size wherever it appears."""
    import onnx_graphsurgeon as gs

    from export.rewrite.checks import NormCandidate
    from export.rewrite.matcher import Match
    from export.rewrite.patterns import NORM_PATTERNS
    from export.rewrite.residual import residual_add

    for leading, fusable in ((None, False), ("batch", True), (4, True)):
        a, b, x = (gs.Variable(n, dtype=np.float32, shape=[leading, 8]) for n in "abx")
        add = gs.Node("Add", name="add", inputs=[a, b], outputs=[x])
        y = gs.Variable("y", dtype=np.float32, shape=[leading, 8])
        candidate = NormCandidate(NORM_PATTERNS[0], Match(), x, y, 8, 1e-5, None, None, [])
        found, why = residual_add(candidate, set())
        assert (found is not None) is fusable, (leading, why)
        if not fusable:
            assert found is None and "cannot be shown equal" in why
        else:
            assert found[2] is add and why is None


WIDE_HALF = [NormSpec(kind=k, dtype=d, casts=c, hidden=h, bias=True)
             for k, d, c, h in itertools.product(("rms", "layer"), ("float16", "bfloat16"), ("none", "llama"), (1600, 4096))]


@pytest.mark.parametrize("spec", WIDE_HALF, ids=lambda s: f"{s.describe()} hidden={s.hidden}")
def test_wide_half_precision_norms_are_proven_and_fused(spec):
    """Wide rows in fp16/bf16: the proof runs the subgraph widened to float32, since onnx's
    evaluator would accumulate the mean in the half type (bf16 at hidden 1600 is off by > 1)."""
    _, report = rewrite_model(build(spec), target="tensorrt")
    assert report.fused == 1, [r.reason for r in report.rejected]


@pytest.mark.parametrize("op", ("LayerNormalization", "RMSNormalization"))
@pytest.mark.parametrize("dtype", ("float16", "bfloat16"))
def test_wide_native_half_precision_norms_are_fused(op, dtype):
    from onnx import numpy_helper

    from normops import numpy_dtype

    model = _native_model(op, dtype, residual=None)
    h = 1600  # GPT-2-XL's width instead of the helper's 8, weights included
    for value in model.graph.input:
        value.type.tensor_type.shape.dim[-1].dim_value = h
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(np.linspace(0.5, 1.5, h).astype(numpy_dtype(dtype)), init.name))
    _, report = rewrite_model(model, target="tensorrt")
    assert report.fused == 1, [r.reason for r in report.rejected]


@pytest.mark.parametrize("dtype", ("float16", "bfloat16"))
def test_the_widened_proof_still_tells_a_different_norm_apart(dtype):
    """Widening keeps the arithmetic: a candidate recorded with another epsilon, or over a scale
    that is not the graph's, still fails the proof in half precision."""
    from export.rewrite.checks import Rejected
    from export.rewrite.proof import prove
    from export.rewrite.rewriter import _first_passing, _import_with_shapes
    from export.rewrite.scopes import scopes_of

    model = build(NormSpec(kind="rms", dtype=dtype, casts="llama", hidden=1600, epsilon=1e-5))
    graph = _import_with_shapes(model)
    (scope,) = scopes_of(graph)
    root = graph.outputs[0]
    candidate = _first_passing(root, scope, set(), False, 18, {})
    assert candidate is not None
    prove(candidate, 18)  # the right epsilon passes
    candidate.epsilon = 1e-2
    with pytest.raises(Rejected, match="numerical proof failed"):
        prove(candidate, 18)


def test_widening_touches_every_half_type():
    from onnx import TensorProto, helper, numpy_helper

    from export.rewrite.proof import _widen_half_types

    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(2.0, np.float16), "c")),
             helper.make_node("Mul", ["x", "c"], ["m"]), helper.make_node("Add", ["m", "w"], ["a"]),
             helper.make_node("Cast", ["a"], ["y"], to=TensorProto.FLOAT16)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [4])],
                              initializer=[numpy_helper.from_array(np.ones(4, np.float16), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert _widen_half_types(model)
    text = str(model)
    assert "data_type: 10" not in text and "elem_type: 10" not in text and "i: 10" not in text
    onnx.checker.check_model(model)
    from onnx.reference import ReferenceEvaluator

    (y,) = ReferenceEvaluator(model).run(None, {"x": np.arange(4, dtype=np.float32)})
    assert y.dtype == np.float32 and y.tolist() == [1.0, 3.0, 5.0, 7.0]
    assert not _widen_half_types(model)


def _reshaped_residual_model(new_shape, op="LayerNormalization", dtype="float32", sum_used=True):
    """x + r -> Reshape(new_shape) -> norm over the last axis; the reshaped sum also feeds a Relu
    (OPT flattens its residual stream to [tokens, hidden] between the Add and the norm)."""
    from onnx import helper, numpy_helper

    from export.rewrite.synth import ONNX_TYPES
    from normops import numpy_dtype

    h, t = 8, ONNX_TYPES[dtype]
    hidden = new_shape[-1]
    inputs = ["flat", "gamma"] + (["beta"] if op == "LayerNormalization" else [])
    nodes = [helper.make_node("Add", ["x", "r"], ["s"], name="add"),
             helper.make_node("Reshape", ["s", "shape"], ["flat"], name="flatten"),
             helper.make_node(op, inputs, ["y"], name="norm", axis=-1, epsilon=1e-6)]
    outputs = [helper.make_tensor_value_info("y", t, None)]
    if sum_used:
        nodes.append(helper.make_node("Relu", ["flat"], ["z"], name="relu"))
        outputs.append(helper.make_tensor_value_info("z", t, None))
    inits = [numpy_helper.from_array(np.array(new_shape, np.int64), "shape"),
             numpy_helper.from_array(np.linspace(0.5, 1.5, hidden).astype(numpy_dtype(dtype)), "gamma"),
             numpy_helper.from_array(np.linspace(-0.5, 0.5, hidden).astype(numpy_dtype(dtype)), "beta")]
    graph = helper.make_graph(nodes, "reshaped", [helper.make_tensor_value_info(n, t, [2, 3, h]) for n in "xr"],
                              outputs, initializer=inits[: len(inputs)])
    opset = 23 if op == "RMSNormalization" else 17
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("target", ("tensorrt", "onnxruntime"))
@pytest.mark.parametrize("sum_used", (True, False))
@pytest.mark.parametrize("new_shape", ([-1, 8], [6, 8], [3, 2, 8]))
def test_residual_add_reaches_the_norm_through_a_row_preserving_reshape(target, sum_used, new_shape):
    model = _reshaped_residual_model(new_shape, sum_used=sum_used)
    out, report = rewrite_model(model, target=target)
    assert report.counts == {"AddLayerNorm": 1} and report.fusions[0].residual
    (fused,) = [n for n in out.graph.node if n.op_type not in ("Reshape", "Relu")]
    assert list(fused.input[:2]) == ["x", "r"]  # the Add's operands, in their own shape
    assert "Add" not in fused_ops(out)
    assert_same(model, out, "float32")


def test_a_reshape_that_changes_the_last_axis_keeps_the_add_out():
    """[2, 3, 8] -> [2, 3, 4, 2]: the norm's rows (2 values) are not the sum's rows (8)."""
    model = _reshaped_residual_model([2, 3, 4, 2])
    out, report = rewrite_model(model, target="tensorrt")
    assert report.counts == {"LayerNorm": 1} and "Add" in fused_ops(out)
    assert_same(model, out, "float32")


def _rms_with_axes_from(axes_nodes: list, axes: str) -> onnx.ModelProto:
    """x / sqrt(mean(x^2) + eps) * gamma over [2, 5, 8], the mean's axes computed by `axes_nodes`."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
             numpy_helper.from_array(np.linspace(0.5, 1.5, 8).astype(np.float32), "gamma")]
    nodes = axes_nodes + [helper.make_node("Pow", ["x", "two"], ["sq"]),
                          helper.make_node("ReduceMean", ["sq", axes], ["ms"]),
                          helper.make_node("Add", ["ms", "eps"], ["mse"]), helper.make_node("Sqrt", ["mse"], ["rms"]),
                          helper.make_node("Div", ["x", "rms"], ["n"]), helper.make_node("Mul", ["n", "gamma"], ["y"])]
    graph = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 8])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _const(name, value):
    from onnx import helper, numpy_helper

    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, np.int64)))


AXES_SPELLINGS = {  # torch's exporter with optimize=False writes the first
    "reshape": [_const("a", [-1]), onnx.helper.make_node("Constant", [], ["s"], value_ints=[-1]),
                onnx.helper.make_node("Reshape", ["a", "s"], ["axes"])],
    "reshape-copying-a-dim": [_const("a", [[-1]]), _const("s", [0]), onnx.helper.make_node("Reshape", ["a", "s"], ["axes"])],
    "unsqueeze": [_const("a", -1), _const("u", [0]), onnx.helper.make_node("Unsqueeze", ["a", "u"], ["axes"])],
    "squeeze": [_const("a", [[-1]]), _const("u", [0]), onnx.helper.make_node("Squeeze", ["a", "u"], ["axes"])],
    "identity": [_const("a", [2]), onnx.helper.make_node("Identity", ["a"], ["axes"])],
    "concat": [_const("a", [-1]), onnx.helper.make_node("Concat", ["a"], ["axes"], axis=0)],
}


@pytest.mark.parametrize("spelling", list(AXES_SPELLINGS))
def test_reduction_axes_moved_about_by_shape_ops_are_read(spelling):
    model = _rms_with_axes_from(AXES_SPELLINGS[spelling], "axes")
    out, report = rewrite_model(model, target="tensorrt")
    assert report.fused == 1, [r.reason for r in report.rejected]
    assert_same(model, out, "float32")


def test_axes_that_shape_ops_make_more_than_the_last_are_still_refused():
    nodes = [_const("a", [-1]), _const("b", [-2]), onnx.helper.make_node("Concat", ["a", "b"], ["axes"], axis=0)]
    out, report = rewrite_model(_rms_with_axes_from(nodes, "axes"), target="tensorrt")
    assert report.fused == 0 and "not only the last axis" in report.rejected[0].reason


def test_a_last_axis_mean_in_no_norm_is_named_in_the_notes():
    """An RMSNorm whose squares are quantised to int8 before their mean (a QDQ model) is no exact
    norm and matches nothing; the notes name its ReduceMean, so a short count of fused norms has
    a lead. A model whose norms all fuse gets no such note."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Mul", ["x", "x"], ["sq"]),
             helper.make_node("QuantizeLinear", ["sq", "scale", "zero"], ["sq_q"]),
             helper.make_node("DequantizeLinear", ["sq_q", "scale", "zero"], ["sq_dq"]),
             helper.make_node("ReduceMean", ["sq_dq", "axes"], ["ms"], keepdims=1, name="quantised_mean"),
             helper.make_node("Add", ["ms", "eps"], ["mse"]),
             helper.make_node("Sqrt", ["mse"], ["root"]),
             helper.make_node("Div", ["x", "root"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
                              [numpy_helper.from_array(np.array(0.05, np.float32), "scale"),
                               numpy_helper.from_array(np.array(0, np.uint8), "zero"),
                               numpy_helper.from_array(np.array([-1], np.int64), "axes"),
                               numpy_helper.from_array(np.array(1e-5, np.float32), "eps")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    _, report = rewrite_model(model)
    assert report.fused == 0 and not report.rejected
    (note,) = [n for n in report.notes if "ReduceMean" in n]
    assert note.startswith("1 ReduceMean node(s) over the last axis") and "'quantised_mean'" in note
    _, report = rewrite_model(build(NormSpec(kind="rms", residual="exposed")))
    assert report.fused == 1 and not any("ReduceMean" in n for n in report.notes)


@pytest.mark.parametrize("op", ("LayerNormalization", "SimplifiedLayerNormalization"))
@pytest.mark.parametrize("sum_used", (False, True))
@pytest.mark.parametrize("shape", (["batch", 4, 4, 8], [8]), ids=("rank4", "rank1"))
def test_onnx_runtime_skip_ops_get_rows_at_other_ranks(op, sum_used, shape):
    """ONNX Runtime's Skip*LayerNormalization refuse inputs of rank other than 2 or 3 at run time
    (timm's Swin normalises [batch, height, width, channels], and the fused model failed to run):
    there the operands go in as [rows, hidden] and the results come back in their shape."""
    from onnx import helper, numpy_helper

    nodes = [helper.make_node("Add", ["x", "r"], ["h"]),
             helper.make_node(op, ["h", "gamma"], ["y"], axis=-1, epsilon=1e-5)]
    outputs = [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)]
    if sum_used:
        outputs.append(helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, shape) for n in "xr"]
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(np.linspace(0.5, 1.5, 8).astype(np.float32), "gamma")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, report = rewrite_model(model, target="onnxruntime")
    assert report.counts == {"AddLayerNorm" if op == "LayerNormalization" else "AddRMSNorm": 1}
    (skip,) = [n for n in out.graph.node if n.op_type.startswith("Skip")]
    fed_by = {o: n.op_type for n in out.graph.node for o in n.output}
    assert [fed_by[i] for i in skip.input[:2]] == ["Reshape", "Reshape"]
    import onnxruntime as ort

    concrete = [2 if d == "batch" else d for d in shape]
    feeds = {n: np.random.default_rng(i).standard_normal(concrete).astype(np.float32) for i, n in enumerate("xr")}
    got = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for g, e in zip(got, run_model(model, feeds)):
        assert g.shape == e.shape and GRAPH["float32"].passes(g, e)
