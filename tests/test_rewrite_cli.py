"""The command line, the report, external weights, ORT's fused inputs and the onnx target's opset."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from export.errors import NormfuseError
from export.rewrite import rewrite_file, rewrite_model
from export.rewrite.__main__ import main
from export.rewrite.evaluate import run_model
from export.rewrite.synth import NormSpec, build, plain_rms_constants, plain_rms_nodes, random_feeds
from normops import GRAPH

ROOT = Path(__file__).resolve().parents[1]


def scale_graph(bench_script):
    """bench/rewrite_scale.py's graph builder, loaded from its file: bench/ is never put on sys.path
    for the session, where its kernels.py would shadow the `kernels` package transformers imports."""
    scale = bench_script("rewrite_scale")
    return scale.DATA_NAME, scale.build_llama_graph


def save(model, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def test_cli_writes_model_and_report(tmp_path, capsys):
    src = save(build(NormSpec(kind="layer", residual="exposed")), tmp_path / "in.onnx")
    code = main([str(src), "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "r.json")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "fused 1 norm(s) (1 AddLayerNorm) for target tensorrt" in printed
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["fused"] == 1 and report["fusions"][0]["residual"] and report["fusions"][0]["nodes_removed"]
    assert [n.op_type for n in onnx.load(str(tmp_path / "out.onnx")).graph.node] == ["AddLayerNorm", "Relu"]


def test_a_dry_run_says_what_would_be_fused_and_writes_no_model(tmp_path, capsys):
    """--dry-run: the fusions and refusals with their reasons (and --report), for a file or a
    folder, and no model written; -o with it, or neither, is a one-line flag error."""
    folder = tmp_path / "models"
    folder.mkdir()
    save(build(NormSpec(kind="layer", residual="exposed")), folder / "a.onnx")
    save(build(NormSpec(mutation="wrong_axis")), folder / "b.onnx")
    assert main([str(folder / "a.onnx"), "--dry-run", "--report", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert "would fuse 1 norm(s) (1 AddLayerNorm) for target tensorrt" in printed and "nothing written" in printed
    assert json.loads((tmp_path / "r.json").read_text())["fused"] == 1
    assert main([str(folder), "--dry-run", "--report", str(tmp_path / "folder.json")]) == 0
    printed = capsys.readouterr().out
    assert "b.onnx: would fuse 0 norm(s)" in printed and "not the last axis" in printed
    assert sorted(json.loads((tmp_path / "folder.json").read_text())["models"]) == ["a.onnx", "b.onnx"]
    assert sorted(p.name for p in folder.iterdir()) == ["a.onnx", "b.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.json", "models", "r.json"]
    for args, message in (([], "required: -o/--output (or --dry-run"), (["--dry-run", "-o", "x.onnx"], "--dry-run writes no model")):
        with pytest.raises(SystemExit) as exit_:
            main([str(folder / "a.onnx"), *args])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_an_excluded_norm_is_left_as_written_and_an_unknown_name_is_refused(tmp_path, capsys):
    """--exclude TENSOR: the norm ending there stays as written (no part of it fused either), the
    others fuse; a name no norm ends at is a one-line error before anything is written; in a folder
    the name need only be in one model."""
    folder = tmp_path / "models"
    folder.mkdir()
    first, second = build(NormSpec(kind="layer")), build(NormSpec(kind="rms"))
    save(first, folder / "a.onnx")
    save(second, folder / "b.onnx")
    y = first.graph.output[0].name
    assert main([str(folder / "a.onnx"), "-o", str(tmp_path / "a.onnx"), "--exclude", y]) == 0
    assert "left the norm ending at" in capsys.readouterr().out
    assert [n.op_type for n in onnx.load(str(tmp_path / "a.onnx")).graph.node] == [n.op_type for n in first.graph.node]
    assert main([str(folder / "b.onnx"), "-o", str(tmp_path / "b.onnx"), "--exclude", y]) == 2
    err = capsys.readouterr().err
    assert f"--exclude {y}: no norm that would be fused ends at a tensor of that name" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b.onnx").exists()
    assert main([str(folder), "-o", str(tmp_path / "out"), "--exclude", y]) == 0  # a.onnx has it
    assert [n.op_type for n in onnx.load(str(tmp_path / "out" / "b.onnx")).graph.node] == ["RMSNorm"]
    assert main([str(folder), "--dry-run", "--exclude", "nowhere"]) == 2
    capsys.readouterr()
    # a folder's unknown name is refused before any of its models is written
    assert main([str(folder), "-o", str(tmp_path / "none"), "--exclude", y, "--exclude", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert "--exclude nowhere: no norm that would be fused ends at a tensor of that name" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())


def test_cli_exits_zero_when_nothing_fuses_and_lists_rejections(tmp_path, capsys):
    src = save(build(NormSpec(mutation="wrong_axis")), tmp_path / "in.onnx")
    assert main([str(src), "-o", str(tmp_path / "out.onnx"), "--no-residual", "--target", "onnxruntime"]) == 0
    out = capsys.readouterr().out
    assert "fused 0 norm(s)" in out and "rejected" in out and "not the last axis" in out


def test_cli_one_line_errors(tmp_path):
    garbage = tmp_path / "bad.onnx"
    garbage.write_bytes(b"not a model")
    for args in ([str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o.onnx")],
                 [str(garbage), "-o", str(tmp_path / "o.onnx")],
                 [str(save(build(NormSpec()), tmp_path / "ok.onnx")), "-o", "/proc/normfuse/o.onnx"],
                 [str(tmp_path / "ok.onnx"), "-o", str(tmp_path / "o.onnx"), "--target", "tensorflow"]):
        run = subprocess.run([sys.executable, "-m", "export.rewrite", *args], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode != 0, args
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("normfuse: error:"), run.stderr


def test_external_weights_are_never_read_and_are_shared_beside_the_source(tmp_path, bench_script):
    DATA_NAME, build_llama_graph = scale_graph(bench_script)

    src = build_llama_graph(tmp_path, layers=2, hidden=64, ffn=96)
    (tmp_path / DATA_NAME).write_bytes(b"")  # still there, but any read of a weight byte would now fail
    report = rewrite_file(src, tmp_path / "fused.onnx")
    assert report.counts == {"RMSNorm": 1, "AddRMSNorm": 4}
    assert not any("external data" in note for note in report.notes)
    fused = onnx.load(str(tmp_path / "fused.onnx"), load_external_data=False)
    locations = {e.value for t in fused.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {DATA_NAME} and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["llama.onnx", "fused.onnx", DATA_NAME])


def test_a_model_saved_one_file_per_tensor_is_copied_with_one_note(exported, tmp_path):
    """onnx.save(all_tensors_to_one_file=False), as older exporters wrote large models: every file
    is copied beside an output written elsewhere, and the notes say so once, not per file."""
    import onnxruntime as ort

    (tmp_path / "src").mkdir()
    source = tmp_path / "src" / "model.onnx"
    onnx.save(onnx.load(str(exported("rmsnorm"))), str(source), save_as_external_data=True,
              all_tensors_to_one_file=False, size_threshold=0)
    out = tmp_path / "elsewhere" / "fused.onnx"
    report = rewrite_file(source, out, target="onnxruntime")
    # the files the output still reads (tensors of a few values, such as axes, are read into it)
    files = {entry.value for t in onnx.load(str(out), load_external_data=False).graph.initializer
             for entry in t.external_data if entry.key == "location"}
    copied = [note for note in report.notes if "copied" in note]
    assert len(files) > 3 and len(copied) == 1 and f"copied {len(files)} files" in copied[0]
    assert all((out.parent / name).read_bytes() == (tmp_path / "src" / name).read_bytes() for name in files)
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def test_a_model_rewritten_elsewhere_loads_its_weights(tmp_path, bench_script):
    """ONNX Runtime and onnx refuse weight locations outside the model's directory ("../"), so an
    output elsewhere gets a copy of the weights beside it, and both load it."""
    import onnxruntime as ort
    DATA_NAME, build_llama_graph = scale_graph(bench_script)

    (tmp_path / "src").mkdir()
    src = build_llama_graph(tmp_path / "src", layers=1, hidden=64, ffn=96)
    for out in (tmp_path / "elsewhere" / "fused.onnx", tmp_path / "src" / "sub" / "fused.onnx"):
        report = rewrite_file(src, out, target="onnxruntime")
        assert any("copied" in note for note in report.notes)
        assert (out.parent / DATA_NAME).read_bytes() == (tmp_path / "src" / DATA_NAME).read_bytes()
        ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])  # reads every weight
        onnx.load(str(out))  # onnx's own checks of the locations
        onnx.load(str(src))  # and the source still loads
        again = rewrite_file(src, out, target="onnxruntime")  # the copy there is the same file: kept
        assert not any("external data" in note for note in again.notes)


def test_another_file_in_the_way_of_the_weights_is_not_overwritten(tmp_path, bench_script):
    DATA_NAME, build_llama_graph = scale_graph(bench_script)

    (tmp_path / "src").mkdir()
    src = build_llama_graph(tmp_path / "src", layers=1, hidden=64, ffn=96)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / DATA_NAME).write_bytes(b"someone else's weights")
    with pytest.raises(NormfuseError, match="already exists"):
        rewrite_file(src, tmp_path / "out" / "fused.onnx")
    assert (tmp_path / "out" / DATA_NAME).read_bytes() == b"someone else's weights"
    assert not (tmp_path / "out" / "fused.onnx").exists()


def _skip_model(centered: bool, use_sum: bool, input_bias: bool = False):
    op = "SkipLayerNormalization" if centered else "SkipSimplifiedLayerNormalization"
    h = 8
    inputs = ["a", "b", "gamma"] + (["beta"] if centered else []) + (["bias"] if input_bias else [])
    outputs = ["y", "", "", "sum"] if use_sum else ["y"]
    nodes = [helper.make_node(op, inputs, outputs, domain="com.microsoft", epsilon=1e-6, name="skip")]
    graph_outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, h])]
    if use_sum:
        nodes.append(helper.make_node("Relu", ["sum"], ["s"], name="relu"))
        graph_outputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, 3, h]))
    inits = [onnx.numpy_helper.from_array(np.linspace(0.5, 1.5, h, dtype=np.float32), "gamma"),
             onnx.numpy_helper.from_array(np.linspace(-0.5, 0.5, h, dtype=np.float32), "beta")][: 2 if centered else 1]
    if input_bias:
        inits.append(onnx.numpy_helper.from_array(np.linspace(-1, 1, h, dtype=np.float32), "bias"))
    graph = helper.make_graph(nodes, "skip", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, h]) for n in "ab"],
                              graph_outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("centered", (True, False))
@pytest.mark.parametrize("use_sum", (True, False))
@pytest.mark.parametrize("input_bias", (False, True))
def test_ort_skip_norms_become_plugin_ops(centered, use_sum, input_bias):
    model = _skip_model(centered, use_sum, input_bias)
    out, report = rewrite_model(model, target="tensorrt")
    fused = "AddLayerNorm" if centered else "AddRMSNorm"
    assert sorted(n.op_type for n in out.graph.node if n.op_type != "Relu") == (["Add", fused] if input_bias else [fused])
    assert report.fusions[0].sum_exposed is use_sum and report.fusions[0].epsilon == pytest.approx(1e-6)
    feeds = random_feeds(model)
    for e, a in zip(run_model(model, feeds), run_model(out, feeds)):
        assert GRAPH["float32"].passes(a, e)
    for target in ("onnxruntime", "onnx"):
        _, unchanged = rewrite_model(model, target=target)
        assert unchanged.fused == 0 and not unchanged.rejected and "as it is" in unchanged.notes[0]


def test_onnx_target_raises_the_opset_and_says_so():
    model = build(NormSpec(kind="rms"))  # opset 18
    out, report = rewrite_model(model, target="onnx")
    assert [n.op_type for n in out.graph.node] == ["RMSNormalization"]
    assert {o.domain: o.version for o in out.opset_import}[""] == 23
    assert "raised the model's opset from 18 to 23" in report.notes[0]
    old = build(NormSpec(kind="layer", axes_input=False))
    old.opset_import[0].version = 13
    out, report = rewrite_model(old, target="onnx")
    assert [n.op_type for n in out.graph.node] == ["LayerNormalization"] and "version converter" in report.notes[0]


def test_tensorrt_target_keeps_the_models_opset():
    """The plugin ops live in their own domain: an opset-13 LayerNorm (tf2onnx's default) is fused
    without converting the model, which the onnxruntime target's LayerNormalization needs."""
    old = build(NormSpec(kind="layer", axes_input=False))
    old.opset_import[0].version = 13
    out, report = rewrite_model(old, target="tensorrt")
    assert [n.op_type for n in out.graph.node] == ["LayerNorm"] and not report.notes
    assert {o.domain: o.version for o in out.opset_import}[""] == 13
    out, report = rewrite_model(old, target="onnxruntime")
    assert {o.domain: o.version for o in out.opset_import}[""] == 17 and "version converter" in report.notes[0]


def test_onnx_target_refuses_with_the_reason_when_the_opset_cannot_be_raised():
    model = build(NormSpec(kind="rms"))
    gn = helper.make_node("GroupNormalization", ["x", "gs", "gb"], ["g"], num_groups=1)
    model.graph.node.append(gn)
    model.graph.initializer.extend([onnx.numpy_helper.from_array(np.ones(2, np.float32), n) for n in ("gs", "gb")])
    model.graph.output.append(helper.make_tensor_value_info("g", TensorProto.FLOAT, None))
    out, report = rewrite_model(model, target="onnx")  # the input was read: refused fusions are rejections
    assert report.fused == 0 and "GroupNormalization" in report.rejected[0].reason
    assert {o.domain: o.version for o in out.opset_import}[""] == 18
    assert rewrite_model(model, target="onnxruntime")[1].fused == 1


@pytest.mark.parametrize("op", ["DFT", "GridSample"])
def test_onnx_target_raises_ops_that_changed_meaning_through_the_converter(op):
    """DFT's default axis (1, then -2) and GridSample's mode names ('bilinear', then 'linear')
    changed at opset 20: renumbering an opset-18 model to 23 would give DFT another axis and
    GridSample a mode ONNX Runtime refuses. onnx's version converter rewrites them."""
    import onnxruntime as ort

    model = build(NormSpec(kind="rms"))
    f32 = TensorProto.FLOAT
    if op == "DFT":  # its axis left at the default, over a [2, 4, 4, 1] real signal
        model.graph.node.append(helper.make_node("DFT", ["s"], ["spec"]))
        model.graph.input.append(helper.make_tensor_value_info("s", f32, [2, 4, 4, 1]))
        model.graph.output.append(helper.make_tensor_value_info("spec", f32, [2, 4, 4, 2]))
    else:
        model.graph.node.append(helper.make_node("GridSample", ["img", "grid"], ["spec"], mode="bilinear",
                                                 align_corners=1))
        model.graph.input.extend([helper.make_tensor_value_info("img", f32, [1, 1, 4, 4]),
                                  helper.make_tensor_value_info("grid", f32, [1, 3, 3, 2])])
        model.graph.output.append(helper.make_tensor_value_info("spec", f32, [1, 1, 3, 3]))
    assert {o.domain: o.version for o in model.opset_import}[""] == 18
    out, report = rewrite_model(model, target="onnx")
    assert report.fused == 1 and f"version converter, as {op} change(s) meaning" in report.notes[0]
    assert {o.domain: o.version for o in out.opset_import}[""] == 23
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.uniform(-1, 1, [d.dim_value or 2 for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in model.graph.input}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    run = [ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(["spec"], feeds)[0]
           for m in (model, out)]
    np.testing.assert_allclose(run[1], run[0], rtol=1e-5, atol=1e-6)


def test_proof_rejects_what_the_checks_cannot_see(monkeypatch):
    """Disable one check: the numerical proof alone must still refuse a wrong-axis norm."""
    from export.rewrite import checks

    monkeypatch.setattr(checks, "_check_reduce", lambda node, rank: None)
    _, report = rewrite_model(build(NormSpec(mutation="wrong_axis")))
    assert report.fused == 0 and any("numerical proof failed" in r.reason for r in report.rejected)


@pytest.mark.parametrize("kind", ("rms", "layer"))
def test_graphs_onnxruntime_optimised_become_plugin_ops(kind, tmp_path):
    """A graph that ONNX Runtime's optimizer fused into its contrib ops is taken over for TensorRT."""
    optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")
    spec = NormSpec(kind=kind, residual="exposed", square="pow", inverse="div" if kind == "layer" else "sqrt_reciprocal")
    model = build(spec, leading=("batch", 5))
    src = save(model, tmp_path / "in.onnx")
    optimised = optimizer.optimize_model(str(src), model_type="bert", num_heads=0, hidden_size=0, opt_level=0).model
    assert any(n.domain == "com.microsoft" for n in optimised.graph.node)
    out, report = rewrite_model(optimised, target="tensorrt")
    assert report.counts == {("AddLayerNorm" if kind == "layer" else "AddRMSNorm"): 1}
    feeds = random_feeds(model)
    for e, a in zip(run_model(model, feeds), run_model(out, feeds)):
        assert GRAPH["float32"].passes(a, e)


def test_contrib_op_shapes_come_from_onnx_runtimes_inference_without_importing_torch(tmp_path):
    """Past ONNX Runtime's contrib ops onnx's inference knows no shapes; ORT's symbolic inference
    gives them, loaded from its own file so that the rewrite command does not pay for the torch
    import its package's __init__ makes (seconds)."""
    optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")
    model = build(NormSpec(kind="rms", residual="exposed", square="pow", inverse="sqrt_reciprocal"), leading=("batch", 5))
    optimised = optimizer.optimize_model(str(save(model, tmp_path / "in.onnx")), model_type="bert", num_heads=0,
                                         hidden_size=0, opt_level=0).model
    (contrib,) = [n for n in optimised.graph.node if n.domain == "com.microsoft"]
    del optimised.graph.value_info[:]  # (onnx's inference refuses this graph: no opset for com.microsoft)
    from export.rewrite.symbolic import symbolic_shapes

    inferred = {v.name: v for v in symbolic_shapes(optimised).graph.value_info}
    dims = inferred[contrib.output[0]].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims][-1] == model.graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    probe = ("import sys; from export.rewrite.symbolic import _sound_inference as f; "
             "assert hasattr(f(), 'infer_shapes'); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stdout + done.stderr


def _residual_rms_model(second_operand_nodes, second_input_shape, contrib_op: bool):
    """a2 + b2 in front of a spelled-out RMSNorm of hidden 8, where the given nodes make a2 of a
    and b2 of b; optionally a contrib op after the norm."""
    hidden = 8
    nodes = [*second_operand_nodes, helper.make_node("Add", ["a2", "b2"], ["s"]),
             *plain_rms_nodes("s", "y0" if contrib_op else "y")]
    opsets = [helper.make_opsetid("", 18)]
    if contrib_op:
        nodes.append(helper.make_node("FastGelu", ["y0"], ["y"], domain="com.microsoft"))
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    a_shape = ["batch", "seq", hidden] if len(second_input_shape) == 3 else ["batch", hidden]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, a_shape),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, second_input_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], plain_rms_constants(hidden))
    return helper.make_model(graph, opset_imports=opsets)


def test_a_dim_that_may_be_one_is_never_merged_into_a_residual():
    """b's rows ('other') may be 1 at run time, so relu(a) + relu(b) may broadcast and stays outside the
    fused op, also where ONNX Runtime's symbolic inference runs (a contrib op in the graph): with
    its auto-merge it declared 'other' equal to 'batch', the Add was fused, and the fused graph
    failed on ONNX Runtime with b of one row."""
    relus = [helper.make_node("Relu", ["a"], ["a2"]), helper.make_node("Relu", ["b"], ["b2"])]
    model = _residual_rms_model(relus, ["other", 8], contrib_op=True)
    out, report = rewrite_model(model, target="tensorrt")
    assert report.counts == {"RMSNorm": 1}
    (skipped,) = report.residual_skipped
    assert "cannot be shown equal" in skipped["reason"], skipped
    fused, _ = rewrite_model(model, target="onnxruntime")
    import onnxruntime as ort

    feeds = {"a": np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32),
             "b": np.random.default_rng(1).standard_normal((1, 8)).astype(np.float32)}
    expected = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    got = ort.InferenceSession(fused.SerializeToString()).run(None, feeds)[0]
    assert GRAPH["float32"].passes(got, expected)


def test_a_reshape_to_minus_one_keeps_the_residual_it_feeds():
    """TorchScript exports write `x.view(-1, seq, hidden)`: onnx's inference leaves that dim
    unknown, ONNX Runtime's symbolic inference works it out (batch * seq * 8 / (seq * 8) = batch),
    so the Add of it and another [batch, seq, 8] tensor is a residual (GPT-2 exported by Optimum:
    2 of 5 residual Adds fused before, 5 of 5 now)."""
    reshape = [helper.make_node("Shape", ["a"], ["a_shape"], start=1),
               helper.make_node("Concat", ["minus_one", "a_shape"], ["target"], axis=0),
               helper.make_node("Reshape", ["a", "target"], ["a2"]),
               helper.make_node("Relu", ["b"], ["b2"])]
    model = _residual_rms_model(reshape, ["batch", "seq", 8], contrib_op=False)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([-1], np.int64), "minus_one"))
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    (a2,) = [v for v in inferred.graph.value_info if v.name == "a2"]
    assert not a2.type.tensor_type.shape.dim[0].dim_param.startswith("batch")  # onnx alone cannot tell
    out, report = rewrite_model(model, target="tensorrt")
    assert report.counts == {"AddRMSNorm": 1}, report.residual_skipped
    feeds = {"a": np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32),
             "b": np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)}
    assert GRAPH["float32"].passes(run_model(out, feeds)[0], run_model(model, feeds)[0])


def test_shape_inference_copy_leaves_in_memory_weights_behind():
    """The skeleton shape inference runs on keeps small constants and stubs out the rest, judged
    by their dims: reading a weight's bytes to size it would copy every weight."""
    from export.rewrite.rewriter import SKELETON_CONSTANT, _copy_without_weights

    model = build(NormSpec(hidden=16))
    big = onnx.numpy_helper.from_array(np.ones((SKELETON_CONSTANT + 1,), np.float32), "big")
    model.graph.initializer.append(big)
    skeleton = onnx.ModelProto()
    _copy_without_weights(model, skeleton)
    stubs = {t.name: t for t in skeleton.graph.initializer}
    assert not stubs["big"].raw_data and stubs["big"].data_location == onnx.TensorProto.EXTERNAL
    assert list(stubs["big"].dims) == [SKELETON_CONSTANT + 1]
    for small in model.graph.initializer[:-1]:
        assert stubs[small.name].raw_data == small.raw_data


@pytest.mark.parametrize("which", ("eps", "axes"))
def test_initializers_that_are_graph_inputs_are_not_constants(which):
    """An initializer listed as a graph input is a default the caller may override: an epsilon or
    axes given that way cannot be proven, and the input stays in the rewritten graph."""
    model = build(NormSpec(kind="rms"))
    op = "Add" if which == "eps" else "ReduceMean"
    name = next(n for n in model.graph.node if n.op_type == op).input[1]
    value = next(t for t in model.graph.initializer if t.name == name)
    model.graph.input.append(helper.make_tensor_value_info(name, value.data_type, list(value.dims)))
    out, report = rewrite_model(model)
    assert report.fused == 0 and any("overridden at run time" in r.reason for r in report.rejected)
    assert [i.name for i in out.graph.input] == ["x", name]
    gamma = next(t.name for t in model.graph.initializer if len(t.dims) == 1 and t.dims[0] == 16)
    model = build(NormSpec(kind="rms"))
    model.graph.input.append(helper.make_tensor_value_info(gamma, TensorProto.FLOAT, [16]))
    out, report = rewrite_model(model)  # a scale given that way is data the fused op reads: fused
    assert report.fused == 1 and [i.name for i in out.graph.input] == ["x", gamma]
    assert [n.op_type for n in out.graph.node] == ["RMSNorm"] and gamma in out.graph.node[0].input


def test_gemma_weight_that_is_a_graph_input_is_not_folded():
    model = build(NormSpec(kind="rms", scale="gemma"))
    add = next(n for n in model.graph.node if n.op_type == "Add" and n.output[0] in
               {i for m in model.graph.node if m.op_type == "Mul" for i in m.input})
    w = next(t for t in model.graph.initializer if t.name in add.input and len(t.dims) == 1 and t.dims[0] == 16)
    model.graph.input.append(helper.make_tensor_value_info(w.name, TensorProto.FLOAT, [16]))
    out, report = rewrite_model(model)
    assert report.fused == 1 and any("also a graph input" in note for note in report.notes)
    assert sorted(n.op_type for n in out.graph.node) == ["Add", "RMSNorm"] and w.name in [i.name for i in out.graph.input]


def _overridable_norm(kind: str, weight_shape: list[int]):
    """x [2, 3, 16] normalised over its last axis, scaled (and shifted for "layer") by initializers
    of `weight_shape` that are graph inputs too; kind "l2" divides by sqrt(sum of squares + eps)."""
    from onnx import numpy_helper

    hidden, n = 16, helper.make_node
    inits = [numpy_helper.from_array(np.array(v, np.float32), name) for name, v in (("two", 2.0), ("eps", 1e-5))]
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "axes"))
    names = ["g", "b"] if kind == "layer" else ["g"]
    inits += [numpy_helper.from_array(np.linspace(0.5, 1.5, hidden).astype(np.float32).reshape(weight_shape) + k, name)
              for k, name in enumerate(names)]
    source = "x"
    nodes = []
    if kind == "layer":
        nodes += [n("ReduceMean", ["x", "axes"], ["mean"]), n("Sub", ["x", "mean"], ["centred"])]
        source = "centred"
    nodes += [n("Pow", [source, "two"], ["squares"]),
              n("ReduceSum" if kind == "l2" else "ReduceMean", ["squares", "axes"], ["stat"]),
              n("Add", ["stat", "eps"], ["stat_eps"]), n("Sqrt", ["stat_eps"], ["root"]),
              n("Div", [source, "root"], ["normed"]), n("Mul", ["normed", "g"], ["y" if kind != "layer" else "scaled"])]
    if kind == "layer":
        nodes.append(n("Add", ["scaled", "b"], ["y"]))
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", f32, [2, 3, hidden])] +
                              [helper.make_tensor_value_info(name, f32, weight_shape) for name in names],
                              [helper.make_tensor_value_info("y", f32, [2, 3, hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), names


@pytest.mark.parametrize("target", ["onnxruntime", "onnx"])
@pytest.mark.parametrize("kind,weight_shape", [("rms", [1, 16]), ("layer", [1, 16]), ("l2", [16])])
def test_a_scale_a_caller_may_override_is_read_by_the_fused_op_not_copied(kind, weight_shape, target):
    """A [1, H] scale is flattened, and an L2 norm's scale multiplied by 1/sqrt(H), for the fused op:
    where the scale is also a graph input that is done by nodes, so the input stays and a value fed
    for it still counts (a copy in memory dropped the input, and the fed value was refused)."""
    import onnxruntime as ort

    model, names = _overridable_norm(kind, weight_shape)
    out, report = rewrite_model(model, target=target)
    assert report.fused == 1 and [i.name for i in out.graph.input] == ["x", *names]
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 3, 16)).astype(np.float32),
             **{name: np.full(weight_shape, 3.0 + k, np.float32) for k, name in enumerate(names)}}
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], feeds)[0]
           for m in (model, out)]
    np.testing.assert_allclose(run[1], run[0], rtol=1e-5, atol=1e-5)


def test_a_scale_a_caller_may_override_is_not_copied_inside_a_branch_either():
    """An If's branches read the enclosing graph's [1, H] scale through tensors of their own: those
    are marked too, so the fused ops inside read it by a Reshape and the input stays."""
    import onnxruntime as ort
    from onnx import numpy_helper

    from export.rewrite.synth import if_model

    model = if_model(NormSpec(kind="rms"), NormSpec(kind="rms"))
    gamma = next(t for t in model.graph.initializer if t.name == "outer_gamma")
    row = numpy_helper.to_array(gamma).reshape(1, -1)
    gamma.CopyFrom(numpy_helper.from_array(row, "outer_gamma"))
    model.graph.input.append(helper.make_tensor_value_info("outer_gamma", TensorProto.FLOAT, list(row.shape)))
    out, report = rewrite_model(model, target="onnxruntime")
    assert report.fused == 2 and "outer_gamma" in [i.name for i in out.graph.input]
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 5, row.shape[1])).astype(np.float32),
             "cond": np.array(True), "outer_gamma": np.full(row.shape, 3.0, np.float32)}
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
           for m in (model, out)]
    np.testing.assert_allclose(run[1], run[0], rtol=1e-5, atol=1e-5)


def test_a_mul_by_one_a_caller_may_override_is_no_identity():
    model = build(NormSpec(kind="rms"))
    one = onnx.numpy_helper.from_array(np.array(1.0, np.float32), "one")
    model.graph.initializer.append(one)
    model.graph.input.append(helper.make_tensor_value_info("one", TensorProto.FLOAT, []))
    first = model.graph.node[0]
    times = helper.make_node("Mul", [first.input[0], "one"], ["x_times_one"])
    first.input[0] = "x_times_one"
    model.graph.node.insert(0, times)
    out, report = rewrite_model(model)
    assert not any("Mul(s) by 1" in note for note in report.notes)
    assert "one" in [i.name for i in out.graph.input] and any("one" in n.input for n in out.graph.node)


def test_a_scale_cast_like_a_normalised_value_stays_outside_the_fused_op():
    """Flax writes epsilon as CastLike(eps, x), a constant that goes with the norm; a scale written
    CastLike(w, normed) is read by the fused op, so its CastLike stays, and it must not read the
    value the fusion removes (the rewritten graph read a tensor nothing made)."""
    import onnxruntime as ort

    model, _ = _overridable_norm("rms", [16])
    model.graph.input.pop()  # g: a plain initializer here
    mul = next(n for n in model.graph.node if n.op_type == "Mul")
    mul.input[1] = "g_like"
    model.graph.node.insert(list(model.graph.node).index(mul),
                            helper.make_node("CastLike", ["g", "normed"], ["g_like"]))
    onnx.checker.check_model(model, full_check=True)
    out, report = rewrite_model(model, target="onnxruntime")
    made = {o for n in out.graph.node for o in n.output} | {i.name for i in out.graph.input} | \
        {t.name for t in out.graph.initializer}
    assert all(i in made for n in out.graph.node for i in n.input if i)
    assert report.fused == 1 and [n.op_type for n in out.graph.node] == ["SimplifiedLayerNormalization", "CastLike", "Mul"]
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 16)).astype(np.float32)}
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], feeds)[0]
           for m in (model, out)]
    np.testing.assert_allclose(run[1], run[0], rtol=1e-5, atol=1e-5)


def test_constants_stored_externally_are_read_and_the_norm_fused(tmp_path):
    """A tool that writes every tensor externally (size_threshold=0) puts epsilon and the exponent
    there too; the rewriter reads such tiny tensors (the weights it leaves alone) and fuses."""
    import onnxruntime as ort
    from test_validate_inputs import token_model

    model = onnx.load(str(token_model(tmp_path / "inline.onnx", mask=False)))
    src = tmp_path / "external" / "model.onnx"
    src.parent.mkdir()
    onnx.save(model, str(src), save_as_external_data=True, location="all.bin", size_threshold=0)
    report = rewrite_file(src, src.parent / "fused.onnx", target="onnxruntime")
    assert report.counts == {"RMSNorm": 1} and not report.rejected
    assert any("external tensor(s) of at most" in note for note in report.notes)
    fused = onnx.load(str(src.parent / "fused.onnx"), load_external_data=False)
    external = {t.name for t in fused.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert external == {"embedding"}  # the weight is still only referenced
    feeds = {"ids": np.arange(10, dtype=np.int64).reshape(2, 5)}
    # (ONNX Runtime cannot load the source itself: it needs ReduceMean's axes in the file)
    expected = ort.InferenceSession(str(tmp_path / "inline.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    actual = ort.InferenceSession(str(src.parent / "fused.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert GRAPH["float32"].passes(actual[0], expected[0])


def test_a_model_whose_weight_file_is_missing_is_refused_in_one_line(tmp_path, capsys):
    """Copied without its .data file, a model was rewritten into one pointing at nothing (exit 0),
    and ONNX Runtime's own loader failed later in a long message; every command now refuses it
    first, naming the model and the file, and writes nothing."""
    from test_pipeline import _main
    from test_validate_inputs import token_model

    model = onnx.load(str(token_model(tmp_path / "inline.onnx", mask=False)))
    src = tmp_path / "copied" / "model.onnx"
    src.parent.mkdir()
    onnx.save(model, str(src), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    (src.parent / "model.onnx.data").unlink()
    out = tmp_path / "fused.onnx"
    for module, args in (("export.rewrite", [str(src), "-o", str(out)]), ("export.validate", [str(src), str(src)]),
                         ("export.decode", [str(src)]), ("export.build", ["--onnx", str(src), "--out", str(tmp_path / "b")])):
        code, stderr = _main(module, *args, capsys=capsys)
        assert code == 1 and stderr.strip().splitlines() == [
            f"normfuse: error: {src}: its external data file model.onnx.data is missing (weights are read from beside "
            "the model)"], (module, stderr)
    assert not out.exists() and not (tmp_path / "b" / "report.json").exists()


def test_saved_value_info_without_a_shape_gives_way_to_inference():
    """onnx's version converter saves value_info with a type and no shape (128 of them in the
    PP-OCRv4 recogniser raised from opset 12 to 17). They stood in for the inferred shapes, so
    after the raise every norm was rejected ("rank ... is unknown") and the onnxruntime target
    fused none of the 5 the tensorrt target fused. The model still comes back as it was."""
    nodes = [helper.make_node("Relu", ["a"], ["h"]), *plain_rms_nodes("h", "y")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], plain_rms_constants(8),
                              value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    before = model.SerializeToString()
    out, report = rewrite_model(model, target="tensorrt")
    assert report.counts == {"RMSNorm": 1}, [r.reason for r in report.rejected]
    assert model.SerializeToString() == before
    feeds = {"a": np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)}
    assert GRAPH["float32"].passes(run_model(out, feeds)[0], run_model(model, feeds)[0])


def test_a_folder_is_rewritten_model_by_model_with_its_weights_and_other_files(exported, tmp_path, capsys):
    """Optimum's layout: every *.onnx rewritten under its own name, each model's external weights
    placed beside it, config.json copied, the weight files not copied twice; the output folder may
    not be the input folder, nor a file, and a folder without a model is refused."""
    source = tmp_path / "optimum"
    source.mkdir()
    for name, norm in (("encoder_model", "layernorm"), ("decoder_model_merged", "rmsnorm")):
        onnx.save(onnx.load(str(exported(norm))), str(source / f"{name}.onnx"), save_as_external_data=True,
                  location=f"{name}.onnx_data", size_threshold=256)
    (source / "config.json").write_text('{"decoder_start_token_id": 0}')
    out = tmp_path / "fused"
    assert main([str(source), "-o", str(out), "--target", "onnxruntime"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in source.iterdir())
    assert "wrote 2 model(s)" in capsys.readouterr().out
    for name in ("encoder_model", "decoder_model_merged"):
        model = onnx.load(str(out / f"{name}.onnx"))  # the weights load from beside it
        assert any(n.name.startswith("normfuse_") for n in model.graph.node)
    for bad, message in (([str(source), "-o", str(source)], "is the input folder"),
                         ([str(source), "-o", str(source / "config.json")], "is a file, not a folder")):
        assert main(bad) == 2 and message in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "-o", str(tmp_path / "x")]) == 2
    assert "no .onnx model in this folder" in capsys.readouterr().err and not (tmp_path / "x").exists()
