"""The project's own exports and torch's norm modules, as torch writes them, are fully fused.

Torch exports take seconds each: two representative ones run by default, the full matrix
(both exporters, both norms, fp32/fp16/bf16, native and spelled-out LayerNorm) under `-m slow`.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import warnings

import numpy as np
import onnx
import pytest

from export.rewrite import rewrite_model
from export.rewrite.evaluate import run_model
from normops import GRAPH

torch = pytest.importorskip("torch")


def export_stack(tmp_path, norm, exporter, dtype, decomposed=False):
    from export.export_model import export_model
    from models import preset
    from models import count_norms

    config = preset("tiny", norm, layers=1, dtype=dtype, decomposed_layernorm=decomposed)
    # unchecked: TorchScript's half-precision F.layer_norm (a LayerNormalization of mixed dtypes,
    # which onnx's full check and ONNX Runtime refuse) is a graph the rewriter must still handle
    result = export_model(config, tmp_path / "model.onnx", exporter=exporter, check=False)
    return onnx.load(str(result.path)), count_norms(config)


def assert_fused_and_equal(model, norms, residuals, dtype, target="tensorrt"):
    out, report = rewrite_model(model, target=target)
    assert report.fused == norms, [r.reason for r in report.rejected]
    assert sum(f.residual for f in report.fusions) == residuals
    rng = np.random.default_rng(0)
    from normops import numpy_dtype

    feeds = {}
    for i in model.graph.input:
        dims = [d.dim_value or 3 for d in i.type.tensor_type.shape.dim]
        feeds[i.name] = rng.standard_normal(dims).astype(numpy_dtype(dtype))
    for e, a in zip(run_model(model, feeds), run_model(out, feeds)):
        assert GRAPH[dtype].passes(a, e)
    assert not loose_scales(out), "a norm's gamma was left outside the fused op"
    return report


def loose_scales(model) -> list[str]:
    """Mul nodes that scale a fused op's output by a constant vector: a gamma the fusion missed."""
    fused = {o for n in model.graph.node if n.domain == "normfuse" or "LayerNormalization" in n.op_type
             for o in n.output[:1]}
    constants = {t.name for t in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant"
                                                            for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "Mul" and set(n.input) & fused and set(n.input) & constants]


# torchscript fp32 RMSNorm: its identity Casts (x.float() on fp32 x) once kept gamma out of the fusion
FAST = [("rmsnorm", "dynamo", "float16", False), ("layernorm", "torchscript", "float32", True),
        ("rmsnorm", "torchscript", "float32", False)]
ALL = [c for c in itertools.product(("rmsnorm", "layernorm"), ("dynamo", "torchscript"),
                                    ("float32", "float16", "bfloat16"), (False, True))
       if not (c[0] == "rmsnorm" and c[3]) and c not in FAST]


@pytest.mark.parametrize("norm,exporter,dtype,decomposed", FAST)
def test_project_exports(tmp_path, norm, exporter, dtype, decomposed):
    model, (norms, residuals) = export_stack(tmp_path, norm, exporter, dtype, decomposed)
    assert_fused_and_equal(model, norms, residuals, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("norm,exporter,dtype,decomposed", ALL)
def test_project_exports_all(tmp_path, norm, exporter, dtype, decomposed):
    model, (norms, residuals) = export_stack(tmp_path, norm, exporter, dtype, decomposed)
    assert_fused_and_equal(model, norms, residuals, dtype)


def _export_module(module, dtype, opset):
    x = torch.randn(2, 8, 64, dtype=getattr(torch, dtype))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return torch.onnx.export(module.to(getattr(torch, dtype)).eval(), (x,), dynamo=True, opset_version=opset).model_proto


class FunctionalRMS(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(64) + 0.5)

    def forward(self, x):
        return torch.nn.functional.rms_norm(x, (64,), self.weight, 1e-6)


@pytest.mark.parametrize("opset", (18, 23))
@pytest.mark.parametrize("make", (lambda: torch.nn.RMSNorm(64, eps=1e-6), FunctionalRMS,
                                  lambda: torch.nn.RMSNorm(64, eps=1e-6, elementwise_affine=False)),
                         ids=("nn.RMSNorm", "F.rms_norm", "nn.RMSNorm-no-weight"))
def test_torch_rms_norm_modules(make, opset):
    """Opset 18 spells them out with a positive axis (axes=[2]); opset 23 writes RMSNormalization,
    without a weight with a scale of ConstantOfShape(Shape(x)) (made a per-feature constant)."""
    for dtype in ("float32", "float16"):
        model = _export_module(make(), dtype, opset)
        report = assert_fused_and_equal(model, 1, 0, dtype)
        assert report.fusions[0].kind == "RMSNorm"


class TorchStatisticsNorm(torch.nn.Module):
    """Norms written with torch's own statistics, which its dynamo exporter spells as a reduction with
    keepdims=0 whose axis Reshape/Expand (var, var_mean) or Unsqueeze put back, or as a sum over hidden; and near
    misses that are no norm: epsilon outside the root, Bessel's correction, the wrong divisor, axis 1."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.weight = torch.nn.Parameter(torch.rand(64) + 0.5)
        self.bias = torch.nn.Parameter(0.1 * torch.randn(64))

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        if self.form == "var_mean":
            var, mean = torch.var_mean(x, -1, keepdim=True, unbiased=False)
            return (x - mean) / torch.sqrt(var + 1e-5) * self.weight + self.bias
        if self.form == "var":
            return (x - mean) * torch.rsqrt(x.var(-1, keepdim=True, correction=0) + 1e-6) * self.weight
        if self.form == "sum over hidden":
            return x / torch.sqrt((x * x).sum(-1, keepdim=True) / 64 + 1e-6) * self.weight
        if self.form == "mean unsqueezed":
            return x * torch.rsqrt((x * x).mean(-1).unsqueeze(-1) + 1e-6) * self.weight
        if self.form == "std plus eps":
            return (x - mean) / (x.std(-1, keepdim=True, unbiased=False) + 1e-5)
        if self.form == "annotated":  # the Annotated Transformer's: the scale multiplies the numerator first
            return self.weight * (x - mean) / (x.std(-1, keepdim=True, unbiased=False) + 1e-6) + self.bias
        if self.form == "annotated, as written":  # with torch's default, unbiased, std
            return self.weight * (x - mean) / (x.std(-1, keepdim=True) + 1e-6) + self.bias
        if self.form == "Zaya's query-key norm":  # x * (sqrt(d) / max(||x||, eps))
            return x * (8.0 / x.norm(p=2, dim=-1, keepdim=True).clamp_min(1e-7))
        if self.form == "scaled rms plus eps":
            return self.weight * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + 1e-6)
        if self.form == "unbiased var":
            return (x - mean) / torch.sqrt(x.var(-1, keepdim=True) + 1e-5) * self.weight + self.bias
        if self.form == "nGPT's L2 norm":  # transformers' Dory: the hidden state kept at norm 1, not RMS 1
            h = x.float()
            return (h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) + 1e-6)).type_as(x) * self.weight
        if self.form == "rounded factor":  # DeepSeek V4's unweighted RMSNorm: the factor cast back, x kept
            return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + 1e-6).to(x.dtype)
        if self.form == "rounded root":  # the same with the root cast back and x divided by it
            return x / torch.sqrt(x.float().square().mean(-1, keepdim=True) + 1e-6).to(x.dtype) * self.weight
        if self.form == "x / x.norm":  # ReduceL2
            return x / x.norm(dim=-1, keepdim=True)
        if self.form == "F.normalize":  # x / max(||x||, eps): epsilon outside the root
            return torch.nn.functional.normalize(x, dim=-1)
        if self.form == "F.normalize over axis 1":  # no norm of the last axis at all
            return torch.nn.functional.normalize(x, dim=1)
        if self.form == "norm plus eps":
            return x / (x.norm(dim=-1, keepdim=True) + 1e-6)
        if self.form == "sum over 65":
            return x / torch.sqrt((x * x).sum(-1, keepdim=True) / 65 + 1e-6)
        var, mean = torch.var_mean(x, 1, keepdim=True, unbiased=False)  # "var_mean over axis 1"
        return (x - mean) / torch.sqrt(var + 1e-5)


def _export_dynamic(module, dtype):
    """Batch and sequence dynamic: torch then restores a reduced axis from Shape ops, not constants."""
    x = torch.randn(2, 8, 64, dtype=getattr(torch, dtype))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return torch.onnx.export(module.to(getattr(torch, dtype)).eval(), (x,), dynamo=True, opset_version=18,
                                 dynamic_shapes=({0: "batch", 1: "seq"},)).model_proto


@pytest.mark.parametrize("form,kind", [("var_mean", "LayerNorm"), ("var", "LayerNorm"), ("sum over hidden", "RMSNorm"),
                                       ("mean unsqueezed", "RMSNorm"), ("nGPT's L2 norm", "RMSNorm"),
                                       ("x / x.norm", "RMSNorm"), ("rounded factor", "RMSNorm"),
                                       ("rounded root", "RMSNorm")])
def test_torch_statistics_are_fused(form, kind):
    report = assert_fused_and_equal(_export_dynamic(TorchStatisticsNorm(form), "float32"), 1, 0, "float32")
    assert report.fusions[0].kind == kind
    model = _export_module(TorchStatisticsNorm(form), "float16", 18)
    report = assert_fused_and_equal(model, 1, 0, "float16")
    assert report.fusions[0].kind == kind
    if form.startswith("rounded"):  # the factor's cast back to float16 is in the graph, and inside the fusion
        cast_back = [n.name for n in model.graph.node if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT16]
        assert cast_back and set(cast_back) <= set(report.fusions[0].nodes_removed)


def test_an_l2_norm_becomes_the_rmsnorm_it_equals():
    """x / sqrt(sum(x^2) + eps) = x / sqrt(mean(x^2) + eps / n) / sqrt(n): the fused op's epsilon is
    eps / 64 and its scale the weight / 8, folded into one constant."""
    module = TorchStatisticsNorm("nGPT's L2 norm")
    out, report = rewrite_model(_export_dynamic(module, "float32"), target="tensorrt")
    (fusion,) = report.fusions
    assert fusion.pattern == "l2norm" and fusion.epsilon == pytest.approx(1e-6 / 64) and fusion.scale_factor == 1 / 8
    assert any("1 L2 norm(s)" in note for note in report.notes)
    (node,) = [n for n in out.graph.node if n.op_type == "RMSNorm"]
    gamma = next(onnx.numpy_helper.to_array(t) for t in out.graph.initializer if t.name == node.input[1])
    np.testing.assert_allclose(gamma, module.weight.detach().numpy() / 8, rtol=1e-7)


@pytest.mark.parametrize("form,reason", [
    ("std plus eps", "epsilon is added outside the square root of the deviation ((x - mean) / (std + eps))"),
    ("annotated", "epsilon is added outside the square root of the deviation"),
    ("scaled rms plus eps", "epsilon is added outside the square root of the mean square (x / (rms + eps))"),
    ("Zaya's query-key norm", "F.normalize's x / max(||x||, eps)"),
    ("unbiased var", "the variance is scaled by a constant before its root, as torch's x.var(-1) and x.std(-1) "
                     "make it unbiased"),  # torch's n / (n - 1) after the mean
    ("annotated, as written", "epsilon is added outside the square root of the deviation"),  # its std is unbiased
    ("sum over 65", "divided by 65, not by the row length 64"),
    ("var_mean over axis 1", None),
    ("F.normalize", "epsilon is added outside the square root of the sum of squares (x / (||x|| + eps), or "
                    "F.normalize's x / max(||x||, eps))"),
    ("norm plus eps", "epsilon is added outside the square root of the sum of squares"),
    ("F.normalize over axis 1", "reduces over axis 1, not the last axis"),
])
def test_torch_statistics_that_are_no_norm_stay(form, reason):
    """Each is left as written; a norm with epsilon outside the root (no fused op's arithmetic) says so."""
    model = _export_dynamic(TorchStatisticsNorm(form), "float32")
    out, report = rewrite_model(model, target="tensorrt")
    assert report.fused == 0
    if reason:
        assert any(reason in r.reason for r in report.rejected), [r.reason for r in report.rejected]
        assert report.unmatched_means == []
    x = np.random.default_rng(0).standard_normal((3, 5, 64)).astype(np.float32)
    name = model.graph.input[0].name
    assert GRAPH["float32"].passes(run_model(out, {name: x})[0], run_model(model, {name: x})[0])


class TinyEpsilonNorm(torch.nn.Module):
    """Norms whose epsilon torch's exporter optimises away: its optimiser removes an Add of a constant
    within 1e-8 of zero. Helium's RMSNorm (eps 1e-8) and the hand-written BERT LayerNorm that many
    ports of Google's BERT keep (eps 1e-12)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.weight = torch.nn.Parameter(torch.rand(64) + 0.5)
        self.bias = torch.nn.Parameter(0.1 * torch.randn(64))

    def forward(self, x):
        if self.kind == "RMSNorm":
            h = x.to(torch.float32)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-8)
            return (self.weight.to(torch.float32) * h).to(x.dtype)
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        return self.weight * ((x - u) / torch.sqrt(s + 1e-12)) + self.bias


@pytest.mark.parametrize("kind", ["RMSNorm", "LayerNorm"])
def test_a_norm_whose_epsilon_the_exporter_dropped_is_fused_with_epsilon_zero(kind):
    model = _export_dynamic(TinyEpsilonNorm(kind), "float32")
    adds = sum(n.op_type == "Add" for n in model.graph.node)
    assert adds == (0 if kind == "RMSNorm" else 1), "torch's optimiser kept the epsilon: this test no longer covers its loss"
    report = assert_fused_and_equal(model, 1, 0, "float32")
    assert report.fusions[0].kind == kind and report.fusions[0].epsilon == 0.0
    assert any("add no epsilon" in note and "optimize=False" in note for note in report.notes)


class BatchNormArithmeticLayerNorm(torch.nn.Module):
    """LayerNorm in TensorFlow's batch-normalisation arithmetic (tf2onnx's Keras/TF BERT LayerNorms),
    after a residual Add: s = gamma * rsqrt(var + eps); y = x * s + (beta - mean * s). `keras`
    spells the shift as Keras 3 does: -mean * s + beta. `wrong` makes near misses that are not norms."""

    def __init__(self, style="tf", scale=True, center=True, wrong=None):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.rand(64) + 0.5) if scale else None
        self.beta = torch.nn.Parameter(0.1 * torch.randn(64)) if center else None
        self.style, self.wrong = style, wrong

    def forward(self, x, r):
        h = x + r
        mean = h.mean(-1, keepdim=True)
        inv = torch.rsqrt(((h - mean) * (h - mean)).mean(-1, keepdim=True) + 1e-3)
        s = inv * self.gamma if self.gamma is not None else inv
        if self.wrong == "shift without gamma":  # y = x * gamma * inv + (beta - mean * inv)
            return h * s + (self.beta - mean * inv), h
        if self.wrong == "mean over axis 1":
            return h * s + (self.beta - h.mean(1, keepdim=True) * s), h
        if self.wrong == "shift adds the mean":
            return h * s + (self.beta + mean * s), h
        if self.style == "tf":
            shift = self.beta - mean * s if self.beta is not None else -(mean * s)
        else:
            shift = -mean * s + self.beta if self.beta is not None else -mean * s
        return h * s + shift, h


def _export_pair(module, dtype="float32"):
    x = torch.randn(2, 8, 64, dtype=getattr(torch, dtype))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return torch.onnx.export(module.to(getattr(torch, dtype)).eval(), (x, x), dynamo=True, opset_version=18,
                                 input_names=["x", "r"]).model_proto


@pytest.mark.parametrize("scale,center", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["gamma-beta", "gamma", "beta", "neither"])
@pytest.mark.parametrize("style", ["tf", "keras"])
def test_layer_norm_in_batch_norm_arithmetic(style, scale, center):
    model = _export_pair(BatchNormArithmeticLayerNorm(style, scale, center))
    report = assert_fused_and_equal(model, norms=1, residuals=1, dtype="float32")
    assert report.fusions[0].pattern.startswith("layernorm-affine")


@pytest.mark.slow
def test_layer_norm_in_batch_norm_arithmetic_fp16():
    model = _export_pair(BatchNormArithmeticLayerNorm(), "float16")
    assert_fused_and_equal(model, norms=1, residuals=1, dtype="float16")


class LayerNormThenRMSNorm(torch.nn.Module):
    """An RMSNorm of a LayerNorm in batch-norm arithmetic, whose last op is an Add of two
    full-shape tensors (x * s + shift): the RMSNorm must not take it for a residual Add."""

    def __init__(self):
        super().__init__()
        self.layer_norm = BatchNormArithmeticLayerNorm("keras")
        self.rms_norm = torch.nn.RMSNorm(64, eps=1e-6)

    def forward(self, x, r):
        y, h = self.layer_norm(x, r)
        return self.rms_norm(y), h


def test_a_norm_ending_in_an_add_is_not_taken_for_the_next_norms_residual():
    report = assert_fused_and_equal(_export_pair(LayerNormThenRMSNorm()), norms=2, residuals=1, dtype="float32")
    assert {f.kind for f in report.fusions} == {"AddLayerNorm", "RMSNorm"}


@pytest.mark.parametrize("wrong", ["shift without gamma", "mean over axis 1", "shift adds the mean"])
def test_near_misses_of_the_batch_norm_arithmetic_are_not_fused(wrong):
    out, report = rewrite_model(_export_pair(BatchNormArithmeticLayerNorm(wrong=wrong)), target="tensorrt")
    assert report.fused == 0


@pytest.mark.parametrize("norm,keep_io_types", [("layernorm", True), pytest.param("rmsnorm", True, marks=pytest.mark.slow),
                                                pytest.param("layernorm", False, marks=pytest.mark.slow),
                                                pytest.param("rmsnorm", False, marks=pytest.mark.slow)])
def test_onnx_runtimes_float16_conversion(exported, norm, keep_io_types):
    """ONNX Runtime's fp32 -> fp16 converter, as its docs use it: with keep_io_types the input is
    cast to fp16 in front of the first norm. For the onnxruntime target that norm is left as the
    LayerNormalization it already is, without a rejection saying the cast does not widen."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from models import preset
    from models import count_norms

    import onnx_graphsurgeon as gs

    # the converter appends its input casts after the nodes that read them; ONNX Runtime runs that,
    # onnx's evaluator needs the nodes in order (the rewriter puts them in order itself)
    model = convert_float_to_float16(onnx.load(str(exported(norm))), keep_io_types=keep_io_types)
    norms, residuals = count_norms(preset("tiny", norm))
    x = np.random.default_rng(0).standard_normal((2, 5, 64)).astype(np.float32 if keep_io_types else np.float16)
    (expected,) = run_model(gs.export_onnx(gs.import_onnx(model).toposort()), {"hidden_states": x})
    for target in ("tensorrt", "onnxruntime"):
        out, report = rewrite_model(model, target=target)
        assert not report.rejected, [(r.nodes, r.reason) for r in report.rejected]
        assert sum(f.residual for f in report.fusions) == residuals
        # the onnxruntime target leaves a lone LayerNormalization alone: it is that target's op already
        assert report.fused == norms - (target == "onnxruntime" and norm == "layernorm")
        (actual,) = run_model(out, {"hidden_states": x})
        assert GRAPH["float16"].passes(actual.astype(np.float32), expected.astype(np.float32))


def _shapes_inferred_and_saved(model):
    """onnx's inference without data propagation, saved: what simplifiers and `polygraphy surgeon
    sanitize` leave, with placeholder dims (`unk__57`) wherever a Reshape's shape is computed."""
    return onnx.shape_inference.infer_shapes(model)


def _constants_as_int64_data(model):
    """Integer Constant nodes as initializers in int64_data rather than raw bytes, as
    onnx.helper.make_tensor and some simplifiers write them."""
    from onnx import helper, numpy_helper

    graph, kept = model.graph, []
    for node in graph.node:
        value = node.attribute[0].t if node.op_type == "Constant" and node.attribute[0].name == "value" else None
        if value is not None and value.data_type == onnx.TensorProto.INT64:
            array = numpy_helper.to_array(value)
            graph.initializer.append(helper.make_tensor(node.output[0], value.data_type, array.shape, array.ravel().tolist()))
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return model


def _slimmed(model):
    import onnxslim

    return onnxslim.slim(model)


TOOLS_SAVED = [(norm, transform) for norm in ("rmsnorm", "layernorm")
               for transform in (_shapes_inferred_and_saved, _constants_as_int64_data, _slimmed)]


@pytest.mark.parametrize("norm,transform", [pytest.param(n, t, marks=pytest.mark.slow) if (n, t) in TOOLS_SAVED[3:5] else (n, t)
                                            for n, t in TOOLS_SAVED],
                         ids=[f"{t.__name__.strip('_')}-{n}" for n, t in TOOLS_SAVED])
def test_torchscript_exports_as_tools_save_them(exported, norm, transform):
    """Every norm and every residual Add is still fused after a tool has rewritten the export.
    Placeholder dims saved by an earlier inference are inferred again (they kept 2 of 4 residual
    Adds out), and small int64_data constants reach the rewriter's own inference (an empty
    raw_data in its copy hid them, and 4 of 5 norms were lost)."""
    from models import preset
    from models import count_norms

    model = transform(onnx.load(str(exported(norm, exporter="torchscript"))))
    norms, residuals = count_norms(preset("tiny", norm))
    before = model.SerializeToString(deterministic=True)
    out, report = rewrite_model(model, target="tensorrt")
    # the caller's model is left as it came, byte for byte: the saved shapes set aside for the rewrite
    # are put back, the fused ops' domain is the output's only, and the name "" onnx-graphsurgeon
    # writes into Constant values is taken out again
    assert model.SerializeToString(deterministic=True) == before
    assert report.fused == norms and sum(f.residual for f in report.fusions) == residuals, \
        report.residual_skipped or [r.reason for r in report.rejected]
    x = np.random.default_rng(0).standard_normal((2, 5, 64)).astype(np.float32)
    (expected,), (actual,) = run_model(model, {"hidden_states": x}), run_model(out, {"hidden_states": x})
    assert GRAPH["float32"].passes(actual, expected)


@pytest.mark.slow  # the default set has it through Hugging Face's LLaMA (test_rewrite_hf_models.py)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_dynamo_exports_without_torchs_optimiser(tmp_path, dtype):
    """torch.onnx.export(dynamo=True, optimize=False), as users write it when the optimiser is slow
    or fails on a large model: the reduction axes are a Reshape of constants, not a constant."""
    from torch.export import Dim

    from models import build_model, count_norms, preset

    config = preset("tiny", "rmsnorm", layers=1, dtype=dtype)
    x = torch.randn(2, 8, config.hidden, dtype=getattr(torch, dtype))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(build_model(config), (x,), dynamo=True, input_names=["hidden_states"],
                                    output_names=["output"], dynamic_shapes={"hidden_states": {0: Dim("batch"), 1: Dim("seq")}},
                                    opset_version=18, optimize=False, verbose=False)
    model = program.model_proto
    assert any(n.op_type == "Reshape" for n in model.graph.node if n.output[0] in
               {i for m in model.graph.node if m.op_type == "ReduceMean" for i in m.input[1:]}), "the spelling changed"
    assert_fused_and_equal(model, *count_norms(config), dtype)
