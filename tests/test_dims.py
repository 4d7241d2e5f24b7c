"""Named dynamic dimensions (export.dims): one size per name, derived names such as
'past_sequence_length + sequence_length' worked out, `--dim NAME=SIZE` on every command that makes
up inputs, and the same rule in TensorRT's optimisation profile.

The model is a KV-cache step written the way Hugging Face exports name it (the attention mask is
`past_sequence_length + sequence_length` long): it concatenates the cache with the new tokens,
masks them and RMS-normalises them, so it runs only when the three lengths agree."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from test_pipeline import _main

from export.dims import Expression, check_given, input_shapes, named_dims, parse
from export.errors import NormfuseError, UsageError
from export.tensorrt_engine import EngineOptions, Range, io_signature, make_sidecar, profile_shapes
from export.triton_repo import IO, onnx_signature

ROOT = Path(__file__).resolve().parent.parent
HIDDEN = 32
PAST, SEQ, TOTAL = "past_sequence_length", "sequence_length", "past_sequence_length + sequence_length"


def kv_step_model(path: Path, total: str = TOTAL) -> Path:
    """hidden [batch, seq, 32], past [batch, past, 32], mask [batch, past + seq] -> RMSNorm(concat * mask)."""
    inputs = [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch_size", SEQ, HIDDEN]),
              helper.make_tensor_value_info("past", TensorProto.FLOAT, ["batch_size", PAST, HIDDEN]),
              helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch_size", total])]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_size", total, HIDDEN])
    weights = [numpy_helper.from_array(np.linspace(0.5, 1.5, HIDDEN, dtype=np.float32), "gamma"),
               numpy_helper.from_array(np.array([-1], np.int64), "last"),
               numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
               numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    nodes = [helper.make_node("Concat", ["past", "hidden"], ["cat"], axis=1),
             helper.make_node("Unsqueeze", ["mask", "last"], ["mask3"]),
             helper.make_node("Mul", ["cat", "mask3"], ["x"]),
             helper.make_node("Pow", ["x", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq", "last"], ["ms"]),
             helper.make_node("Add", ["ms", "eps"], ["mse"]),
             helper.make_node("Sqrt", ["mse"], ["rms"]),
             helper.make_node("Div", ["x", "rms"], ["normed"]),
             helper.make_node("Mul", ["normed", "gamma"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "kv_step", inputs, [output], weights),
                              opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def kv_model(tmp_path_factory) -> Path:
    return kv_step_model(tmp_path_factory.mktemp("kv") / "kv_step.onnx")


def spec(name, *dims):
    """An input whose axes are ints (fixed), names, or None (dynamic without a name)."""
    return IO(name, "float32", [d if isinstance(d, int) else None for d in dims],
              tuple(d if isinstance(d, str) else None for d in dims))


# --- the rule -------------------------------------------------------------------------------------

def test_unnamed_dynamic_axes_are_batch_then_sequence():
    shapes = input_shapes([spec("x", None, None, 64), spec("m", None, None)], batch=2, seq=9)
    assert shapes == {"x": [2, 9, 64], "m": [2, 9]}


def test_a_name_has_one_size_everywhere_and_its_first_place_decides():
    inputs = [spec("ids", "b", "s"), spec("cache", "b", 4, "p", 16), spec("other", "p", "s")]
    assert input_shapes(inputs, batch=3, seq=7) == {"ids": [3, 7], "cache": [3, 4, 7, 16], "other": [7, 7]}
    # a given size wins wherever the name sits, and a name first seen on axis 0 stays the batch
    assert input_shapes(inputs, batch=3, seq=7, given={"p": 11})["other"] == [11, 7]
    assert input_shapes([spec("a", "n", 5), spec("b", 5, "n")], batch=2, seq=8) == {"a": [2, 5], "b": [5, 2]}


def test_derived_names_are_worked_out():
    inputs = [spec("ids", "batch_size", SEQ), spec("k", "batch_size", 2, PAST, 16), spec("mask", "batch_size", TOTAL)]
    assert input_shapes(inputs, batch=1, seq=4)["mask"] == [1, 8]
    assert input_shapes(inputs, batch=1, seq=1, given={PAST: 511})["mask"] == [1, 512]
    assert input_shapes(inputs, batch=1, seq=4, given={TOTAL: 6})["mask"] == [1, 6]  # given by its own text


@pytest.mark.parametrize("text,sizes,expected", [
    ("s0 + s1", {"s0": 3, "s1": 4}, 7), ("2*s0", {"s0": 5}, 10), ("Max(1, s0 - 9)", {"s0": 5}, 1),
    ("min(s0, 8)", {"s0": 12}, 8), ("(s0 + 1)//2", {"s0": 8}, 4), ("s0 % 3 + 1", {"s0": 7}, 2),
])
def test_exporters_arithmetic(text, sizes, expected):
    parsed = parse(text)
    assert isinstance(parsed, Expression) and set(parsed.names) == set(sizes)
    assert parsed.value(sizes) == expected


@pytest.mark.parametrize("text", ["batch", "/model/Add_output_0_dim_1", "past_key_values.0.key_dim_2", "unk__3",
                                  "s0 ** 2", "seq / 2", "f(s0)", "1 + 2", "s0 + 1.5", "s0 if s1 else s2", "a b"])
def test_anything_else_is_a_plain_name(text):
    assert parse(text) == text


def test_names_only_inside_an_expression_take_its_axis_size():
    shapes = input_shapes([spec("mask", "b", "past + seq")], batch=2, seq=5)
    assert shapes == {"mask": [2, 10]}
    assert named_dims([spec("mask", "b", "past + seq")]) == ["b", "past", "seq"]


def test_a_length_below_one_names_the_input_and_the_way_out():
    with pytest.raises(NormfuseError, match=r"m\.onnx: input 'mask' axis 1 \(s - 16\) would be 0 long; .*--dim"):
        input_shapes([spec("x", "b", "s"), spec("mask", "b", "s - 16")], batch=1, seq=16, where="m.onnx")
    with pytest.raises(NormfuseError, match="divides by zero"):
        input_shapes([spec("x", "b", "s"), spec("y", "s // (s - s)")], batch=1, seq=4)


def test_a_size_for_a_name_the_model_lacks_is_a_usage_error():
    inputs = [spec("ids", "batch_size", SEQ), spec("mask", "batch_size", TOTAL)]
    check_given(inputs, {PAST: 3, TOTAL: 9}, "m.onnx")
    with pytest.raises(UsageError, match=r"m\.onnx: --dim past: the model has no dimension of that name \(its named "
                                         r"dimensions: batch_size, sequence_length, past_sequence_length\)"):
        check_given(inputs, {"past": 3}, "m.onnx")


# --- real graphs, real sessions -------------------------------------------------------------------

def test_signature_and_sessions_carry_the_names(kv_model):
    from export.runtime import load

    inputs, _ = onnx_signature(kv_model)
    assert [i.dim_params for i in inputs] == [("batch_size", SEQ, None), ("batch_size", PAST, None), ("batch_size", TOTAL)]
    model = load(kv_model, providers=["CPUExecutionProvider"])
    assert [i.dim_params for i in model.inputs] == [i.dim_params for i in inputs]


def test_random_inputs_fit_the_model_and_run(kv_model):
    """Before names were followed, the mask got 3 columns for 6 rows and every command stopped."""
    from export.backends import make_runner, random_feeds

    assert make_runner(kv_model, "ort-cpu").run(random_feeds(kv_model, 1, 3))["y"].shape == (1, 6, HIDDEN)
    feeds = random_feeds(kv_model, 2, 3, dims={PAST: 5})
    assert {k: v.shape for k, v in feeds.items()} == {"hidden": (2, 3, HIDDEN), "past": (2, 5, HIDDEN), "mask": (2, 8)}
    out = make_runner(kv_model, "ort-cpu").run(feeds)
    x = np.concatenate([feeds["past"], feeds["hidden"]], axis=1).astype(np.float64) * feeds["mask"][..., None]
    expected = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * np.linspace(0.5, 1.5, HIDDEN)
    np.testing.assert_allclose(out["y"], expected, rtol=1e-5, atol=1e-5)


def test_profile_follows_the_same_rule(kv_model):
    shapes = profile_shapes(kv_model, Range(1, 2, 4), Range(1, 1, 16), {PAST: Range(1, 128, 1024)})
    assert shapes["past"] == {"min": [1, 1, HIDDEN], "opt": [2, 128, HIDDEN], "max": [4, 1024, HIDDEN]}
    assert shapes["mask"] == {"min": [1, 2], "opt": [2, 129], "max": [4, 1040]}
    assert profile_shapes(kv_model, Range(1, 1, 1), Range(1, 8, 8))["past"]["opt"] == [1, 8, HIDDEN]
    with pytest.raises(UsageError, match="--dim pst"):
        profile_shapes(kv_model, Range(1, 1, 1), Range(1, 8, 8), {"pst": Range(1, 1, 1)})


def test_profile_refuses_a_range_that_runs_backwards(tmp_path):
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "1024 - s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "1024 - s"])]))
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(NormfuseError, match=r"input 'x' axis 1 would be 1023:896:24 .*--dim NAME=MIN:OPT:MAX"):
        profile_shapes(tmp_path / "m.onnx", Range(1, 1, 1), Range(1, 128, 1000))


def test_engine_sidecar_keeps_the_names_an_engine_forgets(kv_model, tmp_path):
    from export.runtime import _sidecar_dim_params
    from export.tensorrt_engine import sidecar_path

    options = EngineOptions(dims={PAST: Range(1, 64, 512)})
    profiles = profile_shapes(kv_model, options.batch, options.seq, options.dims)
    plan = tmp_path / "kv.plan"
    sidecar = make_sidecar(kv_model, plan, options, tensorrt_version="10.13.0.35", gpu={}, profiles=profiles,
                           build_seconds=0.0, plan_bytes=0)
    assert sidecar["dim_ranges"] == {PAST: "1:64:512"}
    assert sidecar["io"] == io_signature(kv_model)
    sidecar_path(plan).write_text(json.dumps(sidecar))
    assert _sidecar_dim_params(plan)["mask"] == ("batch_size", TOTAL)
    sidecar_path(plan).write_text("{not json")
    assert _sidecar_dim_params(plan) == {}


# --- the commands ---------------------------------------------------------------------------------

def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("args,message", [
    (["--dim", "past=4"], "--dim past: the model has no dimension of that name"),
    (["--dim", "past_sequence_length=0"], "argument --dim: 'past_sequence_length=0'"),
    (["--dim", "past_sequence_length=8:4:16"], "1 <= MIN <= OPT <= MAX"),
    (["--dim", "=4"], "expected NAME=SIZE"),
    (["--norm", "rmsnorm", "--dim", "seq=4"], "the exported stack's two dynamic axes are --batch and --seq"),
])
def test_build_refuses_bad_dims_before_any_work(kv_model, tmp_path, capsys, args, message):
    source = [] if "--norm" in args else ["--onnx", str(kv_model)]
    code, stderr = _main("export.build", *source, "--out", str(tmp_path / "out"), *args, capsys=capsys)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_failure_on_unrelated_names_points_to_dim(tmp_path, capsys):
    """torch.export with automatic dims names each axis on its own (s53, s70, ...): the mask's length
    cannot be known from the names, so the one-line error says which names were made up alike."""
    model = kv_step_model(tmp_path / "unrelated.onnx", total="s53")
    code, stderr = _main("export.run", str(model), "--random", "1x4", capsys=capsys)
    assert code == 1 and len(stderr.strip().splitlines()) == 1
    assert f"or sizes it relates: {SEQ}, {PAST}, s53 are separate dimensions" in stderr and "--dim NAME=SIZE" in stderr
    assert _main("export.run", str(model), "--random", "1x4", "--dim", "s53=8", capsys=capsys)[0] == 0
    code, stderr = _main("export.validate", str(model), str(model), "--shapes", "1x4", "--backend", "onnx-reference",
                         capsys=capsys)
    assert code == 1 and "reference evaluator failed" in stderr and "or sizes it relates: " in stderr


def test_no_dim_hint_for_inputs_the_user_gave(tmp_path, capsys):
    """The shapes of --inputs are the user's own: a failure says what failed, not how normfuse
    sized them."""
    model = kv_step_model(tmp_path / "unrelated.onnx", total="s53")
    inputs = tmp_path / "in.npz"
    np.savez(inputs, hidden=np.zeros((1, 4, HIDDEN), np.float32), past=np.zeros((1, 4, HIDDEN), np.float32),
             mask=np.ones((1, 4), np.float32))
    code, stderr = _main("export.run", str(model), "--inputs", str(inputs), capsys=capsys)
    assert code == 1 and "ONNX Runtime failed to run it on hidden [1, 4, " in stderr and "--dim" not in stderr
    code, stderr = _main("export.validate", str(model), str(model), "--inputs", str(inputs), capsys=capsys)
    assert code == 1 and "failed to run it on" in stderr and "--dim" not in stderr


def test_validate_bench_and_run_take_dims(kv_model, tmp_path, capsys):
    from export.rewrite import rewrite_file

    fused = tmp_path / "fused.onnx"
    rewrite_file(kv_model, fused, target="onnxruntime")
    from export.validate import main as validate

    assert validate([str(kv_model), str(fused), "--shapes", "2x3", "--dim", f"{PAST}=5", "--json", str(tmp_path / "v.json")]) == 0
    assert f"PASS 2x3 {PAST}=5 y" in capsys.readouterr().out
    pair = json.loads((tmp_path / "v.json").read_text())[0]
    assert pair["passed"] and pair["input_shapes"] == {"hidden": [2, 3, HIDDEN], "past": [2, 5, HIDDEN], "mask": [2, 8]}
    assert _main("export.bench", str(kv_model), str(fused), "--seq", "1", "--dim", f"{PAST}=9", "--runs", "2",
                 "--warmup", "0", "--json", str(tmp_path / "b.json"), capsys=capsys)[0] == 0
    assert json.loads((tmp_path / "b.json").read_text())[1]["input_shapes"]["mask"] == [1, 10]
    assert _main("export.run", str(fused), "--random", "1x2", "--dim", f"{PAST}=3", "--json", str(tmp_path / "r.json"),
                 capsys=capsys)[0] == 0
    assert json.loads((tmp_path / "r.json").read_text())["outputs"]["y"][0] == [1, 5, HIDDEN]


@pytest.mark.parametrize("module,args", [
    ("export.run", ["--inputs", "in.npz", "--dim", "a=1"]),
    ("export.validate", ["REF", "--inputs", "in.npz", "--dim", f"{PAST}=1"]),
    ("export.bench", ["REF", "--dim", "nope"]),
    ("export.tensorrt_engine", ["-o", "PLAN", "--dim", "pst=1:2:3"]),
])
def test_dims_with_given_inputs_or_malformed_or_unknown_are_refused(kv_model, tmp_path, capsys, module, args):
    args = [str(kv_model) if a == "REF" else str(tmp_path / "m.plan") if a == "PLAN" else a for a in args]
    code, stderr = _main(module, str(kv_model), *args, capsys=capsys)
    assert code == 2 and "--dim" in stderr and len(stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_a_hugging_face_decoder_with_its_kv_cache_runs_as_exported(tmp_path):
    """LLaMA with past keys and values, exported the way optimum names the axes (the mask is
    'past_sequence_length + sequence_length' long): the whole chain, at one decode step."""
    pytest.importorskip("transformers")
    from models.hf_decoder import export_hf_decoder

    path = tmp_path / "decoder_with_past.onnx"
    export_hf_decoder(path)
    profile = profile_shapes(path, Range(1, 1, 2), Range(1, 1, 8), {PAST: Range(1, 255, 1024)})
    assert profile["attention_mask"] == {"min": [1, 2], "opt": [1, 256], "max": [2, 1032]}
    out = tmp_path / "out"
    done = run("-m", "export.build", "--onnx", str(path), "--out", str(out), "--seq", "1", "--dim", f"{PAST}=255",
               "--runs", "3", "--warmup", "1", "--backend", "ort-cpu")
    assert done.returncode == 0, done.stderr
    assert f"bench on ort-cpu at 1x1 with {PAST}=255" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["dims"] == {PAST: 255}
    assert report["rewrite"]["fused"] == 5 and not report["rewrite"]["rejected"]
    assert all(p["passed"] for p in report["validation"]) and len(report["validation"]) == 5
    for record in report["bench"]:
        assert record["input_shapes"]["attention_mask"] == [1, 256]
        assert record["input_shapes"]["past_key_values.1.value"] == [1, 2, 255, 16]
    assert f"bench shape 1x1, {PAST}=255" in (out / "report.md").read_text()
    # a decoder is also served in a greedy decoding loop, the fused CPU form fed the reference's tokens
    (decoded,) = report["decode"]
    assert decoded["backend"] == "ort-cpu" and decoded["models"]["compared"]["model"].endswith("fused-cpu.onnx")
    assert decoded["agreement"]["same_tokens"] == decoded["agreement"]["steps"] == 32
    assert decoded["agreement"]["scores_within_tolerance"] and "decode on ort-cpu: 32/32 same tokens" in done.stdout
    assert decoded["rounds"] == 2 and [len(s) for s in decoded["models"]["compared"]["raw_step_ms"]] == [31, 31]
    assert "Each decodes 2 time(s) after a warm-up" in (out / "report.md").read_text()
    assert "Between steps the cache went through numpy." in (out / "report.md").read_text()


@pytest.mark.parametrize("latent_first", (True, False))
def test_an_axis_any_input_takes_from_the_sequence_is_not_called_fixed(tmp_path, latent_first):
    """A UNet's first input is the latent [batch, 4, 16, 16]: its axis 1 is fixed, but the text
    input [batch, tokens, 32] takes --seq. The build read the first input alone, said the sequence
    was fixed at 4, and ran the text at 4 tokens whatever --seq asked."""
    from export.backends import shape_taken

    latent = helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["batch", 4, 16, 16])
    text = helper.make_tensor_value_info("text", TensorProto.FLOAT, ["batch", "tokens", 32])
    nodes = [helper.make_node("ReduceSum", ["latent"], ["a"], keepdims=0),
             helper.make_node("ReduceSum", ["text"], ["b"], keepdims=0)]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, []) for n in "ab"]
    graph = helper.make_graph(nodes, "g", [latent, text] if latent_first else [text, latent], outputs)
    path = tmp_path / "unet-like.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    assert shape_taken(path, 2, 7) == (2, 7)
    assert shape_taken(path, 2, 7, {"tokens": 5}) == ((2, 4) if latent_first else (2, 5))  # a --dim fixes it
