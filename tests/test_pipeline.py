"""The chain on this project's own exports: rewrite counts, validation (and its failure), the CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.rewrite import rewrite_file
from export.validate import Side, compare
from models import count_norms, preset

ROOT = Path(__file__).resolve().parent.parent
# TorchScript's fp16 export of F.layer_norm mixes fp16 and fp32 in one LayerNormalization, which
# ONNX Runtime refuses; its LayerNorm cases use the written-out form (decomposed=True).
CASES = [(norm, dtype, exporter, decomposed) for norm in ("rmsnorm", "layernorm") for dtype in ("float32", "float16")
         for exporter in ("dynamo", "torchscript")
         for decomposed in ((False, True) if norm == "layernorm" and exporter == "dynamo" else
                            (norm == "layernorm" and exporter == "torchscript",))]


@pytest.mark.parametrize("norm,dtype,exporter,decomposed", CASES)
def test_every_norm_fused_and_validated(exported, tmp_path, norm, dtype, exporter, decomposed):
    extra = {"decomposed_layernorm": True} if decomposed else {}
    reference = exported(norm, dtype, exporter, **extra)
    norms, residuals = count_norms(preset("tiny", norm))
    trt = rewrite_file(reference, tmp_path / "trt.onnx", target="tensorrt")
    assert trt.fused == norms, trt.as_dict()
    assert sum(f.residual for f in trt.fusions) == residuals
    assert not trt.rejected
    ops = {n.op_type for n in onnx.load(str(tmp_path / "trt.onnx")).graph.node}
    assert {"ReduceMean", "LayerNormalization"}.isdisjoint(ops)  # only the norms use these here

    ort_report = rewrite_file(reference, tmp_path / "ort.onnx", target="onnxruntime")
    assert sum(f.residual for f in ort_report.fusions) == residuals
    pairs = compare(Side(reference, "ort-cpu", "reference"), Side(tmp_path / "ort.onnx", "ort-cpu", "fused"),
                    [(1, 5), (2, 33)], dtype)
    pairs += compare(Side(reference, "onnx-reference", "reference"), Side(tmp_path / "trt.onnx", "onnx-reference", "fused"),
                     [(1, 7)], dtype)
    assert all(p["passed"] for p in pairs), pairs


def test_rewriting_twice_changes_nothing(exported, tmp_path):
    first = rewrite_file(exported("rmsnorm"), tmp_path / "once.onnx", target="tensorrt")
    second = rewrite_file(tmp_path / "once.onnx", tmp_path / "twice.onnx", target="tensorrt")
    assert first.fused == 5 and second.fused == 0
    once, twice = onnx.load(str(tmp_path / "once.onnx")), onnx.load(str(tmp_path / "twice.onnx"))
    assert [n.op_type for n in once.graph.node] == [n.op_type for n in twice.graph.node]


def test_validation_fails_on_a_broken_fused_graph(exported, tmp_path):
    reference = exported("layernorm")
    rewrite_file(reference, tmp_path / "fused.onnx", target="onnxruntime")
    model = onnx.load(str(tmp_path / "fused.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "SkipLayerNormalization")
    next(a for a in node.attribute if a.name == "epsilon").f = 1.0  # a wrong epsilon: small but real damage
    onnx.save(model, str(tmp_path / "broken.onnx"))
    pairs = compare(Side(reference, "ort-cpu", "reference"), Side(tmp_path / "broken.onnx", "ort-cpu", "fused"),
                    [(1, 9)], "float32")
    assert not pairs[0]["passed"]
    assert pairs[0]["outputs"]["output"]["max_abs"] > 1e-3


def _main(module: str, *argv: str, capsys) -> tuple[int, str]:
    """A command's main() in this process (no interpreter start-up): its exit code and stderr."""
    import importlib

    main = importlib.import_module(module if module != "export.rewrite" else "export.rewrite.__main__").main
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's errors
        code = exc.code
    return code, capsys.readouterr().err


def _run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_build_command_end_to_end(tmp_path, norm):
    out = tmp_path / "out"
    done = _run("export.build", "--norm", norm, "--preset", "tiny", "--runs", "5", "--warmup", "1",
                "--seq", "32", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("reference.onnx", "fused.onnx", "fused-cpu.onnx", "fused-tensorrt.onnx", "report.json", "report.md",
                 "report.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    assert report["rewrite"]["fused"] == report["rewrite"]["expected_norms"] == 5
    assert report["rewrite"]["rejected"] == []
    assert report["decode"] == []  # a stack of blocks, not a KV-cache decoder: no decoding stage
    assert report["validation"] and all(p["passed"] for p in report["validation"])
    assert all(set(s) >= {"max_abs", "max_rel"} for p in report["validation"] for s in p["outputs"].values())
    # ONNX Runtime's CPU provider gets the norms without their residual Adds (its Skip ops are slower)
    cpu_form = report["rewrite"]["onnxruntime_cpu"]
    assert not any(f["residual"] for f in cpu_form["fusions"])
    assert all(f["residual"] for f in report["rewrite"]["onnxruntime"]["fusions"] if f["kind"].startswith("Add"))
    bench = {(b["backend"], b["graph"]): b for b in report["bench"]}
    candidates = {p["candidate"] for p in report["validation"]}
    if norm == "rmsnorm":  # the written-out RMSNorm becomes SimplifiedLayerNormalization for the CPU
        assert len(cpu_form["fusions"]) == 5
        assert set(bench) == {("ort-cpu", "reference"), ("ort-cpu", "fused")}
        assert Path(bench[("ort-cpu", "fused")]["model"]).name == "fused-cpu.onnx"
        assert {"fused@ort-cpu", "fused-cpu@ort-cpu"} <= candidates
        assert "fused (fused-cpu.onnx) p50 is" in done.stdout
        # the reference's norm nodes are the ones the CPU form fused: its residual Adds, kept in the
        # fused graph, are element-wise in both, so the norm class's FLOPs stay (within the counting of
        # the written-out ops against the fused op's 4 per element; counting the 4 Adds would add 20%)
        ref_norm, fused_norm = (bench[("ort-cpu", g)]["op_classes"]["norm"] for g in ("reference", "fused"))
        assert ref_norm["flops"] == pytest.approx(fused_norm["flops"], rel=0.02) and ref_norm["flops"] > 0
    else:  # F.layer_norm exports as LayerNormalization: nothing to change for the CPU, nothing to compare
        assert cpu_form["fusions"] == []
        assert set(bench) == {("ort-cpu", "reference")}
        assert "fused@ort-cpu" in candidates and "fused-cpu@ort-cpu" not in candidates
        assert any(s["stage"] == "ort-cpu fused bench" and "already the single ops" in s["reason"]
                   for s in report["skipped"])
    for b in report["bench"]:
        assert b["latency_ms"]["p50"] > 0 and b["latency_ms"]["p99"] >= b["latency_ms"]["p50"]
        assert b["peak_memory_mb"] >= 0 and len(b["raw_latencies_ms"]) == 5
    stages = " ".join(s["stage"] for s in report["skipped"])
    assert "tensorrt" in stages and "ort-cuda" in stages
    assert "skipped" in done.stdout and "validation" in done.stdout
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert f"ONNX Runtime CPU form (`fused-cpu.onnx`, residual Adds kept): {len(cpu_form['fusions'])} fused" in md
    kinds = "4 AddRMSNorm, 1 RMSNorm" if norm == "rmsnorm" else "4 AddLayerNorm, 1 LayerNorm"
    assert f"fused 5 of 5 norms ({kinds})" in md and f"fused 5/5 norms ({kinds})" in done.stdout
    assert "| norm | reference |" in md and "the p50 above for time" in md
    assert "| peak MiB |" in md and "Each graph was timed in a process of its own: 5 runs after 1 untimed ones" in md
    if norm == "rmsnorm":
        assert "one process each, so it holds the noise between processes too" in md


def test_a_bf16_build_on_the_cpu_says_nothing_was_timed_and_leaves_no_stale_plot(tmp_path):
    """ONNX Runtime's CPU provider has no bfloat16 kernels, so without a GPU nothing is timed: the
    report says so (not an empty table and empty axes), a plot of an earlier run in the same folder
    goes, and the validation line names the checker that ran and at which shapes."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.png").write_bytes(b"\x89PNG an earlier run's plot")
    done = _run("export.build", "--norm", "rmsnorm", "--preset", "tiny", "--layers", "1", "--dtype", "bfloat16",
                "--seq", "32", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["bench"] == [] and report["validation"] and all(p["passed"] for p in report["validation"])
    # every form is checked where it can run: the ONNX Runtime forms on the evaluator, not left unchecked
    assert sorted({p["candidate"] for p in report["validation"]}) == [
        "fused-cpu@onnx-reference", "fused-tensorrt@onnx-reference", "fused@onnx-reference"]
    (skip,) = [s for s in report["skipped"] if s["stage"] == "ort-cpu validation"]
    assert skip["reason"].endswith("fused.onnx and fused-cpu.onnx were checked with the onnx reference evaluator instead")
    assert not (out / "report.png").exists()
    assert "Nothing was timed on this machine" in (out / "report.md").read_text()
    assert "benchmark: nothing was timed" in done.stdout and "no plot: nothing was timed" in done.stdout
    assert "validate fused vs reference (onnx reference evaluator at 1x16)" in done.stdout
    assert "UserWarning" not in done.stderr


def test_build_command_from_another_directory_with_relative_paths(exported, tmp_path):
    """The chain's child processes (the benchmark workers) must read relative paths from the
    caller's directory: run outside the checkout, with the model and --out relative, as a user would."""
    import shutil

    (tmp_path / "rel").mkdir()
    shutil.copy(exported("rmsnorm", layers=1), tmp_path / "rel" / "model.onnx")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # importable whether or not the project is installed
    done = subprocess.run([sys.executable, "-m", "export.build", "--onnx", "rel/model.onnx",
                           "--runs", "3", "--warmup", "1", "--seq", "16", "--out", "rel/out"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "rel" / "out" / "report.json").read_text())
    assert {(b["backend"], b["graph"]) for b in report["bench"]} == {("ort-cpu", "reference"), ("ort-cpu", "fused")}


def test_a_combination_that_cannot_export_is_refused_before_exporting(tmp_path):
    """TorchScript writes fp16 F.layer_norm as a LayerNormalization of mixed dtypes, which onnx
    refuses: a bad flag (exit 2) before any export, naming the way that works."""
    out = tmp_path / "new" / "m.onnx"
    done = _run("export.export_model", "--norm", "layernorm", "--preset", "tiny", "--layers", "1",
                "--exporter", "torchscript", "--dtype", "float16", "-o", str(out))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "mixed dtypes" in lines[0] and "--exporter dynamo" in lines[0], done.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_export_onnx_rejects_leaves_the_file_already_there(tmp_path, monkeypatch):
    """The export is checked where it is staged: one that onnx's full check rejects (here made to,
    the one real case being refused earlier) is a one-line error naming the file asked for, and
    the model already at that path and its weights stay as they were; the folders it made go."""
    import onnx

    from export.errors import NormfuseError
    from export.export_model import export_model
    from models import preset

    kept = export_model(preset("tiny", "rmsnorm", layers=1), tmp_path / "m.onnx").path
    before = kept.read_bytes()

    def rejects(path, full_check=False):
        raise onnx.checker.ValidationError("Type Error: a half and a float operand")

    monkeypatch.setattr(onnx.checker, "check_model", rejects)
    with pytest.raises(NormfuseError, match=r"m\.onnx: the dynamo exporter wrote a graph onnx rejects: Type Error"):
        export_model(preset("tiny", "rmsnorm", layers=2), kept)
    assert kept.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    with pytest.raises(NormfuseError, match=str(tmp_path / "a" / "b" / "m.onnx")):
        export_model(preset("tiny", "rmsnorm", layers=1), tmp_path / "a" / "b" / "m.onnx")
    assert not (tmp_path / "a").exists()


def test_an_export_with_external_weights_names_their_file(tmp_path, monkeypatch, capsys):
    """Past the size that puts weights in a file of their own (lowered here to a few bytes), the
    command says where they are: without that file the model is useless."""
    from export import onnx_io
    from export.export_model import main

    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 1)
    assert main(["--norm", "rmsnorm", "--layers", "1", "-o", str(tmp_path / "m.onnx")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {tmp_path / 'm.onnx'} (dynamo, opset 18; weights in m.onnx.data beside it, ")
    assert (tmp_path / "m.onnx.data").stat().st_size > 0


def test_an_export_reports_the_opset_it_wrote(tmp_path):
    """--opset 17 is TorchScript's to write (dynamo's lowest is 18, refused above): the file holds it,
    and the result reads it from the file."""
    import onnx

    from export.export_model import export_model
    from models import preset

    result = export_model(preset("tiny", "rmsnorm", layers=1), tmp_path / "m.onnx", exporter="torchscript", opset=17)
    written = onnx.load(str(result.path), load_external_data=False).opset_import
    assert result.opset == 17 == next(entry.version for entry in written if entry.domain in ("", "ai.onnx"))


def test_build_command_on_a_given_model(tmp_path):
    """--onnx: no export; the chain runs on the model as given (token ids in, weights external),
    which stays where it is, and the outputs elsewhere get their own copy of the weights."""
    from test_validate_inputs import token_model

    model = onnx.load(str(token_model(tmp_path / "tmp.onnx")))
    given = tmp_path / "given" / "my model.onnx"
    given.parent.mkdir()
    # weights external as exporters write them: tensors of 1 KiB and more (the embedding table)
    onnx.save(model, str(given), save_as_external_data=True, location="weights.bin", size_threshold=1024)
    out = tmp_path / "out"
    done = _run("export.build", "--onnx", str(given), "--runs", "3", "--warmup", "1", "--seq", "16", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "nothing is exported" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["files"]["reference"] == str(given) and not (out / "reference.onnx").exists()
    assert report["config"]["source"] == str(given) and report["config"]["preset"] == "my_model"
    assert report["rewrite"]["fused"] == report["rewrite"]["expected_norms"] == 1
    assert report["validation"] and all(p["passed"] for p in report["validation"])
    # --seq 16 makes the bench shape the validation shape: each pair is compared once
    pairs = [(p["reference"], p["candidate"], tuple(p["shape"])) for p in report["validation"]]
    assert len(pairs) == len(set(pairs))
    assert {(b["backend"], b["graph"]) for b in report["bench"]} == {("ort-cpu", "reference"), ("ort-cpu", "fused")}
    assert (out / "weights.bin").read_bytes() == (given.parent / "weights.bin").read_bytes()
    assert "Model `" in (out / "report.md").read_text()
    # each stage's peak memory: at least what the build's own process held (torch and ONNX Runtime imported)
    peaks = report["stage_peak_rss_mb"]
    assert set(peaks) == set(report["stage_seconds"]) and all(50 < mb < 8000 for mb in peaks.values()), peaks
    # each bench worker reports its own peak (the kernel's figure for a child starts from its parent's)
    workers = [b["process_peak_rss_mb"] for b in report["bench"]]
    assert all(50 < mb < 8000 for mb in workers) and peaks["bench"] >= max(workers)
    assert "stage peak memory" in done.stdout and "| stage | seconds | peak MiB |" in (out / "report.md").read_text()


def test_a_model_converted_to_fp16_inside_is_held_to_fp16s_tolerance(exported, tmp_path):
    """ONNX Runtime's fp16 converter with keep_io_types: fp32 in and out, fp16 inside, and the
    input cast appended after the nodes that read it. The build runs it (onnx's evaluator gets
    the nodes in order), says it computes in fp16 and judges it by fp16's tolerance: by fp32's,
    the fp16 rounding inside failed the fused graphs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    given = tmp_path / "fp16-inside.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(exported("layernorm"))), keep_io_types=True), str(given))
    out = tmp_path / "out"
    done = _run("export.build", "--onnx", str(given), "--runs", "3", "--warmup", "0", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(float32; computes in float16, whose tolerance applies)" in " ".join(done.stdout.split())
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["dtype"] == "float16" and not report["rewrite"]["rejected"]
    validated = {p["candidate"].split("@")[0] for p in report["validation"]}
    assert validated == {"fused-tensorrt", "fused", "fused-cpu"} and all(p["passed"] for p in report["validation"])
    assert max(o["max_abs"] for p in report["validation"] for o in p["outputs"].values()) > 1e-4  # fp16's rounding, seen


def test_a_model_without_norms_is_said_to_have_none(tmp_path):
    """Nothing found and nothing rejected: the command says the model has no norm (not that its norms
    are single ops already), still validates and times it, and exits 0. F.normalize's x / max(||x||,
    eps) at its end is a spelling refused as no norm, which does not make it one."""
    from onnx import TensorProto, helper

    weight = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32), "w")
    eps = onnx.numpy_helper.from_array(np.array(1e-12, np.float32), "eps")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("ReduceL2", ["r"], ["length"], axes=[-1], keepdims=1),
             helper.make_node("Clip", ["length", "eps"], ["clamped"]), helper.make_node("Div", ["r", "clamped"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 16])],
                              initializer=[weight, eps])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "mlp.onnx"))
    out = tmp_path / "out"
    done = _run("export.build", "--onnx", str(tmp_path / "mlp.onnx"), "--runs", "3", "--warmup", "0", "--seq", "16",
                "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no norm in this model (none found, none rejected; 1 spelling(s) refused as no norm" in " ".join(done.stdout.split())
    assert "the model has no norm, so the fused graphs are copies of the reference" in done.stdout
    assert "rewrite (TensorRT form): fused 0/0 norms" in " ".join(done.stdout.split())  # which form's nodes
    assert "already the single ops" not in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["rewrite"]["fused"] == report["rewrite"]["expected_norms"] == 0
    assert [(r["pattern"], r["no_norm"]) for r in report["rewrite"]["rejected"]] == [("l2norm-epsilon-outside-root", True)]
    assert report["validation"] and all(p["passed"] for p in report["validation"])


def test_a_model_that_fixes_its_sequence_axis_is_validated_and_timed_as_it_runs(tmp_path):
    """A jax2onnx export takes [batch, 8, 64]: asked for 1x16 and 1x128 it runs 8 tokens, and the
    shapes, the pairs and the throughput say 1x8 (they used to say 1x128 and count 16x the tokens)."""
    given = ROOT / "tests" / "data" / "jax2onnx" / "flax-block-float32.onnx"
    out = tmp_path / "out"
    done = _run("export.build", "--onnx", str(given), "--runs", "5", "--warmup", "1", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "run as 1x8" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert (report["config"]["batch"], report["config"]["seq"]) == (1, 8) and report["config"]["shape_asked"] == [1, 128]
    assert {tuple(p["shape"]) for p in report["validation"]} == {(1, 8)}
    assert all(p["passed"] for p in report["validation"])
    for record in report["bench"]:
        assert record["shape"] == [1, 8]
        assert record["throughput_tokens_per_s"] == pytest.approx(8 / (record["latency_ms"]["p50"] / 1000.0))


@pytest.mark.parametrize("flags,message", [
    (["--onnx", "m.onnx", "--layers", "2"], "--layers describes the exported stack, which does not apply to a given model"),
    (["--onnx", "m.onnx", "--layers", "2", "--hidden", "64"], "--layers, --hidden describe the exported stack"),
    (["--onnx", "m.onnx", "--norm", "rmsnorm"], "not allowed with"),
    ([], "one of the arguments --norm --onnx is required"),
])
def test_given_model_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    code, stderr = _main("export.build", *flags, "--out", str(tmp_path / "x"), capsys=capsys)
    assert code == 2 and message in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_a_missing_given_model_is_one_line(tmp_path):
    done = _run("export.build", "--onnx", str(tmp_path / "none.onnx"), "--out", str(tmp_path / "x"))
    assert done.returncode == 1 and "no such file" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


@pytest.mark.parametrize("flags,message", [
    (["--norm", "groupnorm"], "invalid choice"),
    (["--norm", "rmsnorm", "--batch", "0"], "must be at least 1"),
    (["--norm", "rmsnorm", "--opset", "9"], "outside the supported range"),
    (["--norm", "rmsnorm", "--opset", "17"], "dynamo exporter writes opset 18 at the lowest; --exporter torchscript"),
    (["--norm", "rmsnorm", "--preset", "tiny", "--heads", "5"], "not divisible"),
    (["--norm", "rmsnorm", "--preset", "tiny", "--hidden", "63", "--heads", "3"], "head size 21 (hidden 63 over 3 heads) is odd"),
    (["--norm", "rmsnorm", "--decomposed-layernorm"], "the rmsnorm stack has none"),
    (["--norm", "rmsnorm", "--seed", "99999999999999999999999"], "past 2^63-1"),
    (["--norm", "rmsnorm", "--pairs", "0"], "must be at least 1"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    code, stderr = _main("export.build", *flags, "--out", str(tmp_path / "x"), capsys=capsys)
    assert code == 2
    assert message in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("module,flags,message", [
    ("export.export_model", ["--norm", "rmsnorm", "--layers", "0"], "must be at least 1"),
    ("export.export_model", ["--norm", "rmsnorm", "--preset", "tiny", "--layers", "x"], "not an integer"),
    ("export.export_model", ["--norm", "rmsnorm", "--opset", "24"], "24 is outside the supported range 17..23"),
    ("export.export_model", ["--norm", "rmsnorm", "--opset", "17"], "dynamo exporter writes opset 18 at the lowest"),
    ("export.export_model", ["--norm", "rmsnorm", "--decomposed-layernorm"], "the rmsnorm stack has none"),
    ("export.export_model", ["--norm", "rmsnorm", "--seed", "-1"], "must be at least 0"),
    ("export.bench", ["r.onnx", "f.onnx", "--runs", "0"], "must be at least 1"),
    ("export.bench", ["r.onnx", "f.onnx", "--pairs", "0"], "must be at least 1"),
    ("export.bench", ["r.onnx", "f.onnx", "--backend", "tensorrt"], "invalid choice"),
])
def test_stage_commands_refuse_bad_flags_in_one_line(tmp_path, capsys, module, flags, message):
    code, stderr = _main(module, *flags, "-o" if module == "export.export_model" else "--json", str(tmp_path / "x"),
                         capsys=capsys)
    assert code == 2 and message in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


# every command's output flag, given a path that cannot be written: a file where a folder must be,
# a folder where a file must be. Refused at parse time, before any export, rewrite or timing.
OUTPUT_FLAGS = [
    ("export.build", ["--norm", "rmsnorm", "--preset", "tiny"], "--out", "folder"),
    ("export.build", ["--norm", "rmsnorm", "--preset", "tiny"], "--triton-repo", "folder"),
    ("export.build", ["--norm", "rmsnorm", "--preset", "tiny"], "--timing-cache", "file"),
    ("export.export_model", ["--norm", "rmsnorm", "--preset", "tiny"], "-o", "file"),
    ("export.rewrite", ["{model}"], "-o", "file"),
    ("export.rewrite", ["{model}", "-o", "{tmp}/fresh.onnx"], "--report", "file"),
    ("export.validate", ["{model}", "{model}"], "--json", "file"),
    ("export.validate", ["{model}", "{model}"], "--save-outputs", "folder"),
    ("export.bench", ["{model}", "{model}"], "--json", "file"),
    ("export.run", ["{model}", "--random", "1x4"], "--outputs", "file"),
    ("export.run", ["{model}", "--random", "1x4"], "--json", "file"),
    ("export.tensorrt_engine", ["{model}"], "-o", "file"),
    ("export.triton_repo", ["{model}"], "--repo", "folder"),
    ("export.decode", ["{model}"], "--json", "file"),
]


@pytest.mark.parametrize("module,flags,flag,kind", OUTPUT_FLAGS, ids=[f"{m}{f}" for m, _, f, _ in OUTPUT_FLAGS])
def test_an_unwritable_output_path_is_refused_in_one_line_before_any_work(tmp_path, capsys, module, flags, flag, kind):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"never read: the output flag is refused first")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    flags = [f.format(model=model, tmp=tmp_path) for f in flags]
    wrong_kind = a_file if kind == "folder" else tmp_path  # a file for a folder, a folder for a file
    for path, message in ((wrong_kind, f"is a {'file' if kind == 'folder' else 'folder'}, not a {kind}"),
                          (a_file / "under", f"cannot be created: {a_file} is a file")):
        code, stderr = _main(module, *flags, flag, str(path), capsys=capsys)
        assert code == 2, stderr
        assert f"argument {flag}" in stderr or f"/{flag}" in stderr
        assert f"{path} {message}" in stderr and len(stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "m.onnx"]


INPUT_FOLDER_CASES = [
    ("export.run", ["{folder}", "--random", "1x4"]),
    ("export.triton_repo", ["{folder}", "--repo", "{tmp}/out"]),
]


@pytest.mark.parametrize("module,flags", INPUT_FOLDER_CASES, ids=[m for m, _ in INPUT_FOLDER_CASES])
def test_a_folder_given_as_a_model_is_named_as_one(tmp_path, capsys, module, flags):
    folder = tmp_path / "models"
    folder.mkdir()
    code, stderr = _main(module, *[f.format(folder=folder, tmp=tmp_path) for f in flags], capsys=capsys)
    assert code == 1 and stderr.strip() == f"normfuse: error: {folder}: is a folder, not a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


@pytest.mark.parametrize("module,flags,message", [
    ("export.rewrite", ["{folder}", "-o", "{tmp}/out"], "no .onnx model in this folder"),
    ("export.build", ["--onnx", "{folder}", "--out", "{tmp}/out"], "no .onnx model in this folder"),
    ("export.validate", ["{folder}", "{folder}"], "no .onnx model in this folder"),
    ("export.bench", ["{folder}", "{folder}"], "no .onnx model in this folder"),
    ("export.decode", ["{folder}"], "no decoder in this folder"),
])
def test_a_folder_without_the_models_a_command_takes_from_one_is_named(tmp_path, capsys, module, flags, message):
    """export.rewrite, export.build, export.validate, export.bench and export.decode take a folder in Optimum's layout; one without its models is
    a one-line flag error naming it, and nothing is written."""
    folder = tmp_path / "models"
    folder.mkdir()
    code, stderr = _main(module, *[f.format(folder=folder, tmp=tmp_path) for f in flags], capsys=capsys)
    assert code == 2 and stderr.strip().startswith(f"normfuse: error: {folder}: {message}")
    assert len(stderr.strip().splitlines()) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["models"]


COMMANDS = ["export.build", "export.export_model", "export.rewrite", "export.validate", "export.bench",
            "export.tensorrt_engine", "export.run", "export.triton_repo", "export.decode"]


@pytest.mark.parametrize("module", COMMANDS)
def test_every_flag_of_every_command_says_what_it_does(module, monkeypatch):
    import importlib

    from export.cli import Parser

    seen = []

    def capture(self, argv=None, namespace=None):
        seen.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(Parser, "parse_args", capture)
    main = importlib.import_module(module if module != "export.rewrite" else "export.rewrite.__main__").main
    with pytest.raises(SystemExit):
        main([])
    (parser,) = seen
    unexplained = [a.option_strings[0] if a.option_strings else a.dest for a in parser._actions if not a.help]
    assert unexplained == []
    if module == "export.build":
        assert "exit status: 0 when every validation passed" in parser.format_help()


def test_the_default_output_folder_is_checked_too(tmp_path, capsys, monkeypatch):
    """Without --out the folder is build/<preset>-<norm> under the working directory: a file named
    `build` there is a one-line error before anything is exported."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "build").write_text("")
    code, stderr = _main("export.build", "--norm", "rmsnorm", "--preset", "tiny", capsys=capsys)
    assert code == 1 and stderr.strip() == "normfuse: error: build/tiny-rmsnorm: cannot be created: build is a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build"]


def test_warmup_may_be_zero_but_not_negative(tmp_path, capsys):
    code, stderr = _main("export.build", "--norm", "rmsnorm", "--warmup", "-1", "--out", str(tmp_path / "x"), capsys=capsys)
    assert code == 2 and "argument --warmup: '-1' must be at least 0" in stderr
    assert not (tmp_path / "x").exists()


def test_bench_command_on_a_missing_model_is_one_line(tmp_path):
    done = _run("export.bench", str(tmp_path / "none.onnx"), str(tmp_path / "none.onnx"), "--json", str(tmp_path / "b.json"))
    assert done.returncode == 1 and "no such file" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "b.json").exists()


def test_a_child_processs_own_error_comes_through_once(tmp_path):
    """export.bench times each graph in a child process; the child's one-line error is the message,
    not wrapped in a second 'failed: normfuse: error:' around it."""
    from export.rewrite.synth import NormSpec, build

    reference = tmp_path / "ref.onnx"
    onnx.save(build(NormSpec(kind="rms")), str(reference))
    plugins = tmp_path / "trt.onnx"
    rewrite_file(reference, plugins, target="tensorrt")
    done = _run("export.bench", str(reference), str(plugins), "--runs", "2", "--warmup", "0")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (f"normfuse: error: {plugins}: holds normfuse plugin ops (the tensorrt target), which "
                                   "ONNX Runtime cannot run; rewrite with --target onnxruntime, build a TensorRT engine "
                                   "from it, or validate with --backend onnx-reference")


def test_rewrite_command_errors_leave_no_output(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    done = _run("export.rewrite", str(bad), "-o", str(tmp_path / "out.onnx"))
    assert done.returncode == 1 and str(bad) in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out.onnx").exists()
    done = _run("export.rewrite", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "out.onnx"))
    assert done.returncode == 1 and "no such file" in done.stderr


def test_missing_onnx_runtime_names_the_extra(monkeypatch):
    from export.backends import import_onnxruntime
    from export.errors import NormfuseError

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an environment without it looks like
    with pytest.raises(NormfuseError, match=r"normfuse\[cpu\].*normfuse\[gpu\]"):
        import_onnxruntime()


def test_a_rewrite_short_of_the_models_norms_is_said_and_not_sold_as_a_speed_up():
    from export.report import fusion_shortfall, markdown

    def report(fused):
        bench = [{"backend": "ort-cpu", "graph": g, "latency_ms": {"p50": p, "p99": p}, "throughput_tokens_per_s": 1.0,
                  "peak_memory_mb": 1.0, "nodes": 1, "file_size_mb": 0.1} for g, p in (("reference", 2.0), ("fused", 1.0))]
        return {"config": {"norm": "layernorm", "preset": "tiny", "dtype": "bfloat16", "layers": 1, "hidden": 8, "heads": 1,
                           "ffn": 8, "exporter": "dynamo", "opset": 18, "batch": 1, "seq": 1},
                "rewrite": {"fused": fused, "expected_norms": 3, "counts": {}, "nodes_before": 1, "nodes_after": 1,
                            "rejected": [{"pattern": "p", "output": "y", "reason": "r"}] * (3 - fused)},
                "validation": [], "bench": bench, "skipped": [], "stage_seconds": {}}

    assert fusion_shortfall(report(3)) is None and "speed-up" in markdown(report(3))
    assert "only 2 of the model's 3 norms" in fusion_shortfall(report(2))
    text = markdown(report(0))
    assert "compares a graph with itself" in text and "speed-up" not in text


def test_titles_name_a_given_model_by_its_file_and_a_lone_reference_as_such():
    """A folder's models are all of kind `model`, and Optimum names one model.onnx: the plot and the
    Markdown name the file ("model model" said nothing). A latency panel with no fused bar says the
    fused graph was not timed instead of promising a comparison."""
    from export.report import latency_title, markdown, plot_title

    given = {"source": "t5/decoder_model_merged.onnx", "norm": "model", "preset": "decoder_model_merged",
             "dtype": "float32", "batch": 1, "seq": 8}
    assert plot_title(given) == "normfuse: decoder_model_merged.onnx float32, 1x8"
    stack = {"norm": "rmsnorm", "preset": "small", "dtype": "float16", "batch": 1, "seq": 128}
    assert plot_title(stack) == "normfuse: rmsnorm small float16, 1x128"
    report = {"config": given, "rewrite": {"fused": 0, "expected_norms": 0, "counts": {}, "nodes_before": 1,
                                           "nodes_after": 1, "rejected": []},
              "validation": [], "bench": [], "skipped": [], "stage_seconds": {}}
    assert markdown(report).startswith("# normfuse report: `decoder_model_merged.onnx` (float32)")
    assert latency_title({"ort-cpu": {"reference": {}, "fused": {}}}) == "Latency, reference vs fused"
    assert "not timed" in latency_title({"ort-cpu": {"reference": {}}})


def test_half_precision_reductions_are_evaluated_with_fp32_accumulation():
    """onnx's evaluator sums bf16 in bf16; the evaluator used for bf16 validation sums in fp32, as
    ONNX Runtime and TensorRT do, so its ReduceMean over 1600 values is the mean rounded to bf16."""
    import ml_dtypes
    from onnx import TensorProto, helper

    from export.rewrite.evaluate import run_model

    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 1600])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [-1])
    model = helper.make_model(helper.make_graph(
        [helper.make_node("ReduceMean", ["x", "axes"], ["m"]), helper.make_node("Softmax", ["x"], ["s"])], "g", [x],
        [helper.make_tensor_value_info("m", TensorProto.BFLOAT16, None), helper.make_tensor_value_info("s", TensorProto.BFLOAT16, None)],
        initializer=[axes]), opset_imports=[helper.make_opsetid("", 18)])
    values = (np.random.default_rng(0).standard_normal((2, 1600)) + 0.5).astype(ml_dtypes.bfloat16)
    mean, soft = run_model(model, {"x": values})
    exact = values.astype(np.float64).mean(-1, keepdims=True)
    assert mean.dtype == ml_dtypes.bfloat16 and np.allclose(mean.astype(np.float64), exact, rtol=2 ** -7)
    assert soft.dtype == ml_dtypes.bfloat16 and abs(soft.astype(np.float64).sum(-1) - 1).max() < 0.05


def test_bf16_graph_of_wide_rows_validates_on_the_reference_evaluator(exported, tmp_path):
    """GPT-2-XL's width in bf16: every norm fused, and the fused graph matches the reference
    evaluated with fp32 accumulation (in bf16 accumulation the reference itself was off by ~1)."""
    reference = exported("layernorm", "bfloat16", hidden=1600, heads=25, ffn=64, layers=1)
    report = rewrite_file(reference, tmp_path / "fused.onnx", target="tensorrt")
    assert report.fused == 3 and not report.rejected
    (pair,) = compare(Side(reference, "onnx-reference", "reference"), Side(tmp_path / "fused.onnx", "onnx-reference", "fused"),
                      [(1, 8)], "bfloat16")
    assert pair["passed"], pair["outputs"]


def test_the_validation_table_names_the_output_of_each_row():
    """A decoder has a row per output (logits, each present key and value): without their names
    the terminal showed five identical-looking rows per shape."""
    from rich.console import Console

    from export.report import print_summary

    def stats():
        return {"max_abs": 0.0, "max_rel": 0.0, "passed": True}

    report = {"rewrite": {"fused": 1, "expected_norms": 1, "counts": {"RMSNorm": 1}, "nodes_before": 5,
                          "nodes_after": 1, "rejected": []},
              "validation": [{"reference": "reference@ort-cpu", "candidate": "fused@ort-cpu", "shape": [1, 16],
                              "outputs": {"logits": stats(), "present.0.key": stats()}}],
              "bench": [], "decode": [], "stage_seconds": {}, "skipped": []}
    console = Console(record=True, width=200)
    print_summary(report, console)
    rows = [line for line in console.export_text().splitlines() if "fused@ort-cpu" in line]
    assert len(rows) == 2 and "logits" in rows[0] and "present.0.key" in rows[1]


def test_build_leaves_an_excluded_norm_unfused_in_every_form(tmp_path, capsys):
    """export.build --exclude TENSOR: none of the three fused forms fuses the norm ending there; a
    name no norm ends at is a one-line flag error (exit 2)."""
    from export.build import main as build_main
    from export.rewrite.synth import NormSpec, build

    model = build(NormSpec(kind="rms", residual="private"), leading=("batch", "seq"))
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    y = model.graph.output[0].name
    out = tmp_path / "out"
    assert build_main(["--onnx", str(path), "--out", str(out), "--exclude", y, "--runs", "2", "--warmup", "0"]) == 0
    report = json.loads((out / "report.json").read_text())["rewrite"]
    assert [report[form]["fused"] for form in ("tensorrt", "onnxruntime", "onnxruntime_cpu")] == [0, 0, 0]
    assert [e["output"] for e in report["tensorrt"]["excluded"]] == [y]
    capsys.readouterr()
    assert build_main(["--onnx", str(path), "--out", str(tmp_path / "out2"), "--exclude", "nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--exclude nowhere: no norm that would be fused ends at a tensor of that name" in err and len(err.splitlines()) == 1


def test_norms_without_an_epsilon_are_named_by_the_build(tmp_path):
    """A norm whose exporter dropped its epsilon is fused with epsilon 0; the build says so on the
    terminal and in report.md, since a row of zeros then gives NaN, as in the graph."""
    from export.rewrite.synth import NormSpec, build

    given = tmp_path / "no-eps.onnx"
    onnx.save(build(NormSpec(epsilon_dropped=True, hidden=32), leading=("batch", "seq")), str(given))
    out = tmp_path / "out"
    done = _run("export.build", "--onnx", str(given), "--runs", "3", "--warmup", "1", "--seq", "16", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 norm(s) add no epsilon" in done.stdout
    assert "1 norm(s) add no epsilon" in (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["rewrite"]["tensorrt"]["without_epsilon"] and report["rewrite"]["fused"] == 1
