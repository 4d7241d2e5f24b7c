"""export.runtime on ONNX Runtime: one interface, numpy and torch in and out, input checks, threads."""
import threading

import numpy as np
import onnxruntime as ort
import pytest

from export.errors import NormfuseError
from export.runtime import (OrtModel, TensorSpec, check_feeds, check_named_dims_agree, load, numpy_dtype, to_numpy,
                            to_torch)


@pytest.fixture(scope="module")
def graphs(rewritten):
    return rewritten("rmsnorm")


def feeds(batch=2, seq=7, seed=0):
    return {"hidden_states": np.random.default_rng(seed).standard_normal((batch, seq, 64)).astype(np.float32)}


def test_onnx_model_matches_a_plain_session(graphs):
    model = load(graphs["fused"], providers=["CPUExecutionProvider"])
    assert isinstance(model, OrtModel)
    assert model.inputs == [TensorSpec("hidden_states", "float32", (None, None, 64), ("batch", "seq", None))]
    assert model.output_names == ["output"]
    assert repr(model) == (f"OrtModel({graphs['fused']} on CPUExecutionProvider: "
                           "hidden_states float32[?, ?, 64] -> output float32[?, ?, 64])")
    x = feeds()
    got = model.run(x)["output"]
    want = ort.InferenceSession(str(graphs["fused"]), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_default_providers_are_what_is_present(graphs):
    model = load(graphs["fused"])
    assert model.providers[-1] == "CPUExecutionProvider"
    assert set(model.providers) <= set(ort.get_available_providers())


def test_torch_in_torch_out(graphs):
    torch = pytest.importorskip("torch")
    model = load(graphs["fused"], providers=["CPUExecutionProvider"])
    x = feeds(1, 5)
    out = model.run({"hidden_states": torch.from_numpy(x["hidden_states"])})["output"]
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and tuple(out.shape) == (1, 5, 64)
    np.testing.assert_array_equal(out.numpy(), model.run(x)["output"])


def test_bfloat16_round_trips_between_numpy_and_torch():
    torch = pytest.importorskip("torch")
    values = np.array([[1.0, -2.5, 3.140625]], dtype=numpy_dtype("bfloat16"))
    tensor = to_torch(values)
    assert tensor.dtype == torch.bfloat16
    back = to_numpy(tensor)
    assert back.dtype == numpy_dtype("bfloat16")
    np.testing.assert_array_equal(back.astype(np.float32), values.astype(np.float32))


SPECS = [TensorSpec("hidden_states", "float32", (None, None, 64))]


@pytest.mark.parametrize("feeds_,words", [
    ({"hidden": np.zeros((1, 2, 64), np.float32)}, ["'hidden'", "not an input", "hidden_states"]),
    ({}, ["'hidden_states'", "missing"]),
    ({"hidden_states": np.zeros((1, 2, 64), np.float64)}, ["'hidden_states'", "float64", "float32"]),
    ({"hidden_states": np.zeros((2, 64), np.float32)}, ["'hidden_states'", "rank 2", "rank 3"]),
    ({"hidden_states": np.zeros((1, 2, 32), np.float32)}, ["'hidden_states'", "axis 2", "64"]),
    ({"hidden_states": np.zeros((0, 2, 64), np.float32)}, ["'hidden_states'", "empty"]),
])
def test_mismatched_inputs_are_one_line_errors_naming_the_input(feeds_, words):
    with pytest.raises(NormfuseError) as info:
        check_feeds(SPECS, feeds_, "m.onnx")
    message = str(info.value)
    assert "\n" not in message and message.startswith("m.onnx: ")
    for word in words:
        assert word in message


def test_run_checks_inputs_before_running(graphs):
    model = load(graphs["fused"], providers=["CPUExecutionProvider"])
    with pytest.raises(NormfuseError, match="rank 2"):
        model.run({"hidden_states": np.zeros((3, 64), np.float32)})


def test_calls_from_several_threads_agree(graphs):
    model = load(graphs["fused"], providers=["CPUExecutionProvider"])
    inputs = [feeds(1 + i % 2, 3 + i, seed=i) for i in range(8)]
    expected = [model.run(x)["output"] for x in inputs]
    results: dict = {}

    def work(i):
        for _ in range(5):
            results[i] = model.run(inputs[i])["output"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, want in enumerate(expected):
        np.testing.assert_array_equal(results[i], want)


def test_cpu_runs_of_one_model_go_side_by_side(graphs):
    """ONNX Runtime takes concurrent runs of one session: on the CPU provider `run` and
    `run_keeping` share no state of the model's, so they do not wait for each other (here, for a
    lock another caller holds: only the CUDA path's reused binding takes it)."""
    model = load(graphs["fused"], providers=["CPUExecutionProvider"])
    x = feeds(1, 4)
    done = []
    with model._lock:
        thread = threading.Thread(target=lambda: done.append((model.run(x), model.run_keeping(x, ()))))
        thread.start()
        thread.join(timeout=60)
        assert done, "a CPU run waited for the lock"


def test_plugin_graph_is_refused_plainly(graphs):
    with pytest.raises(NormfuseError, match="normfuse plugin ops"):
        load(graphs["trt"])


def test_unknown_and_missing_files(tmp_path, graphs):
    with pytest.raises(NormfuseError, match="no such file"):
        load(tmp_path / "none.onnx")
    other = tmp_path / "model.bin"
    other.write_bytes(b"x")
    with pytest.raises(NormfuseError, match="expected .onnx or .plan"):
        load(other)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(NormfuseError, match="not a readable ONNX model"):
        load(broken)
    with pytest.raises(NormfuseError, match="TensorRT engines only"):
        load(graphs["fused"], cuda_graph=True)


def test_absent_provider_is_named(graphs):
    with pytest.raises(NormfuseError, match="NoSuchExecutionProvider"):
        load(graphs["fused"], providers=["NoSuchExecutionProvider"])


def test_plan_without_tensorrt_says_how_to_install(tmp_path):
    from export.tensorrt_engine import tensorrt_status

    if tensorrt_status()[0]:
        pytest.skip("TensorRT is importable here")
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"\0" * 16)
    with pytest.raises(NormfuseError, match="pip install tensorrt"):
        load(plan)


@pytest.mark.gpu
def test_cuda_provider_with_io_binding_matches_cpu(graphs):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu is not installed)")
    cpu = load(graphs["fused"], providers=["CPUExecutionProvider"])
    gpu = load(graphs["fused"], providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert gpu.on_cuda
    for x in (feeds(1, 9), feeds(1, 9, seed=1), feeds(2, 4)):  # same shape twice: the buffer is reused
        np.testing.assert_allclose(gpu.run(x)["output"], cpu.run(x)["output"], atol=1e-4, rtol=1e-3)
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        x = torch.from_numpy(feeds(1, 9)["hidden_states"]).cuda()
        out = gpu.run({"hidden_states": x})["output"]
        assert out.is_cuda
        gpu.bind({"hidden_states": x})
        gpu.run_bound()


@pytest.mark.gpu
def test_cuda_sessions_take_fp32_statistics_no_tf32_and_a_pool_grown_by_what_is_asked(graphs):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu is not installed)")
    gpu = load(graphs["fused"], providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    options = gpu.session.get_provider_options()["CUDAExecutionProvider"]
    assert options["enable_skip_layer_norm_strict_mode"] == "1" and options["use_tf32"] == "0"
    assert options["arena_extend_strategy"] == "kSameAsRequested"


def test_a_cuda_provider_that_runs_on_the_cpu_is_not_available(monkeypatch):
    """onnxruntime-gpu lists its CUDA provider whether or not its libraries load; a session then
    runs quietly on the CPU. Here (CPU onnxruntime, told it had the provider and a GPU) the probe
    session does just that, and ort-cuda is skipped with the reason instead of failing the build."""
    from export import backends

    monkeypatch.setattr(backends, "ort_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(backends, "gpu_present", lambda: backends.Availability(True))
    backends.cuda_provider_loads.cache_clear()
    try:
        found = backends.availability("ort-cuda")
        assert not found.present and found.reason.startswith("ONNX Runtime's CUDA provider did not load (")
        chosen, skipped = backends.resolve_backends("auto")
        assert "ort-cuda" not in chosen and any(s["reason"] == found.reason for s in skipped)
    finally:
        backends.cuda_provider_loads.cache_clear()


def test_a_cuda_fallback_is_told_in_onnx_runtimes_words_where_it_gave_them():
    from export.runtime import cuda_fallback_message

    said = "EP Error [ONNXRuntimeError] : 1 : FAIL : CUDA failure 100: no CUDA-capable device is detected"
    assert cuda_fallback_message(said) == f"ONNX Runtime's CUDA provider did not load ({said})"
    assert "cuDNN 9 and cuBLAS" in cuda_fallback_message("")


def test_bfloat16_outputs_reach_numpy():
    pytest.importorskip("torch")
    import ml_dtypes

    from export.runtime import ortvalue_to_numpy

    x = np.array([[1.5, -2.0, 3.0]], dtype=ml_dtypes.bfloat16)
    value = ort.OrtValue.ortvalue_from_shape_and_type([1, 3], 16, "cpu", 0)  # 16: ONNX BFLOAT16
    value.update_inplace(x.view(np.uint16))
    out = ortvalue_to_numpy(value)
    assert out.dtype == numpy_dtype("bfloat16")
    np.testing.assert_array_equal(out.astype(np.float32), [[1.5, -2.0, 3.0]])
    f32 = ort.OrtValue.ortvalue_from_numpy(np.ones((2, 2), np.float32))
    assert ortvalue_to_numpy(f32).dtype == np.float32


def test_the_op_class_summary_leaves_out_a_sessions_first_run(graphs, tmp_path):
    """A real profile of 1 + 3 runs: the summary is the last three runs' kernels, per run."""
    import json

    from export.op_classes import summarise_profile

    model = OrtModel(graphs["reference"], providers=["CPUExecutionProvider"], profile_prefix=str(tmp_path / "p"))
    for _ in range(4):
        model.run(feeds())
    path = model.session.end_profiling()
    events = json.load(open(path))
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    later = sum(e["dur"] for e in kernels if e["ts"] >= starts[1]) / 1000.0 / 3
    summary = summarise_profile(path, set(), runs=3, skip_runs=1)
    assert sum(c["time_ms"] for c in summary.values()) == pytest.approx(later)
    assert sum(c["kernels"] for c in summary.values()) == len(kernels) // 4
    with pytest.raises(ValueError, match="4 runs profiled, expected 1 \\+ 4"):
        summarise_profile(path, set(), runs=4, skip_runs=1)


def test_int4_matrix_products_count_as_matmul(tmp_path):
    """ONNX Runtime's MatMulNBits (int4 weights, as onnxruntime-genai writes every projection) is a
    matrix product: its time and its 2*M*N*K FLOPs go to the matmul class, not elementwise."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from export.op_classes import summarise_profile

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 128])], [weight])
    quantizer = MatMulNBitsQuantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), block_size=32)
    quantizer.process()
    path = tmp_path / "int4.onnx"
    onnx.save(quantizer.model.model, str(path))
    assert [n.op_type for n in onnx.load(str(path)).graph.node] == ["MatMulNBits"]
    model = OrtModel(path, providers=["CPUExecutionProvider"], profile_prefix=str(tmp_path / "p"))
    for _ in range(2):
        model.run({"x": np.ones((1, 16, 64), np.float32)})
    summary = summarise_profile(model.session.end_profiling(), set(), runs=1, skip_runs=1)
    assert summary["matmul"]["kernels"] == 1 and summary["elementwise"]["kernels"] == 0
    assert summary["matmul"]["flops"] == 2 * 16 * 128 * 64


def test_a_failed_run_gives_onnx_runtimes_reason_not_its_source_path(tmp_path):
    """ONNX Runtime names its source file and function before the reason: left out, so the one line
    keeps what went wrong (here a Reshape that cannot infer -1 from an empty axis)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from export.errors import RunFailure

    shape = numpy_helper.from_array(np.array([0, 0, -1, 4], np.int64), "shape")
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "r.onnx"))
    model = load(tmp_path / "r.onnx", providers=["CPUExecutionProvider"])
    with pytest.raises(RunFailure) as failed:
        model.run({"x": np.zeros((1, 0, 8), np.float32)})
    message = str(failed.value)
    assert "onnxruntime_src" not in message and "cannot be reshaped" in message, message
    assert message.startswith(f"{tmp_path / 'r.onnx'}: ONNX Runtime failed to run it on x [1, 0, 8]: "), message


def test_axes_of_one_name_must_have_one_size_for_tensorrt():
    """ONNX means two axes named alike to be equal, and TensorRT checks it: a mask one token short
    is refused before the engine runs (`check_named_dims_agree`, which TensorRTModel calls). A name
    that is arithmetic over others ('past + seq') is not held to anything: that reading is
    normfuse's, not ONNX's."""
    specs = [TensorSpec("input_ids", "int64", (None, None), ("batch", "seq")),
             TensorSpec("attention_mask", "int64", (None, None), ("batch", "seq")),
             TensorSpec("past", "float32", (None, 4, None), ("batch", None, "past + seq"))]
    ids, mask, past = np.zeros((2, 5), np.int64), np.ones((2, 5), np.int64), np.zeros((2, 4, 9), np.float32)
    check_named_dims_agree(specs, {"input_ids": ids, "attention_mask": mask, "past": past}, "m.plan")
    with pytest.raises(NormfuseError) as info:
        check_named_dims_agree(specs, {"input_ids": ids, "attention_mask": mask[:, :4], "past": past}, "m.plan")
    assert str(info.value) == ("m.plan: input 'attention_mask' has 4 on axis 1 and input 'input_ids' 5 on axis 1, "
                               "but the model names both axes 'seq': one name, one size")
    with pytest.raises(NormfuseError, match="'past' has 3 on axis 0 and input 'input_ids' 2 on axis 0.*'batch'"):
        check_named_dims_agree(specs, {"input_ids": ids, "attention_mask": mask, "past": np.zeros((3, 4, 9), np.float32)},
                               "m.plan")
    # check_feeds, which ONNX Runtime's models call, holds no name to one size
    check_feeds(specs, {"input_ids": ids, "attention_mask": mask[:, :4], "past": past}, "m.onnx")
    # an empty axis is a placeholder (a merged decoder's first step takes its whole cache empty)
    cache = [TensorSpec("encoder_states", "float32", (None, None, 8), ("batch", "encoder_length", None)),
             TensorSpec("past_encoder_key", "float32", (None, None, 8), ("batch", "encoder_length", None))]
    check_named_dims_agree(cache, {"encoder_states": np.zeros((2, 6, 8), np.float32),
                                   "past_encoder_key": np.zeros((2, 0, 8), np.float32)}, "m.plan")


def test_onnx_runtime_runs_axes_of_one_name_at_two_sizes(tmp_path):
    """torch's dynamo exporter names each axis after its dynamic shapes' string, and two inputs given
    "sequence" stay free of each other (an encoder's and a decoder's ids): ONNX Runtime runs them at
    two lengths, and so does normfuse's runtime on it."""
    torch = pytest.importorskip("torch")

    class Two(torch.nn.Module):
        def forward(self, a, b):
            return a.sum(1) + b.sum(1)

    path = tmp_path / "two.onnx"
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(Two(), (torch.randn(2, 5), torch.randn(2, 7)), str(path), dynamo=True,
                      dynamic_shapes={"a": axes, "b": axes}, input_names=["a", "b"])
    model = load(path, providers=["CPUExecutionProvider"])
    assert [s.dim_params for s in model.inputs] == [("batch", "sequence")] * 2
    a, b = np.ones((2, 16), np.float32), np.ones((2, 7), np.float32)
    (out,) = model.run({"a": a, "b": b}).values()
    np.testing.assert_array_equal(out, [23, 23])


def embedding_model(path, rows=10):
    """ids [batch, seq] -> their rows of a rows x 4 table, through a Reshape as GPT-2 views its ids."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.arange(rows * 4, dtype=np.float32).reshape(rows, 4), "table")
    shape = numpy_helper.from_array(np.array([-1, 0], np.int64), "shape")
    graph = helper.make_graph([helper.make_node("Reshape", ["ids", "shape"], ["flat"]),
                               helper.make_node("Gather", ["table", "flat"], ["y"])], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [table, shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_a_token_past_the_vocabulary_is_named_with_its_input(tmp_path):
    """ONNX Runtime's error names a Gather inside the graph; normfuse's names the input, the
    value and the table it indexes. Negative ids down to -rows are Gather's to take."""
    from export.errors import RunFailure

    model = load(embedding_model(tmp_path / "e.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(model.run({"ids": np.array([[9, -10]], np.int64)})["y"][0, :, 0], [36, 0])
    for bad, where in ((10, [0, 1]), (-11, [0, 1])):
        with pytest.raises(RunFailure) as failed:
            model.run({"ids": np.array([[3, bad], [0, 1]], np.int64)})
        message = str(failed.value)
        assert message.startswith(f"{tmp_path / 'e.onnx'}: input 'ids' holds {bad} at {where}, outside the 10 rows "
                                  "of the table it indexes (0..9) (ONNX Runtime: "), message
        assert "\n" not in message


def test_a_token_past_the_vocabulary_gets_no_shape_hint(tmp_path):
    """The value is named already: the hint to suspect a shape would point elsewhere."""
    from export.dims import hint_on_failure
    from export.errors import IndexOutsideTable

    model = load(embedding_model(tmp_path / "e.onnx"), providers=["CPUExecutionProvider"])
    with pytest.raises(IndexOutsideTable) as failed, hint_on_failure(model.inputs):
        model.run({"ids": np.array([[3, 10]], np.int64)})
    assert "a shape the model cannot take" not in str(failed.value)


def test_bfloat16_in_and_out_runs_on_the_cpu(tmp_path):
    """ONNX Runtime's run() takes no numpy bfloat16 (ml_dtypes'); such a run binds the bits, numpy
    or torch in, and gives bfloat16 back."""
    import ml_dtypes
    import onnx
    import torch
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT), helper.make_node("Relu", ["xf"], ["r"]),
             helper.make_node("Cast", ["r"], ["y"], to=TensorProto.BFLOAT16)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["b", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["b", 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "bf16.onnx"))
    model = load(tmp_path / "bf16.onnx", providers=["CPUExecutionProvider"])
    x = (np.arange(8, dtype=np.float32).reshape(2, 4) - 4.5).astype(ml_dtypes.bfloat16)
    y = model.run({"x": x})["y"]
    assert y.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(y.astype(np.float32), np.maximum(x.astype(np.float32), 0))
    out = model.run({"x": torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)})["y"]
    assert out.dtype == torch.bfloat16 and torch.equal(out.float(), torch.from_numpy(y.astype(np.float32)))


@pytest.mark.parametrize("op, inputs, outputs, flops", [
    # Gemm: K from A's size over the output's M, whether A is [M, K] or transposed [K, M]
    ("Gemm", [[128, 64], [64, 32]], [[128, 32]], 2 * 128 * 32 * 64),
    ("Gemm", [[64, 128], [64, 32]], [[128, 32]], 2 * 128 * 32 * 64),
    ("MatMul", [[2, 10, 64], [64, 32]], [[2, 10, 32]], 2 * 2 * 10 * 32 * 64),
    # a 7x7 convolution of 3 channels to 64 at 112x112; grouped: 64 channels in groups of 8
    ("Conv", [[1, 3, 112, 112], [64, 3, 7, 7]], [[1, 64, 112, 112]], 2 * 64 * 112 * 112 * 3 * 49),
    ("Conv", [[1, 64, 56, 56], [64, 8, 3, 3]], [[1, 64, 56, 56]], 2 * 64 * 56 * 56 * 8 * 9),
    # ONNX Runtime's fusions with the activation after (its CPU provider's FusedConv, FusedGemm, and
    # FusedMatMul, whose transA holds A as [..., K, M]) count as the product they hold
    ("FusedConv", [[1, 3, 112, 112], [64, 3, 7, 7], [64]], [[1, 64, 112, 112]], 2 * 64 * 112 * 112 * 3 * 49),
    ("FusedGemm", [[64, 128], [64, 32]], [[128, 32]], 2 * 128 * 32 * 64),
    ("FusedMatMul", [[2, 64, 10], [64, 32]], [[2, 10, 32]], 2 * 2 * 10 * 32 * 64),
    ("FusedMatMul", [[2, 10, 64], [64, 32]], [[2, 10, 32]], 2 * 2 * 10 * 32 * 64),
    # onnxruntime-genai's GroupQueryAttention: 32 query heads of 128, 128 tokens, the present cache 128 long
    ("GroupQueryAttention", [[1, 128, 4096], [1, 128, 1024], [1, 128, 1024], [1, 8, 0, 128], [1, 8, 0, 128]],
     [[1, 128, 4096], [1, 8, 128, 128], [1, 8, 128, 128]], 2 * 2 * 32 * 128 * 128 * 128),
    ("MultiHeadAttention", [[2, 10, 256], [2, 12, 256], [2, 12, 256]], [[2, 10, 256]], 4 * 2 * 10 * 256 * 12),
    # com.microsoft's Attention projects to Q, K, V first
    ("Attention", [[2, 10, 256], [256, 768], [768]], [[2, 10, 256]], 2 * 2 * 10 * 256 * 768 + 4 * 2 * 10 * 256 * 10),
    # ONNX's Attention, per head: 4 heads of 64, 10 queries over 12 keys
    ("Attention", [[2, 4, 10, 64], [2, 4, 12, 64], [2, 4, 12, 64]], [[2, 4, 10, 64]], 4 * 2 * 4 * 10 * 12 * 64),
])
def test_flops_of_products_convolutions_and_attention(op, inputs, outputs, flops):
    """Each counts its multiply-adds, not one per output element as element-wise nodes do."""
    from export.op_classes import classify, node_flops

    assert classify(op, "n", set()) == "matmul" and node_flops(op, inputs, outputs) == flops
