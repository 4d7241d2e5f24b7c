"""Norms inside local functions and control-flow bodies (If branches, Loop and Scan bodies).

Local functions holding norms are inlined first; bodies are rewritten in place with the same
checks and proofs as the main graph, reading gamma and constants from the enclosing graph, and
refused when their shapes cannot be trusted or a value they read is not a constant.
"""
from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnx
import pytest

from export.rewrite import rewrite_model
from export.rewrite.evaluate import run_model
from export.rewrite.synth import (NormSpec, build, expected_fusions, if_model, loop_model, plain_rms_constants,
                                  plain_rms_nodes, scan_model)
from normops import GRAPH

ort = pytest.importorskip("onnxruntime")

RNG = np.random.default_rng(0)
# ids that are not the bare target name: a "tensorrt" keyword would mark the test as needing TensorRT (conftest)
TARGET_IDS = lambda target: f"to-{target}"  # noqa: E731
X = RNG.standard_normal((2, 5, 16)).astype(np.float32) + 0.3


def ort_run(model: onnx.ModelProto, feeds: dict) -> list:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_same(expected, actual, dtype="float32"):
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert e.shape == a.shape
        assert GRAPH[dtype].passes(a, e), float(np.abs(a.astype(np.float64) - e).max())


def all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from all_nodes(g)


def assert_names_unique(model: onnx.ModelProto):
    """Every node name and every produced tensor name occurs once in the whole model (SSA across scopes)."""
    nodes = [n.name for n in all_nodes(model.graph) if n.name]
    assert len(nodes) == len(set(nodes)), sorted(n for n in nodes if nodes.count(n) > 1)
    produced = [o for n in all_nodes(model.graph) for o in n.output if o]
    assert len(produced) == len(set(produced)), sorted(o for o in produced if produced.count(o) > 1)


def fused_ops(model: onnx.ModelProto) -> list[str]:
    return sorted(n.op_type for n in all_nodes(model.graph)
                  if n.domain in ("normfuse", "com.microsoft") or "Normalization" in n.op_type)


def assert_idempotent(out: onnx.ModelProto, target: str):
    again, report = rewrite_model(out, target=target)
    assert report.fused == 0
    assert fused_ops(again) == fused_ops(out)
    assert len(list(all_nodes(again.graph))) == len(list(all_nodes(out.graph)))


# --- local functions: TorchScript's export_modules_as_functions -------------------------------

def export_with_functions(norm: str, decomposed: bool, tmp_path=None):
    torch = pytest.importorskip("torch")
    from models import preset
    from models import build_model, count_norms
    from normops.torch_modules import LayerNorm, RMSNorm

    config = preset("tiny", norm, layers=2, dtype="float32", decomposed_layernorm=decomposed)
    module = build_model(config, seed=0).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(2, 8, config.hidden),), buffer, dynamo=False,
                          input_names=["hidden_states"], output_names=["out"], opset_version=18,
                          dynamic_axes={"hidden_states": {0: "batch", 1: "seq"}},
                          export_modules_as_functions={RMSNorm, LayerNorm})
    model = onnx.load_from_string(buffer.getvalue())
    return model, count_norms(config), config.hidden


@pytest.fixture(scope="module", params=[("rmsnorm", False), ("layernorm", True)], ids=["rmsnorm", "layernorm-spelled"])
def function_export(request):
    return export_with_functions(*request.param)


def test_function_export_is_what_it_claims(function_export):
    model, (norms, _), _ = function_export
    assert {f.name.split(".")[0] for f in model.functions} <= {"RMSNorm", "LayerNorm"} and model.functions
    calls = [n for n in model.graph.node if n.domain == model.functions[0].domain]
    assert len(calls) == norms  # every norm is a call: nothing to fuse in the main graph itself
    assert not any(n.op_type == "ReduceMean" for n in model.graph.node)


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"], ids=TARGET_IDS)
def test_functions_inlined_and_every_norm_fused(function_export, target):
    model, (norms, residuals), hidden = function_export
    out, report = rewrite_model(model, target=target)
    assert report.fused == norms, [r.reason for r in report.rejected]
    assert sum(f.residual for f in report.fusions) == residuals
    assert not out.functions
    assert {e.domain for e in out.opset_import} & {f.domain for f in model.functions} == set()
    assert report.notes[0].startswith("inlined local function(s) normops.torch_modules::")
    assert "they hold norm ops (ReduceMean)" in report.notes[0]
    assert_names_unique(out)
    feeds = {"hidden_states": RNG.standard_normal((2, 3, hidden)).astype(np.float32)}
    expected = ort_run(model, feeds)
    actual = ort_run(out, feeds) if target == "onnxruntime" else run_model(out, feeds)
    assert_same(expected, actual)
    assert_idempotent(out, target)


def test_only_functions_holding_norms_are_inlined():
    """Block calls RMSNorm (inlined with it); SwiGLU holds no norm and stays a function."""
    torch = pytest.importorskip("torch")
    from models import preset
    from models import build_model, count_norms
    from models.blocks import SwiGLU
    from normops.torch_modules import RMSNorm

    config = preset("tiny", "rmsnorm", layers=1, dtype="float32")
    module = build_model(config, seed=0).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(2, 8, config.hidden),), buffer, dynamo=False, input_names=["h"],
                          output_names=["o"], opset_version=18,
                          export_modules_as_functions={RMSNorm, SwiGLU, type(module.layers[0])})
    model = onnx.load_from_string(buffer.getvalue())
    assert sorted(f.name for f in model.functions) == ["Block", "RMSNorm", "RMSNorm.1", "SwiGLU"]
    out, report = rewrite_model(model, target="onnxruntime")
    assert report.fused == count_norms(config)[0]
    assert [f.name for f in out.functions] == ["SwiGLU"]
    assert "models.blocks::Block (1 call)" in report.notes[0]
    assert "left 1 local function(s) without norm ops as they are" in report.notes
    feeds = {"h": RNG.standard_normal((2, 8, config.hidden)).astype(np.float32)}
    assert_same(ort_run(model, feeds), ort_run(out, feeds))


def test_functions_without_norms_are_left_alone():
    model = build(NormSpec(kind="rms"))
    body = onnx.helper.make_function("local", "Act", ["a"], ["b"], [onnx.helper.make_node("Relu", ["a"], ["b"])],
                                     [onnx.helper.make_opsetid("", 18)])
    y = model.graph.output[0].name
    model.graph.node.append(onnx.helper.make_node("Act", [y], ["activated"], domain="local"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("activated", onnx.TensorProto.FLOAT, None))
    model.functions.append(body)
    model.opset_import.append(onnx.helper.make_opsetid("local", 1))
    out, report = rewrite_model(model)
    assert report.fused == 1
    assert [f.name for f in out.functions] == ["Act"]
    assert "left 1 local function(s) as they are: none holds a norm op" in report.notes


def test_function_of_another_opset_is_not_inlined():
    model, _, _ = export_with_functions("rmsnorm", False)
    for f in model.functions:
        del f.opset_import[:]
        f.opset_import.append(onnx.helper.make_opsetid("", 17))
    out, report = rewrite_model(model)
    assert report.fused == 0 and len(out.functions) == len(model.functions)
    assert any("not inlined: it imports opset 17, the model 18" in n for n in report.notes)


def test_inlining_reads_no_external_weights(tmp_path):
    model, (norms, _), _ = export_with_functions("rmsnorm", False)
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.data", size_threshold=0)
    light = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    external = {t.name for t in light.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert external
    out, report = rewrite_model(light)
    assert report.fused == norms
    for t in out.graph.initializer:
        if t.name in external:
            assert t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data


# --- If branches ---------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime", "onnx"], ids=TARGET_IDS)
def test_if_branch_norm_fused_and_near_miss_refused(target):
    """then: RMSNorm with gamma from the enclosing graph; else: LayerNorm over axis 0 (must stay)."""
    model = if_model(NormSpec(kind="rms"), NormSpec(kind="layer", mutation="wrong_axis"))
    out, report = rewrite_model(model, target=target)
    assert report.fused == 1
    assert report.fusions[0].scope == "main/If 'branch'.then_branch"
    assert report.fusions[0].kind == "RMSNorm"
    assert [r.scope for r in report.rejected] == ["main/If 'branch'.else_branch"]
    assert "reduces over axis 0, not the last axis" in report.rejected[0].reason
    else_branch = next(a.g for a in out.graph.node[0].attribute if a.name == "else_branch")
    assert sum(n.op_type == "ReduceMean" for n in else_branch.node) == 2  # untouched
    then_branch = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    fused = [n for n in then_branch.node if n.op_type in ("RMSNorm", "SimplifiedLayerNormalization", "RMSNormalization")]
    assert len(fused) == 1 and fused[0].input[1] == "outer_gamma"  # read from the enclosing graph
    assert "outer_gamma" in {t.name for t in out.graph.initializer}  # and still held there, once
    assert "outer_gamma" not in {t.name for a in out.graph.node[0].attribute for t in a.g.initializer}
    assert_names_unique(out)
    if target == "onnx":
        assert {(e.domain, e.version) for e in out.opset_import} == {("", 23)}
        onnx.checker.check_model(out, full_check=True)
    elif target == "onnxruntime":
        assert {e.domain for e in out.opset_import} == {""}
    else:
        assert ("normfuse", 1) in {(e.domain, e.version) for e in out.opset_import}
    for cond in (True, False):
        feeds = {"x": X, "cond": np.array(cond)}
        actual = ort_run(out, feeds) if target == "onnxruntime" else run_model(out, feeds)
        assert_same(ort_run(model, feeds), actual)
    assert_idempotent(out, target)


BRANCH_SPECS = [NormSpec(kind=kind, mutation=mutation, inverse=inverse)
                for kind in ("rms", "layer") for mutation in (None, "wrong_axis", "two_axes", "pow3")
                for inverse in ("div", "pow")]
BRANCH_SPECS += [NormSpec(kind="rms", dtype="float16", casts="llama"), NormSpec(kind="layer", dtype="float16", casts="t5"),
                 NormSpec(kind="rms", positive_axis=True, axes_input=False), NormSpec(kind="rms", epsilon=1e-2),
                 NormSpec(kind="rms", dtype="float16", casts="factor")]


@pytest.mark.parametrize("spec", BRANCH_SPECS, ids=NormSpec.describe)
def test_branch_norms_and_near_misses(spec):
    """The same spelling in both branches fuses exactly when it does in a main graph, and computes the same."""
    model = if_model(spec, spec, outer_gamma=False)
    out, report = rewrite_model(model)
    assert report.fused == 2 * expected_fusions(spec), [r.reason for r in report.rejected]
    if not expected_fusions(spec):
        assert len(report.rejected) == 2 and fused_ops(out) == []
    x = X.astype(np.float16) if spec.dtype == "float16" else X
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        assert_same(run_model(model, feeds), run_model(out, feeds), spec.dtype)


def test_if_branch_epsilon_from_an_outer_input_is_refused():
    model = if_model(NormSpec(kind="rms", mutation="eps_input"), NormSpec(kind="layer"))
    out, report = rewrite_model(model)
    assert [f.scope for f in report.fusions] == ["main/If 'branch'.else_branch"]
    assert any("epsilon is not a constant (tensor 'epsilon_input')" in r.reason and r.scope.endswith("then_branch")
               for r in report.rejected)


def test_if_branch_epsilon_overridable_initializer_is_refused():
    model = if_model(NormSpec(kind="rms"), NormSpec(kind="layer"))
    then_branch = model.graph.node[0].attribute[0].g if model.graph.node[0].attribute[0].name == "then_branch" \
        else model.graph.node[0].attribute[1].g
    eps = next(n for n in then_branch.node if n.op_type == "Add").input[1]
    moved = next(t for t in then_branch.initializer if t.name == eps)
    model.graph.initializer.append(moved)  # epsilon now lives in the enclosing graph, as an input default
    model.graph.input.append(onnx.helper.make_tensor_value_info(eps, onnx.TensorProto.FLOAT, []))
    then_branch.initializer.remove(moved)
    out, report = rewrite_model(model)
    assert [f.scope for f in report.fusions] == ["main/If 'branch'.else_branch"]
    assert any("also a graph input" in r.reason for r in report.rejected)
    assert eps in {i.name for i in out.graph.input}


def test_outer_intermediate_read_by_a_branch_is_not_fused():
    """A norm of the main graph whose variance a branch also reads: the norm's intermediates are not private."""
    model = build(NormSpec(kind="rms"))
    variance = next(n for n in model.graph.node if n.op_type == "ReduceMean").output[0]
    branch = onnx.helper.make_graph([onnx.helper.make_node("Identity", [variance], ["v"])], "b", [],
                                    [onnx.helper.make_tensor_value_info("v", onnx.TensorProto.FLOAT, None)])
    model.graph.input.append(onnx.helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []))
    model.graph.node.append(onnx.helper.make_node("If", ["cond"], ["picked"], then_branch=branch, else_branch=branch))
    model.graph.output.append(onnx.helper.make_tensor_value_info("picked", onnx.TensorProto.FLOAT, None))
    out, report = rewrite_model(model)
    assert report.fused == 0
    assert any("is also used by node" in r.reason for r in report.rejected)


def test_match_reaching_into_the_enclosing_graph_is_refused():
    """Variance computed outside, the rest of the norm inside a branch: not fused as a body norm."""
    spec = NormSpec(kind="rms")
    model = build(spec)
    nodes = list(model.graph.node)
    cut = next(i for i, n in enumerate(nodes) if n.op_type == "ReduceMean") + 1
    y = model.graph.output[0].name
    branch = onnx.helper.make_graph(nodes[cut:], "rest", [], [onnx.helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, None)])
    del model.graph.node[cut:]
    model.graph.input.append(onnx.helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []))
    model.graph.node.append(onnx.helper.make_node("If", ["cond"], ["picked"], then_branch=branch, else_branch=branch))
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info("picked", onnx.TensorProto.FLOAT, None))
    model.graph.ClearField("value_info")
    out, report = rewrite_model(model)
    assert report.fused == 0
    assert any("reaches into the enclosing graph" in r.reason for r in report.rejected)
    feeds = {"x": X, "cond": np.array(True)}
    assert_same(ort_run(model, feeds), ort_run(out, feeds))


# --- Loop and Scan bodies --------------------------------------------------------------------

@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"], ids=TARGET_IDS)
def test_loop_body_norms_fused(target):
    """The loop-carried state's norm (shape declared and kept) and the enclosing x's LayerNorm without bias."""
    model = loop_model(NormSpec(kind="rms"), NormSpec(kind="layer", bias=False, inverse="div"))
    out, report = rewrite_model(model, target=target)
    assert sorted(f.kind for f in report.fusions) == ["LayerNorm", "RMSNorm"], [r.reason for r in report.rejected]
    assert {f.scope for f in report.fusions} == {"main/Loop 'loop'.body"}
    assert_names_unique(out)
    feeds = {"x": X, "n": np.array(3, dtype=np.int64)}
    # the reference evaluator stacks a Loop's scan outputs along axis 0 (vstack): compare like with like
    if target == "onnxruntime":
        assert_same(ort_run(model, feeds), ort_run(out, feeds))
    else:
        assert_same(run_model(model, feeds), run_model(out, feeds))
    assert_idempotent(out, target)


@pytest.mark.parametrize("build_model", [lambda: loop_model(NormSpec(kind="rms"), NormSpec(kind="layer"), grow=True),
                                         lambda: scan_model(NormSpec(kind="rms", positive_axis=True), grow=True)],
                         ids=["loop", "scan"])
def test_body_whose_state_changes_shape_is_refused(build_model):
    """The state comes back with one more axis: the shapes inferred in the body hold in the first
    iteration only (a positive axis that is last there is not last later), so nothing is fused."""
    model = build_model()
    out, report = rewrite_model(model)
    assert report.fused == 0
    assert report.rejected and all("is not shown to be the same in every iteration" in r.reason for r in report.rejected)
    assert fused_ops(out) == []


def test_scan_body_norm_with_residual_fused():
    model = scan_model(NormSpec(kind="layer", dtype="float32"))
    out, report = rewrite_model(model)
    assert [(f.kind, f.scope) for f in report.fusions] == [("AddLayerNorm", "main/Scan 'scan'.body")]
    feeds = {"s0": X[0, :2], "xs": RNG.standard_normal((3, 2, 16)).astype(np.float32)}
    assert_same(ort_run(model, feeds), run_model(out, feeds))
    assert_idempotent(out, "tensorrt")


def test_nested_if_inside_loop():
    """An If in a Loop body, each branch with a norm of the loop's state: both fused, two scopes deep."""
    model = loop_model(NormSpec(kind="rms"), NormSpec(kind="layer"))
    inner = if_model(NormSpec(kind="rms", inverse="div"), NormSpec(kind="layer"), outer_gamma=False)
    if_node = inner.graph.node[0]
    for attr in if_node.attribute:  # the branches read the loop's state instead of x
        for node in attr.g.node:
            node.input[:] = ["state_in" if i == "x" else i for i in node.input]
    body = model.graph.node[0].attribute[0].g
    body.input.append(onnx.helper.make_tensor_value_info("unused", onnx.TensorProto.FLOAT, None))
    body.input.pop()
    if_node.input[:] = ["cond_in"]
    if_node.output[:] = ["picked"]
    body.node.append(if_node)
    body.node.append(onnx.helper.make_node("Add", [body.output[2].name, "picked"], ["per_step_total"]))
    body.output[2].name = "per_step_total"
    out, report = rewrite_model(model)
    scopes = sorted(f.scope for f in report.fusions)
    assert scopes == ["main/Loop 'loop'.body", "main/Loop 'loop'.body",
                      "main/Loop 'loop'.body/If 'branch'.else_branch", "main/Loop 'loop'.body/If 'branch'.then_branch"]
    assert_names_unique(out)
    feeds = {"x": X, "n": np.array(2, dtype=np.int64)}
    assert_same(run_model(model, feeds), run_model(out, feeds))
    assert_idempotent(out, "tensorrt")


def test_report_counts_body_fusions():
    model = if_model(NormSpec(kind="rms"), NormSpec(kind="layer"))
    _, report = rewrite_model(model)
    assert report.fused == 2 and report.counts == {"RMSNorm": 1, "LayerNorm": 1}
    assert report.as_dict()["fusions"][0]["scope"].startswith("main/If 'branch'.")


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"], ids=TARGET_IDS)
def test_branch_output_is_the_norm_output(target):
    """fp16 norms whose output is the branch's output itself; the then branch scales in fp32 by an
    fp32 gamma of the enclosing graph, then casts back."""
    model = if_model(NormSpec(kind="rms", dtype="float16", casts="scale_then_cast"),
                     NormSpec(kind="layer", dtype="float16", casts="llama"))
    for attr in model.graph.node[0].attribute:
        identity = attr.g.node[-1]
        attr.g.node.remove(identity)
        attr.g.output[0].name = identity.input[0]
    out, report = rewrite_model(model, target=target)
    assert report.fused == 2, [r.reason for r in report.rejected]
    assert_names_unique(out)
    for cond in (True, False):
        feeds = {"x": X.astype(np.float16), "cond": np.array(cond)}
        assert_same(run_model(model, feeds), run_model(out, feeds), "float16")
    assert_idempotent(out, target)


def test_dynamo_export_of_torch_cond_fuses_the_norm_in_each_branch(tmp_path):
    """torch.cond exports as an ONNX If whose branches hold the two norms; each becomes one op, and
    ONNX Runtime (its own fusions off) computes the same on both branches."""
    import onnxruntime as ort
    import torch

    from normops.torch_modules import LayerNorm, RMSNorm

    class Branching(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rms, self.ln = RMSNorm(16), LayerNorm(16, decomposed=True)

        def forward(self, x, flag):
            return torch.cond(flag.sum() > 0, lambda x: self.rms(x), lambda x: self.ln(x), (x,))

    x, flag = torch.randn(2, 3, 16), torch.ones(1)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Branching(), (x, flag), dynamo=True).save(str(tmp_path / "cond.onnx"))
    model = onnx.load(str(tmp_path / "cond.onnx"))
    assert [n.op_type for n in model.graph.node if n.op_type == "If"] == ["If"]
    out, report = rewrite_model(model, target="onnxruntime")
    assert report.fused == 2 and not report.rejected
    assert {f.scope.rsplit(".", 1)[-1] for f in report.fusions} == {"then_branch", "else_branch"}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sessions = [ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"]) for m in (model, out)]
    for sign in (1.0, -1.0):
        feeds = {"x": x.numpy(), "flag": (sign * flag).numpy()}
        expected, actual = (s.run(None, feeds)[0] for s in sessions)
        assert GRAPH["float32"].passes(actual, expected)


@pytest.mark.parametrize("saved_shapes", [False, True])
def test_a_reshape_to_minus_one_inside_a_branch_keeps_its_residual(saved_shapes):
    """Inside an If branch too, the dim onnx's inference leaves unknown after `x.view(-1, ...)`
    comes from ONNX Runtime's symbolic inference (Optimum's merged decoders hold the whole decoder
    in the branches of one If), also where a tool saved its shapes into the branch with a
    placeholder for that dim (ONNX Runtime's quantisers do: 4 of 8 residual Adds were lost)."""
    from onnx import TensorProto, helper, numpy_helper

    hidden = 8
    then_nodes = [helper.make_node("Shape", ["a"], ["a_shape"], start=1),
                  helper.make_node("Concat", ["minus_one", "a_shape"], ["target"], axis=0),
                  helper.make_node("Reshape", ["a", "target"], ["a2"]),
                  helper.make_node("Relu", ["b"], ["b2"]),
                  helper.make_node("Add", ["a2", "b2"], ["s"]),
                  *plain_rms_nodes("s", "y_then")]
    shape = ["batch", "seq", hidden]
    then_branch = helper.make_graph(then_nodes, "then", [], [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, shape)])
    else_branch = helper.make_graph([helper.make_node("Identity", ["a"], ["y_else"])], "else", [],
                                    [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, shape)])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch)], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("a", TensorProto.FLOAT, shape),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(np.array([-1], np.int64), "minus_one"), *plain_rms_constants(hidden)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if saved_shapes:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        (then_graph,) = [a.g for a in model.graph.node[0].attribute if a.name == "then_branch"]
        (saved,) = [v for v in then_graph.value_info if v.name == "a2"]
        assert saved.type.tensor_type.shape.dim[0].dim_param.startswith("unk__")
    for target in ("tensorrt", "onnxruntime"):
        out, report = rewrite_model(model, target=target)
        assert report.counts == {"AddRMSNorm": 1}, report.residual_skipped
        assert report.fusions[0].scope.endswith("then_branch")
    rng = np.random.default_rng(0)
    feeds = {"c": np.array(True), "a": rng.standard_normal((2, 3, hidden)).astype(np.float32),
             "b": rng.standard_normal((2, 3, hidden)).astype(np.float32)}
    assert_same(ort_run(model, feeds), ort_run(out, feeds))


def _branches_sharing_names_model():
    """Two If branches that each define `shape` and `ones` (as Optimum's merged decoders define
    every name twice): of the 3-D input in one, of the 1-D one in the other. A norm in the main
    graph makes the rewrite write the model out again."""
    from onnx import TensorProto, helper, numpy_helper

    def branch(name: str, of: str):
        nodes = [helper.make_node("Shape", [of], ["shape"]),
                 helper.make_node("ConstantOfShape", ["shape"], ["ones"],
                                  value=numpy_helper.from_array(np.ones(1, np.float32))),
                 helper.make_node("Mul", ["ones", of], [f"y_{name}"]),
                 helper.make_node("ReduceSum", [f"y_{name}"], [f"total_{name}"], keepdims=0)]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"total_{name}", TensorProto.FLOAT, [])])

    norm = plain_rms_nodes("x", "normed", scale=None)
    graph = helper.make_graph(
        [*norm, helper.make_node("If", ["c"], ["total"], then_branch=branch("then", "x"), else_branch=branch("else", "k"))], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8]),
         helper.make_tensor_value_info("k", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("normed", TensorProto.FLOAT, ["batch", "seq", 8])],
        plain_rms_constants(8)[:2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_branches_defining_the_same_names_get_their_own_shapes():
    """onnx's data propagation keeps what it works out by name, so the else branch took the then
    branch's `shape` (the 3-D input's for the 1-D one's): the rewritten model carried shapes
    ONNX Runtime refused to load. Inference now runs with each branch's names made its own."""
    model = _branches_sharing_names_model()
    for target in ("tensorrt", "onnxruntime"):
        out, report = rewrite_model(model, target=target)
        assert report.counts == {"RMSNorm": 1}
        (node,) = [n for n in out.graph.node if n.op_type == "If"]
        for attr in node.attribute:  # each branch keeps its own names and its own shapes
            shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in attr.g.value_info}
            assert shapes["ones"] == (["batch", "seq", 8] if attr.name == "then_branch" else [4]), (attr.name, shapes)
    rng = np.random.default_rng(0)
    for c in (True, False):
        feeds = {"c": np.array(c), "x": rng.standard_normal((2, 3, 8)).astype(np.float32),
                 "k": rng.standard_normal(4).astype(np.float32)}
        assert_same(ort_run(model, feeds), ort_run(out, feeds))


def test_the_evaluator_runs_a_branch_that_reads_a_later_node():
    """ONNX Runtime sorts the nodes itself, so tools leave some out of order (its fp16 converter
    appends the input casts after the nodes reading them); the evaluator's ordering counts what a
    branch reads from the graph around it too."""
    from onnx import TensorProto, helper

    from export.rewrite.evaluate import in_order

    def branch(name):
        return helper.make_graph([helper.make_node("Neg" if name == "then" else "Identity", ["t"], [f"y_{name}"])], name, [],
                                 [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, [2])])

    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch("then"), else_branch=branch("else")),
         helper.make_node("Relu", ["x"], ["t"])], "late",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []), helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert [n.op_type for n in in_order(model).graph.node] == ["Relu", "If"]
    x = np.array([-1.0, 2.0], np.float32)
    np.testing.assert_array_equal(run_model(model, {"c": np.array(True), "x": x})[0], [-0.0, -2.0])
    np.testing.assert_array_equal(ort_run(model, {"c": np.array(False), "x": x})[0], [0.0, 2.0])
