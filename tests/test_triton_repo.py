"""Triton model repositories: layout, config.pbtxt parsed with Triton's own ModelConfig."""
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from export.errors import NormfuseError, UsageError
from export.onnx_io import save_model
from export.tensorrt_engine import EngineOptions, Range, io_signature, make_sidecar, sidecar_path
from export.triton_repo import config_text, onnx_signature, parse_config, write_repository
from export.files import write_json

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] is not installed (dev extra)")
from tritonclient.grpc import model_config_pb2  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def graphs(rewritten):
    return rewritten("rmsnorm")


def read_config(folder: Path):
    return parse_config((folder / "config.pbtxt").read_text())


def test_onnx_model_repository(graphs, tmp_path):
    folder = write_repository(graphs["fused"], tmp_path / "repo", name="llama_tiny")
    assert folder == tmp_path / "repo" / "llama_tiny"
    assert (folder / "1" / "model.onnx").read_bytes() == graphs["fused"].read_bytes()
    config = read_config(folder)
    assert config.name == "llama_tiny" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8
    (inp,) = config.input
    (out,) = config.output
    assert inp.name == "hidden_states" and inp.data_type == model_config_pb2.TYPE_FP32
    assert list(inp.dims) == [-1, 64] and list(out.dims) == [-1, 64]  # batch axis left out of dims
    assert config.HasField("dynamic_batching")
    assert config.instance_group[0].count == 1
    # a server running as another user can read it: the model folder is not left at mkdtemp's 0700
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask


def test_a_repository_path_that_is_a_file_is_refused_before_anything_is_written(graphs, tmp_path):
    (tmp_path / "repo").write_text("")
    with pytest.raises(NormfuseError, match="repo: is a file, not a folder$"):
        write_repository(graphs["fused"], tmp_path / "repo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_external_weights_go_into_the_version_folder(graphs, tmp_path):
    model = onnx.load(str(graphs["fused"]))
    split = save_model(model, tmp_path / "src" / "split.onnx", external_data=True)
    assert (tmp_path / "src" / "split.onnx.data").is_file()
    for source in (split, tmp_path / "src" / "split.onnx.data"):  # a user's files kept private: the copies are not
        os.chmod(source, 0o600)
    folder = write_repository(split, tmp_path / "repo")
    assert (folder / "1" / "split.onnx.data").read_bytes() == (tmp_path / "src" / "split.onnx.data").read_bytes()
    umask = os.umask(0o022)
    os.umask(umask)
    for copy in (folder / "1" / "model.onnx", folder / "1" / "split.onnx.data"):
        assert stat.S_IMODE(copy.stat().st_mode) == 0o666 & ~umask, copy
    import onnxruntime as ort

    ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])  # loads its weights


@pytest.mark.parametrize("location", ["../weights.data", "sub/weights.data"])
def test_external_weights_outside_the_model_folder_are_refused(graphs, tmp_path, location):
    # Copied into the version folder, they would no longer be where model.onnx says they are.
    model = onnx.load(str(graphs["fused"]))
    split = save_model(model, tmp_path / "src" / "split.onnx", external_data=True)
    target = (split.parent / location).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    (split.parent / "split.onnx.data").rename(target)
    model = onnx.load(str(split), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(split))
    with pytest.raises(NormfuseError, match="is not beside the model"):
        write_repository(split, tmp_path / "repo")
    assert not (tmp_path / "repo" / "split").exists()


def test_rewriting_a_model_replaces_it_whole(graphs, tmp_path):
    repo = tmp_path / "repo"
    write_repository(graphs["fused"], repo, name="m")
    (repo / "m" / "1" / "stale.txt").write_text("old")
    write_repository(graphs["reference"], repo, name="m", max_batch_size=4)
    assert not (repo / "m" / "1" / "stale.txt").exists()
    assert read_config(repo / "m").max_batch_size == 4
    assert sorted(p.name for p in repo.iterdir()) == ["m"]  # no staging folders left behind


def engine_sidecar(graphs, plan, batch: Range) -> dict:
    """The sidecar export.tensorrt_engine writes beside an engine of the fused stack built with
    `batch` (and sequence 1:64:512). An engine file cannot be made here (no TensorRT); the writer
    reads only its sidecar and copies the plan."""
    from export.tensorrt_engine import profile_shapes

    options = EngineOptions(batch=batch, seq=Range(1, 64, 512))
    return make_sidecar(graphs["trt"], plan, options, tensorrt_version="10.13.0", gpu={},
                        profiles=profile_shapes(graphs["trt"], options.batch, options.seq), build_seconds=1.0,
                        plan_bytes=12)


def test_plan_repository_from_the_engine_sidecar(graphs, tmp_path):
    plan = tmp_path / "fused.plan"
    plan.write_bytes(b"engine bytes")
    write_json(sidecar_path(plan), engine_sidecar(graphs, plan, Range(1, 2, 16)))
    folder = write_repository(plan, tmp_path / "repo")
    config = read_config(folder)
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 16
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert [list(t.dims) for t in config.input] == [[-1, 64]]
    assert (folder / "1" / "model.plan").read_bytes() == b"engine bytes"
    assert (folder / "1" / "fused.plan.json").is_file()
    with pytest.raises(UsageError, match="above the engine profile"):
        write_repository(plan, tmp_path / "repo", max_batch_size=32)
    # a profile from batch 2 up: Triton's batcher may send 1, so the engine is not batched
    write_json(sidecar_path(plan), engine_sidecar(graphs, plan, Range(2, 4, 16)))
    assert read_config(write_repository(plan, tmp_path / "repo2")).max_batch_size == 0
    with pytest.raises(UsageError, match="smallest batch is 2, and Triton may send a batch of 1"):
        write_repository(plan, tmp_path / "repo3", max_batch_size=8)
    sidecar_path(plan).unlink()
    with pytest.raises(NormfuseError, match="sidecar"):
        write_repository(plan, tmp_path / "repo2")


def test_plan_repository_of_an_engine_with_a_scalar_input_or_a_shapeless_output(graphs, tmp_path):
    """A scalar input's profile has no axis 0 (the profile's batch range is read from the others,
    and the model is not batched: Triton would give the scalar a batch axis); an output the graph
    gives no shape, not even a rank, is refused as the .onnx form refuses it, not declared a scalar
    (Triton's TensorRT backend would refuse the model at load)."""
    import copy

    plan = tmp_path / "fused.plan"
    plan.write_bytes(b"engine bytes")
    sidecar = engine_sidecar(graphs, plan, Range(1, 2, 8))
    scalar = copy.deepcopy(sidecar)
    scalar["profiles"][0]["scale"] = {"min": [], "opt": [], "max": []}
    scalar["io"]["inputs"].append({"name": "scale", "dtype": "float32", "shape": [], "dim_params": [], "rank_known": True})
    write_json(sidecar_path(plan), scalar)
    config = read_config(write_repository(plan, tmp_path / "repo"))
    assert config.max_batch_size == 0 and [i.name for i in config.input] == ["hidden_states", "scale"]
    assert list(config.input[1].dims) == [1] and list(config.input[1].reshape.shape) == []
    shapeless = copy.deepcopy(sidecar)
    shapeless["io"]["outputs"][0].update(shape=[], dim_params=[], rank_known=False)
    write_json(sidecar_path(plan), shapeless)
    with pytest.raises(NormfuseError, match="the model gives it no shape, not even its rank"):
        write_repository(plan, tmp_path / "repo2")


def test_fixed_batch_axis_means_no_batching(graphs, tmp_path):
    model = onnx.load(str(graphs["fused"]))
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, str(tmp_path / "fixed.onnx"))
    config = read_config(write_repository(tmp_path / "fixed.onnx", tmp_path / "repo"))
    assert config.max_batch_size == 0 and list(config.input[0].dims)[0] == 1
    assert not config.HasField("dynamic_batching")


def _model_with_outputs(path, outputs):
    """x [batch, seq] -> y [batch, seq] and each of `outputs` (name, dims), all from x."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    for name, dims in outputs:
        if dims == []:
            nodes.append(helper.make_node("ReduceSum", ["x"], [name], keepdims=0))
        else:
            nodes.append(helper.make_node("Identity", ["x"], [name]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"])]
                              + [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in outputs])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


@pytest.mark.parametrize("output,why", [
    (("present", [2, "batch", "seq"]), "output 'present' has a fixed axis 0 of 2"),
    (("loss", []), "output 'loss' has no axis 0"),
    (("flat", ["batch_x_seq", "seq"]), "axis 0 has 2 names (batch, batch_x_seq), so it may not be one batch")])
def test_batching_needs_every_output_on_the_batch_axis_too(tmp_path, output, why):
    """Triton batches outputs along axis 0 as well, and refuses a batching config where one has a
    fixed axis 0 or none; an axis 0 of another name is another size (requests would be mixed)."""
    model = _model_with_outputs(tmp_path / "m.onnx", [output])
    config = read_config(write_repository(model, tmp_path / "repo"))
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    if "names" in why:  # Triton reads no names: asked for, batching is the user's call
        assert read_config(write_repository(model, tmp_path / "repo", name="again", max_batch_size=4)).max_batch_size == 4
    else:
        with pytest.raises(UsageError, match=re.escape(why)):
            write_repository(model, tmp_path / "repo", name="again", max_batch_size=4)
    batched = _model_with_outputs(tmp_path / "ok.onnx", [("z", ["batch", 3])])
    assert read_config(write_repository(batched, tmp_path / "repo")).max_batch_size == 8


@pytest.mark.parametrize("dtype,triton", [("float16", "TYPE_FP16"), ("bfloat16", "TYPE_BF16")])
def test_half_types(dtype, triton):
    from export.triton_repo import IO

    text = config_text("m", "tensorrt_plan", [IO("x", dtype, [None, None, 8])], [IO("y", dtype, [None, None, 8])], 4)
    config = parse_config(text)
    assert config.input[0].data_type == model_config_pb2.DataType.Value(triton)


@pytest.mark.parametrize("max_batch_size,shape", [(8, [None]), (0, [])])
def test_a_tensor_with_no_dims_but_its_batch_is_served_as_one_value_reshaped(max_batch_size, shape):
    """A UNet's timestep is [batch]: without its batch axis nothing is left, and Triton refuses
    empty dims; its docs serve such a tensor as dims [ 1 ] reshaped to [ ] for the model."""
    from export.triton_repo import IO

    text = config_text("m", "onnxruntime_onnx", [IO("t", "float32", shape), IO("x", "float32", [*shape, 4])],
                       [IO("y", "float32", shape)], max_batch_size)
    config = parse_config(text)
    for tensor in (config.input[0], config.output[0]):
        assert list(tensor.dims) == [1] and tensor.HasField("reshape") and list(tensor.reshape.shape) == []
    assert list(config.input[1].dims) == [4] and not config.input[1].HasField("reshape")


@pytest.mark.parametrize("text,words", [
    ('name: "m"\nplatform: "onnxruntime_onnx"\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ ] } ]\n'
     'output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]', "has no dims"),
    ('name: "m"\nplatform: "onnxruntime_onnx"\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 0 ] } ]\n'
     'output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]', "bad dims"),
    ('name: "m"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\ndynamic_batching { }\n'
     'input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]\noutput [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]',
     "max_batch_size"),
    ('name: "m"\nplatform: "onnxruntime_onnx"\ninput [ { name: "x" datatype: TYPE_FP32 } ]', "does not parse"),
    ('name: "m"\nplatform: "onnxruntime_onnx"', "no inputs"),
])
def test_bad_configs_are_refused(text, words):
    with pytest.raises(NormfuseError, match=words):
        parse_config(text)


def test_plugin_graph_and_other_files_are_refused(graphs, tmp_path):
    with pytest.raises(NormfuseError, match="plugin ops"):
        write_repository(graphs["trt"], tmp_path / "repo")
    with pytest.raises(UsageError, match="not a usable Triton model name"):
        write_repository(graphs["fused"], tmp_path / "repo", name="a b")


def test_command_line(graphs, tmp_path):
    done = subprocess.run([sys.executable, "-m", "export.triton_repo", str(graphs["fused"]), str(graphs["reference"]),
                           "--repo", str(tmp_path / "repo")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert {p.name for p in (tmp_path / "repo").iterdir()} == {"fused", graphs["reference"].stem}
    done = subprocess.run([sys.executable, "-m", "export.triton_repo", str(graphs["trt"]), "--repo", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1


def test_two_models_of_one_name_are_refused_before_anything_is_written(graphs, tmp_path, capsys):
    """Optimum's folders all hold a model.onnx: two of them would be one Triton model, the second
    replacing the first."""
    from export.triton_repo import main

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copyfile(graphs["fused"], tmp_path / folder / "model.onnx")
    with pytest.raises(SystemExit) as refused:
        main([str(tmp_path / "a" / "model.onnx"), str(tmp_path / "b" / "model.onnx"), "--repo", str(tmp_path / "repo")])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'a' / 'model.onnx'} and {tmp_path / 'b' / 'model.onnx'} would both be the model 'model'" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "repo").exists()


def test_onnx_signature(graphs):
    inputs, outputs = onnx_signature(graphs["fused"])
    assert [(i.name, i.dtype, i.shape) for i in inputs] == [("hidden_states", "float32", [None, None, 64])]
    assert io_signature(graphs["fused"])["outputs"][0]["name"] == "output"


def test_build_command_writes_a_repository(tmp_path):
    import json

    done = subprocess.run([sys.executable, "-m", "export.build", "--norm", "layernorm", "--preset", "tiny", "--backend",
                           "ort-cpu", "--runs", "2", "--warmup", "0", "--seq", "8", "--out", str(tmp_path / "out"),
                           "--triton-repo", str(tmp_path / "repo")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "repo").iterdir())
    assert names == ["tiny_layernorm_fused_onnx", "tiny_layernorm_reference_onnx"]
    for name in names:
        config = read_config(tmp_path / "repo" / name)
        assert config.name == name and config.platform == "onnxruntime_onnx"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["triton"]) == 2 and report["engines"] == {}


def test_a_build_that_fails_validation_puts_no_fused_model_up_to_be_served(tmp_path, monkeypatch):
    """Held to 1e-12 the fused graph fails: the reference still goes into the repository, the fused
    model does not, and an earlier run's entry for it (from when it passed) is removed."""
    import json

    from export.build import main
    from normops import GRAPH, Tolerance

    monkeypatch.setitem(GRAPH, "float32", Tolerance(atol=1e-12, rtol=0.0))
    earlier = tmp_path / "repo" / "tiny_layernorm_fused_onnx"
    earlier.mkdir(parents=True)
    (earlier / "config.pbtxt").write_text('name: "tiny_layernorm_fused_onnx"\n')
    assert main(["--norm", "layernorm", "--preset", "tiny", "--backend", "ort-cpu", "--runs", "2", "--warmup", "0",
                 "--seq", "8", "--out", str(tmp_path / "out"), "--triton-repo", str(tmp_path / "repo")]) == 1
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["tiny_layernorm_reference_onnx"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["triton"]) == 1
    (reason,) = [s["reason"] for s in report["skipped"] if s["stage"] == "Triton model tiny_layernorm_fused_onnx"]
    assert reason.startswith("validation or decoding failed") and "earlier tiny_layernorm_fused_onnx/ was removed" in reason


def test_a_max_batch_size_of_one_still_leaves_the_batch_axis_out_of_dims(tmp_path):
    """Triton adds the batch axis itself whenever max_batch_size > 0, 1 included."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "m",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    config = read_config(write_repository(path, tmp_path / "repo", max_batch_size=1))
    assert config.max_batch_size == 1 and [list(t.dims) for t in (*config.input, *config.output)] == [[4], [4]]
