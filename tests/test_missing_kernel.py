"""A model ONNX Runtime has no kernel for, at its types: a one-line error that says so and names the
way out (onnx's reference evaluator), not a guess about shapes; and the way out works."""
from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from export.validate import main as validate_main


def _save(tmp_path, name: str, node, inputs, outputs, initializers=()) -> str:
    graph = helper.make_graph([node], name, inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture
def scatter_add_fp16(tmp_path):
    """ScatterND adding into float16 rows (JetMoE's expert combine): ONNX Runtime's CPU kernel
    serves other types, and refuses this one when it runs."""
    rows = helper.make_tensor_value_info("rows", TensorProto.FLOAT16, [4, "sequence"])
    update = helper.make_tensor_value_info("update", TensorProto.FLOAT16, [1, "sequence"])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT16, [4, "sequence"])
    where = helper.make_tensor("where", TensorProto.INT64, [1, 1], [2])  # into row 2
    node = helper.make_node("ScatterND", ["rows", "where", "update"], ["out"], reduction="add")
    return _save(tmp_path, "scatter_add", node, [rows, update], [out], [where])


def test_a_kernel_onnx_runtime_lacks_at_run_is_named_with_the_way_out(scatter_add_fp16, capsys):
    code = validate_main([scatter_add_fp16, scatter_add_fp16, "--shapes", "1x8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert "has no kernel for it" in err[0] and "MLFloat16 data type is not supported with ScatterND" in err[0]
    assert "python -m export.validate REFERENCE FUSED --backend onnx-reference" in err[0]
    assert "a shape the model cannot take" not in err[0]  # the model's ops, not the inputs, are the problem


def test_the_way_out_validates_it_on_the_evaluator(scatter_add_fp16, capsys):
    code = validate_main([scatter_add_fp16, scatter_add_fp16, "--shapes", "1x8", "--backend", "onnx-reference"])
    assert code == 0, capsys.readouterr().err
    assert "PASS" in capsys.readouterr().out


def test_a_kernel_onnx_runtime_lacks_at_load_is_named_with_the_way_out(tmp_path, capsys):
    """Relu on bfloat16: no CPU kernel at all, so the session does not load."""
    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["batch", "sequence"])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["batch", "sequence"])
    path = _save(tmp_path, "relu", helper.make_node("Relu", ["x"], ["y"]), [x], [y])
    code = validate_main([path, path, "--shapes", "1x8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert "has no kernel for it" in err[0] and "NOT_IMPLEMENTED" in err[0]
    assert "python -m export.validate REFERENCE FUSED --backend onnx-reference" in err[0]


def test_a_shape_failure_still_gets_the_shape_hint(tmp_path, capsys):
    """A run that fails on its inputs' sizes (a Reshape to 8 values) keeps the hint about shapes."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    shape = helper.make_node("Constant", [], ["shape"], value=helper.make_tensor("s", TensorProto.INT64, [2], [2, 4]))
    graph = helper.make_graph([shape, helper.make_node("Reshape", ["x", "shape"], ["y"])], "reshape", [x], [y])
    path = tmp_path / "reshape.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    code = validate_main([str(path), str(path), "--shapes", "1x5"])
    err = capsys.readouterr().err
    assert code == 1 and "a shape the model cannot take" in err and "has no kernel" not in err


def test_the_build_validates_such_a_model_on_the_evaluator_and_says_what_it_skipped(scatter_add_fp16, tmp_path):
    """export.build --onnx of a model ONNX Runtime's CPU provider cannot run: its graphs are checked
    on onnx's reference evaluator (as every build does), and the ONNX Runtime validation and bench
    are skipped with ONNX Runtime's reason, not a failed build."""
    import json

    from export.build import main as build_main

    out = tmp_path / "out"
    assert build_main(["--onnx", scatter_add_fp16, "--out", str(out), "--backend", "ort-cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["validation"] and all(p["passed"] for p in report["validation"])
    # its ONNX Runtime form is checked there too, as the skip says
    assert {p["candidate"] for p in report["validation"]} == {"fused-tensorrt@onnx-reference", "fused@onnx-reference"}
    skipped = {s["stage"]: s["reason"] for s in report["skipped"]}
    assert skipped["ort-cpu validation"].endswith("fused.onnx was checked with the onnx reference evaluator instead")
    for stage in ("ort-cpu validation", "ort-cpu bench"):
        assert "ONNX Runtime (ort-cpu) has no kernel for one of the model's ops" in skipped[stage]
        assert "MLFloat16 data type is not supported with ScatterND" in skipped[stage]


def test_an_encoder_decoder_folder_is_not_decoded_where_onnx_runtime_cannot_run_it(scatter_add_fp16, tmp_path):
    """The folder build's greedy decoding of an encoder-decoder asks each model's build whether ONNX
    Runtime can run it: where the decoder's validation found a kernel missing, decoding on that
    provider is skipped with the same reason."""
    import shutil

    from rich.console import Console

    from export.build import Pipeline, parse_args
    from export.build_folder import FolderPipeline
    from export.decoder_files import FOLDER_DECODERS, FOLDER_ENCODER

    folder = tmp_path / "t5"
    folder.mkdir()
    decoder, encoder = folder / FOLDER_DECODERS[0], folder / FOLDER_ENCODER
    for path in (decoder, encoder):
        shutil.copy(scatter_add_fp16, path)
    quiet = Console(quiet=True)
    pipelines = {path: Pipeline(parse_args(["--onnx", str(path)]), quiet) for path in (decoder, encoder)}
    for pipeline in pipelines.values():
        pipeline.report = {"config": {"dtype": "float16"}}
    build = FolderPipeline(parse_args(["--onnx", str(folder), "--decode-tokens", "4"]), quiet)
    reason = "ONNX Runtime (ort-cpu) has no kernel for one of the model's ops: ScatterND"
    pipelines[decoder].missing_kernels["ort-cpu"] = reason
    assert build.decode_pair(folder, pipelines, ["ort-cpu"], {}, {}) == []
    assert build.skipped == [{"stage": "ort-cpu greedy decoding", "reason": reason}]
    pipelines[decoder].report = {"config": {"dtype": "bfloat16"}}  # no bfloat16 kernels on the CPU at all
    del pipelines[decoder].missing_kernels["ort-cpu"]
    assert build.decode_pair(folder, pipelines, ["ort-cpu"], {}, {}) == []
    assert build.skipped[-1]["reason"] == "ONNX Runtime's CPU provider has no bfloat16 kernels (MatMul, Mul)"
