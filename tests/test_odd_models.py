"""Models at the edges of what the commands take: an empty file, inputs that are not numbers or
not tensors, a model with no inputs, a float64 model, a model ONNX Runtime's optimizer saved (its
own ops inside), an op nobody knows. Each is either run or refused with a
one-line error naming the file, never an internal error."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_pipeline import _main

OPSET = [helper.make_opsetid("", 17)]


def save(path, nodes, inputs, outputs, initializers=()):
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(initializers)), opset_imports=OPSET),
              path)
    return path


@pytest.fixture
def models(tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    strings = save(tmp_path / "strings.onnx", [helper.make_node("Identity", ["s"], ["o"])],
                   [helper.make_tensor_value_info("s", TensorProto.STRING, ["n"])],
                   [helper.make_tensor_value_info("o", TensorProto.STRING, ["n"])])
    sequence = save(tmp_path / "sequence.onnx", [helper.make_node("SequenceLength", ["s"], ["o"])],
                    [helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)],
                    [helper.make_tensor_value_info("o", TensorProto.INT64, [])])
    constant = save(tmp_path / "constant.onnx",
                    [helper.make_node("Constant", [], ["o"], value=numpy_helper.from_array(np.ones(3, np.float32)))],
                    [], [helper.make_tensor_value_info("o", TensorProto.FLOAT, [3])])
    double = save(tmp_path / "double.onnx", [helper.make_node("LayerNormalization", ["x", "g"], ["o"], axis=-1)],
                  [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["batch", "seq", 8])],
                  [helper.make_tensor_value_info("o", TensorProto.DOUBLE, ["batch", "seq", 8])],
                  [numpy_helper.from_array(np.ones(8), "g")])
    shapeless = save(tmp_path / "shapeless.onnx", [helper.make_node("LayerNormalization", ["x", "g"], ["o"], axis=-1)],
                     [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                     [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)],
                     [numpy_helper.from_array(np.ones(8, np.float32), "g")])
    return {"empty": empty, "strings": strings, "sequence": sequence, "constant": constant, "double": double,
            "shapeless": shapeless}


@pytest.mark.parametrize("command", [
    ("export.rewrite", "{m}", "-o", "{out}/r.onnx"), ("export.validate", "{m}", "{m}"),
    ("export.bench", "{m}", "{m}", "--runs", "1"), ("export.run", "{m}", "--random", "1x4"),
    ("export.decode", "{m}"), ("export.triton_repo", "{m}", "--repo", "{out}/repo"),
    ("export.build", "--onnx", "{m}", "--out", "{out}/build"),
])
def test_an_empty_file_is_not_a_model(models, tmp_path, capsys, command):
    module, *args = command
    code, stderr = _main(module, *(a.format(m=models["empty"], out=tmp_path) for a in args), capsys=capsys)
    assert code == 1 and len(stderr.strip().splitlines()) == 1
    assert f"{models['empty']}: not an ONNX model: it has no graph" in stderr
    assert not (tmp_path / "r.onnx").exists() and not (tmp_path / "repo").exists() and not (tmp_path / "build").exists()


def test_inputs_that_are_not_tensors_or_not_numbers(models, tmp_path, capsys):
    for module, args in (("export.bench", [str(models["sequence"])] * 2 + ["--runs", "1"]),
                         ("export.triton_repo", [str(models["sequence"]), "--repo", str(tmp_path / "repo")])):
        code, stderr = _main(module, *args, capsys=capsys)
        assert code == 1 and f"{models['sequence']}: 's' is a sequence, not a tensor" in stderr
    code, stderr = _main("export.run", str(models["strings"]), "--random", "1x4", capsys=capsys)
    assert code == 1 and "input 's' holds tensor(string): random inputs are numbers only; give your own" in stderr
    code, stderr = _main("export.bench", str(models["strings"]), str(models["strings"]), capsys=capsys)
    assert code == 1 and "input 's' holds string: random inputs are numbers only" in stderr
    # Triton serves strings (TYPE_STRING), so a repository is written
    assert _main("export.triton_repo", str(models["strings"]), "--repo", str(tmp_path / "repo"), capsys=capsys)[0] == 0
    assert "data_type: TYPE_STRING" in (tmp_path / "repo" / "strings" / "config.pbtxt").read_text()


def test_a_model_without_inputs_is_timed_as_it_is(models, tmp_path, capsys):
    code, _ = _main("export.bench", str(models["constant"]), str(models["constant"]), "--runs", "2", "--warmup", "0",
                    "--json", str(tmp_path / "b.json"), capsys=capsys)
    assert code == 0
    assert [r["shape"] for r in json.loads((tmp_path / "b.json").read_text())] == [[1, 1], [1, 1]]


def test_a_float64_model_is_validated_with_its_own_tolerance(models, tmp_path, capsys):
    code, _ = _main("export.validate", str(models["double"]), str(models["double"]), "--json", str(tmp_path / "v.json"),
                    capsys=capsys)
    assert code == 0
    pairs = json.loads((tmp_path / "v.json").read_text())
    assert pairs and all(p["passed"] and p["dtype"] == "float64" for p in pairs)


def test_an_input_without_a_shape_takes_any_rank(models, tmp_path, capsys):
    """An input the model gives no shape (not even a rank) takes the user's arrays as they are; ONNX
    Runtime reports it as a scalar, which is not what it is. Random inputs cannot be made up for it."""
    from export.runtime import load

    model = load(models["shapeless"], providers=["CPUExecutionProvider"])
    (spec,) = model.inputs
    assert not spec.rank_known and spec.describe() == "float32[any shape]"
    assert model.run({"x": np.ones((2, 3, 8), np.float32)})["o"].shape == (2, 3, 8)
    inputs = tmp_path / "x.npz"
    np.savez(inputs, x=np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32))
    assert _main("export.validate", str(models["shapeless"]), str(models["shapeless"]), "--inputs", str(inputs),
                 capsys=capsys)[0] == 0
    for module, args in (("export.run", ["--random", "1x4"]), ("export.validate", [str(models["shapeless"])]),
                         ("export.triton_repo", ["--repo", str(tmp_path / "repo")])):
        code, stderr = _main(module, str(models["shapeless"]), *args, capsys=capsys)
        assert code == 1 and len(stderr.strip().splitlines()) == 1 and str(models["shapeless"]) in stderr
        assert "has no shape in the model" in stderr or "gives it no shape, not even its rank" in stderr
    scalar = save(tmp_path / "scalar.onnx", [helper.make_node("Neg", ["x"], ["o"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
                  [helper.make_tensor_value_info("o", TensorProto.FLOAT, [])])
    (spec,) = load(scalar, providers=["CPUExecutionProvider"]).inputs
    assert spec.rank_known and spec.shape == ()


def test_onnx_runtimes_own_ops_run_in_the_reference_evaluator(exported, tmp_path, capsys):
    """A model ONNX Runtime's optimizer has saved holds its contrib ops (FusedMatMul, QuickGelu)
    beside the norms: onnx's evaluator hands those nodes to ONNX Runtime, so the TensorRT-target
    graph is still checked against the reference instead of failing with an internal error."""
    import onnxruntime as ort

    optimised = tmp_path / "ort-optimised.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(optimised)
    ort.InferenceSession(str(exported("rmsnorm")), options, providers=["CPUExecutionProvider"])
    assert any(n.domain == "com.microsoft" and n.op_type == "FusedMatMul" for n in onnx.load(str(optimised)).graph.node)
    out = tmp_path / "out"
    assert _main("export.build", "--onnx", str(optimised), "--runs", "2", "--warmup", "0", "--out", str(out),
                 capsys=capsys) == (0, "")
    report = json.loads((out / "report.json").read_text())
    checked = [p for p in report["validation"] if p["candidate"] == "fused-tensorrt@onnx-reference"]
    assert checked and all(p["passed"] for p in checked) and report["rewrite"]["fused"] == 5

    from export.rewrite.evaluate import run_model

    x = np.random.default_rng(0).standard_normal((2, 3, 64)).astype(np.float32)
    session = ort.InferenceSession(str(optimised), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(run_model(onnx.load(str(optimised)), {"hidden_states": x})[0],
                               session.run(None, {"hidden_states": x})[0], rtol=1e-5, atol=1e-5)


def test_an_op_nobody_knows_is_a_one_line_failure(tmp_path, capsys):
    path = save(tmp_path / "custom.onnx", [helper.make_node("Mystery", ["x"], ["y"], domain="example.custom")],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])
    model = onnx.load(str(path))
    model.opset_import.append(helper.make_opsetid("example.custom", 1))
    onnx.save(model, str(path))
    code, err = _main("export.validate", str(path), str(path), "--backend", "onnx-reference", capsys=capsys)
    err = err.strip().splitlines()
    assert code == 1 and len(err) == 1 and str(path) in err[0] and "example.custom::Mystery is an op neither" in err[0]
    assert "internal error" not in err[0] and "a shape the model cannot take" not in err[0]  # no inputs would help


@pytest.mark.parametrize("training", [True, False])
def test_a_model_exported_in_training_mode_is_named_as_random(tmp_path, capsys, training):
    """Torch writes the Dropouts of a model exported in training mode with training_mode True: its
    outputs differ from run to run, and validation says so instead of failing every comparison."""
    inits = [numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
             numpy_helper.from_array(np.array(training), "training_mode")]
    path = save(tmp_path / "dropout.onnx", [helper.make_node("Dropout", ["x", "ratio", "training_mode"], ["y"], name="drop")],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])], inits)
    model = onnx.load(str(path))
    model.opset_import[0].version = 18
    onnx.save(model, str(path))
    code, err = _main("export.validate", str(path), str(path), capsys=capsys)
    if training:
        assert code == 1 and len(err.strip().splitlines()) == 1
        assert "its outputs change from run to run" in err and "Dropout 'drop' runs in training mode" in err
    else:
        assert code == 0, err


def test_a_dropout_in_training_mode_inside_a_branch_is_found(tmp_path, capsys):
    """The random node may sit in an If branch, as a model with a data-dependent path exports it."""
    def branch(name, training):
        nodes = [helper.make_node("Constant", [], [f"{name}_ratio"], value=numpy_helper.from_array(np.array(0.5, np.float32))),
                 helper.make_node("Constant", [], [f"{name}_mode"], value=numpy_helper.from_array(np.array(training))),
                 helper.make_node("Dropout", ["x", f"{name}_ratio", f"{name}_mode"], [f"{name}_y"], name=f"{name}_drop")]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)])

    cond = numpy_helper.from_array(np.array(True), "cond")
    path = save(tmp_path / "branch.onnx",
                [helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", True), else_branch=branch("else", False))],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], [cond])
    model = onnx.load(str(path))
    model.opset_import[0].version = 18
    onnx.save(model, str(path))
    code, err = _main("export.validate", str(path), str(path), capsys=capsys)
    assert code == 1 and "Dropout 'then_drop' runs in training mode" in err


def test_a_qdq_quantised_model_is_validated_as_written(exported, tmp_path, capsys):
    """ONNX Runtime's QDQ quantiser puts a Q/DQ pair between every step: its RMSNorms are no exact
    norms and nothing fuses, and the build says which means it left. ONNX Runtime's extended
    optimisations run Q/DQ pairs as int8 kernels that round otherwise (0.37 max abs here), so the
    fused side runs with its basic ones and the graphs, identical, compare equal; onnx's evaluator
    has no DequantizeLinear for opset 18, which ONNX Runtime runs for it."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    source = exported("rmsnorm")

    class Calibration(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{"hidden_states": rng.standard_normal((1, 8, 64)).astype(np.float32)} for _ in range(2)])

        def get_next(self):
            return next(self.batches, None)

    quantised = tmp_path / "qdq.onnx"
    quantize_static(str(source), str(quantised), Calibration(), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul", "Mul", "Add", "Div", "Pow", "ReduceMean", "Sqrt"])
    out = tmp_path / "out"
    code, err = _main("export.build", "--onnx", str(quantised), "--runs", "2", "--warmup", "0", "--out", str(out),
                      "--decode-tokens", "0", capsys=capsys)
    assert (code, err) == (0, "")
    report = json.loads((out / "report.json").read_text())
    assert report["rewrite"]["fused"] == 0 and len(report["rewrite"]["tensorrt"]["unmatched_means"]) == 5
    assert "5 ReduceMean node(s) over the last axis are in no norm found" in (out / "report.md").read_text()
    ort_pairs = [p for p in report["validation"] if p["candidate"].endswith("@ort-cpu")]
    assert ort_pairs and all(p["passed"] and p["candidate_optimization"] == "basic" for p in ort_pairs)


def test_an_op_only_onnx_runtimes_cuda_provider_runs_is_said_so(tmp_path, capsys):
    """ONNX Runtime's transformers optimizer writes T5's relative position bias as
    com.microsoft::RelativePositionBias, which only its CUDA provider implements: on this machine
    the one line says the model cannot run here, and why."""
    table = helper.make_tensor("table", TensorProto.FLOAT, [32, 2], np.zeros(64, np.float32).tolist())
    length = helper.make_tensor("length", TensorProto.INT64, [], [4])
    nodes = [helper.make_node("RelativePositionBias", ["table", "length", "length"], ["bias"], domain="com.microsoft",
                              name="RelPosBias_0", max_distance=128, is_bidirectional=1),
             helper.make_node("Add", ["x", "bias"], ["y"])]
    path = save(tmp_path / "t5_bias.onnx", nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])], initializers=[table, length])
    model = onnx.load(str(path))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(path))
    code, err = _main("export.validate", str(path), str(path), "--backend", "onnx-reference", capsys=capsys)
    err = err.strip().splitlines()
    assert code == 1 and len(err) == 1 and str(path) in err[0]
    assert "RelativePositionBias (node 'RelPosBias_0') has no kernel on ONNX Runtime's CPU provider" in err[0]
    assert "only its CUDA provider runs" in err[0]


def test_a_1d_global_max_pool_keeps_its_channels_in_the_reference_evaluator():
    """onnx's own GlobalMaxPool (to 1.23) also reduces the channels of an [N, C, W] input (onnx
    issue 7682), which breaks TensorFlow's 1-D global max pooling as tf2onnx writes it; normfuse's
    evaluator runs the operator as defined, and ONNX Runtime agrees."""
    import onnxruntime as ort

    from export.rewrite.evaluate import run_model

    graph = helper.make_graph([helper.make_node("GlobalMaxPool", ["x"], ["y"])], "pool",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(0).standard_normal((2, 4, 10)).astype(np.float32)
    (y,) = run_model(model, {"x": x})
    np.testing.assert_array_equal(y, x.max(axis=2, keepdims=True))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(y, session.run(None, {"x": x})[0])


@pytest.mark.parametrize("data_shape, index_shape, axis", [((3, 300), (2, 16), 1), ((1, 256), (1, 16), 1),
                                                           ((5, 4, 70), (5, 2, 70), -2), ((80, 3), (90, 3), 0)])
def test_gather_elements_with_shorter_indices_and_many_choices_in_the_reference_evaluator(data_shape, index_shape, axis):
    """torch.gather lets the index be shorter than the data on the other axes (BERT's token-type
    buffer, read up to the sequence's length), and there may be more than 32 values to pick from:
    onnx's own GatherElements (to 1.23) fails on both, so BERT could not be validated on the
    evaluator. normfuse's picks as the operator says, negative indices too, and ONNX Runtime agrees."""
    import onnxruntime as ort

    from export.rewrite.evaluate import run_model

    graph = helper.make_graph([helper.make_node("GatherElements", ["data", "index"], ["y"], axis=axis)], "gather",
                              [helper.make_tensor_value_info("data", TensorProto.FLOAT, list(data_shape)),
                               helper.make_tensor_value_info("index", TensorProto.INT64, list(index_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    rng = np.random.default_rng(0)
    data = rng.standard_normal(data_shape).astype(np.float32)
    size = data_shape[axis]
    index = rng.integers(-size, size, index_shape)
    (y,) = run_model(model, {"data": data, "index": index})
    expected = np.empty(index_shape, np.float32)  # the operator's definition, element by element
    for position in np.ndindex(*index_shape):
        source = list(position)
        source[axis] = index[position] % size
        expected[position] = data[tuple(source)]
    np.testing.assert_array_equal(y, expected)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(y, session.run(None, {"data": data, "index": index})[0])


@pytest.mark.parametrize("pads, mode, axes", [([0, 1, 0, -1], "constant", None), ([0, -2, 1, 3], "constant", None),
                                              ([-1, 2], "edge", [1]), ([2, -1], "reflect", [-1]), ([1, 0, 0, -2], "constant", None)])
def test_negative_pads_crop_in_the_reference_evaluator(pads, mode, axes):
    """A negative pad removes values from its end of the axis (RWKV's time shift pads the sequence
    by 1 in front and -1 behind); onnx's own Pad (to 1.23) refuses it. normfuse's crops, then pads,
    and ONNX Runtime agrees, with and without the axes input."""
    import onnxruntime as ort

    from export.rewrite.evaluate import run_model

    inputs = ["x", "pads", "value"] + (["axes"] if axes is not None else [])
    graph = helper.make_graph([helper.make_node("Pad", inputs, ["y"], mode=mode)], "pad",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array(pads, np.int64), "pads"),
                               numpy_helper.from_array(np.array(7.0, np.float32), "value")] +
                              ([numpy_helper.from_array(np.array(axes, np.int64), "axes")] if axes is not None else []))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = np.arange(15, dtype=np.float32).reshape(3, 5)
    (y,) = run_model(model, {"x": x})
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(y, session.run(None, {"x": x})[0])
    if pads == [0, 1, 0, -1]:  # the time shift: each row moved one step along, 7 in front
        np.testing.assert_array_equal(y, np.concatenate([np.full((3, 1), 7.0, np.float32), x[:, :-1]], axis=1))


POOLS_AND_CONVS = [
    ("Conv", [(1, 4, 9, 9), (6, 2, 3, 3), (6,)], {"group": 2, "pads": [1, 0, 1, 2], "strides": [2, 1]}),
    ("ConvTranspose", [(1, 4, 5, 5), (4, 3, 3, 3), (3,)], {"strides": [2, 2], "output_padding": [1, 1]}),
    ("AveragePool", [(2, 3, 9, 9)], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 0, "ceil_mode": 1,
                                     "strides": [2, 2]}),
    ("MaxPool", [(2, 3, 9, 9)], {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 0, 1, 0]}),
    ("GlobalAveragePool", [(2, 5, 7, 3)], {}),
    ("LpPool", [(2, 3, 8, 8)], {"kernel_shape": [2, 2], "p": 2}),
    # at opset 20, whose mode names onnx's own kernel knows (it refuses GridSample-16's "bilinear")
    ("GridSample", [(2, 3, 6, 7), (2, 4, 5, 2)], {"align_corners": 0, "mode": "linear", "padding_mode": "zeros"}),
    ("GridSample", [(1, 2, 5, 5), (1, 3, 3, 2)], {"align_corners": 1, "mode": "nearest", "padding_mode": "border"}),
]


@pytest.mark.parametrize("op_type, shapes, attributes", POOLS_AND_CONVS, ids=[case[0] for case in POOLS_AND_CONVS])
def test_convolutions_and_pools_run_in_float32_by_onnx_runtime_in_the_reference_evaluator(op_type, shapes, attributes):
    """onnx's own convolution, pool and GridSample kernels loop in Python (a bf16 PoolFormer's
    AveragePool took 11.8 of its 12.5 s) and sum half inputs in the half type. normfuse's evaluator has ONNX Runtime
    compute them in float32: on float32 inputs as onnx's own do (to float32 rounding), on bfloat16
    inputs exactly ONNX Runtime's float32 result rounded to bfloat16; float64 keeps onnx's own."""
    import ml_dtypes
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    from export.rewrite.evaluate import run_model

    def model(element):
        names = ["x", "w", "b"][:len(shapes)]
        outputs = ["y", "indices"] if op_type == "MaxPool" else ["y"]
        graph = helper.make_graph(
            [helper.make_node(op_type, names, outputs, **attributes)], op_type.lower(),
            [helper.make_tensor_value_info(n, element, list(s)) for n, s in zip(names, shapes)],
            [helper.make_tensor_value_info(o, TensorProto.INT64 if o == "indices" else element, None) for o in outputs])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20 if op_type == "GridSample" else 18)])

    rng = np.random.default_rng(0)
    values = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    feeds32 = dict(zip(["x", "w", "b"], values))
    got = run_model(model(TensorProto.FLOAT), feeds32)
    own = ReferenceEvaluator(model(TensorProto.FLOAT)).run(None, feeds32)
    for mine, theirs in zip(got, own):
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-5)

    half = {n: v.astype(ml_dtypes.bfloat16) for n, v in feeds32.items()}
    got = run_model(model(TensorProto.BFLOAT16), half)
    session = ort.InferenceSession(model(TensorProto.FLOAT).SerializeToString(), providers=["CPUExecutionProvider"])
    wide = session.run(None, {n: v.astype(np.float32) for n, v in half.items()})
    assert got[0].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got[0], wide[0].astype(ml_dtypes.bfloat16))
    if op_type == "MaxPool":
        assert got[1].dtype == np.int64
        np.testing.assert_array_equal(got[1], wide[1])

    feeds64 = {n: v.astype(np.float64) for n, v in feeds32.items()}
    got = run_model(model(TensorProto.DOUBLE), feeds64)
    np.testing.assert_allclose(got[0], ReferenceEvaluator(model(TensorProto.DOUBLE)).run(None, feeds64)[0], rtol=1e-12)
