"""The serving and profiling code against TensorRT's Python API of 10.9, 10.13 and 11.x, without
TensorRT: the members it calls are held to the ones every one of those bindings defines, and the
helpers around the calls (profile ranges, engine/version mismatches, stale plans, layer classes,
the precision and reference-backend rules) are run with plain values."""
import ast
from pathlib import Path

import pytest

from bench import graphs
from export.errors import UsageError
from trt_enum_values import BuilderFlag10, BuilderFlag11
from export.runtime import deserialize_failure, profile_violation
from export.tensorrt_engine import engine_mismatches
from export.validate import reference_backend

ROOT = Path(__file__).resolve().parent.parent

# Members defined in the pybind11 sources (python/src/infer/pyCore.cpp) of TensorRT 10.9.0, 10.13.3,
# 11.0 and 11.1 alike, for the objects the runtime and the layer profiler hold; the 11.4 bindings
# (tensorrt_cu13_bindings 11.4.0.106) name all of those used below as well.
IN_EVERY_VERSION = {
    "engine": {"create_engine_inspector", "create_execution_context", "get_tensor_dtype", "get_tensor_format",
               "get_tensor_location", "get_tensor_mode", "get_tensor_name", "get_tensor_profile_shape",
               "get_tensor_shape", "is_shape_inference_io", "name", "num_io_tensors", "num_layers",
               "num_optimization_profiles", "device_memory_size_v2", "serialize"},
    "context": {"execute_async_v3", "set_input_shape", "get_tensor_shape", "set_tensor_address",
                "get_tensor_address", "infer_shapes", "all_binding_shapes_specified", "profiler",
                "enqueue_emits_profile", "report_to_profiler", "set_optimization_profile_async",
                "active_optimization_profile", "debug_sync"},
    "runtime": {"deserialize_cuda_engine", "get_plugin_registry", "engine_host_code_allowed", "max_threads"},
}
# Defined in 10.9 and 10.13, gone from 11.0 on.
REMOVED_IN_11 = {"all_shape_inputs_specified", "create_execution_context_without_device_memory",
                 "device_memory_size", "get_device_memory_size_for_profile", "has_implicit_batch_dimension",
                 "minimum_weight_streaming_budget", "weight_streaming_budget"}


def _tensorrt_members(path: Path) -> dict[str, set[str]]:
    """Attributes read on self.engine / self.context / self.runtime / model.context in a file."""
    used: dict[str, set[str]] = {"engine": set(), "context": set(), "runtime": set()}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            holder = node.value
            if isinstance(holder.value, ast.Name) and holder.value.id in ("self", "model") and holder.attr in used:
                used[holder.attr].add(node.attr)
    return used


@pytest.mark.parametrize("path", ["export/runtime.py", "bench/graphs.py"])
def test_tensorrt_members_used_exist_in_10_9_10_13_and_11(path):
    used = _tensorrt_members(ROOT / path)
    assert any(used.values()), "the scan found no TensorRT call: it no longer sees what it checks"
    for holder, names in used.items():
        assert not names & REMOVED_IN_11, f"{path}: {sorted(names & REMOVED_IN_11)} are gone in TensorRT 11"
        assert names <= IN_EVERY_VERSION[holder], f"{path}: {holder}.{sorted(names - IN_EVERY_VERSION[holder])}"


def test_the_scan_sees_the_calls_it_vouches_for():
    used = _tensorrt_members(ROOT / "export/runtime.py")
    assert {"num_io_tensors", "get_tensor_profile_shape", "create_execution_context"} <= used["engine"]
    assert {"set_input_shape", "set_tensor_address", "execute_async_v3"} <= used["context"]
    assert "deserialize_cuda_engine" in used["runtime"]
    assert "profiler" in _tensorrt_members(ROOT / "bench/graphs.py")["context"]


def test_profile_violation_names_the_axis_and_range():
    assert profile_violation((2, 64, 512), (1, 1, 512), (8, 2048, 512)) is None
    assert profile_violation((1, 1, 512), (1, 1, 512), (8, 2048, 512)) is None
    assert profile_violation((9, 64, 512), (1, 1, 512), (8, 2048, 512)) == "axis 0 is 9, the profile allows 1..8"
    assert profile_violation((2, 4096, 512), (1, 1, 512), (8, 2048, 512)) == \
        "axis 1 is 4096, the profile allows 1..2048"
    assert "rank 2" in profile_violation((2, 64), (1, 1, 512), (8, 2048, 512))


SIDECAR = {"tensorrt_version": "10.13.3.9", "compute_capability": "9.0", "onnx_sha256": "abc",
           "batch_range": "1:1:8", "seq_range": "1:512:2048", "precision": "strongly-typed"}


def test_engine_mismatches_name_the_tensorrt_version_and_gpu():
    assert engine_mismatches(SIDECAR, "10.13.3.9", "9.0") == []
    assert engine_mismatches(SIDECAR, "11.4.0.106", "9.0") == [
        "built with TensorRT 10.13.3.9, this is TensorRT 11.4.0.106"]
    assert engine_mismatches(SIDECAR, "10.9.0.34", "8.9")[1] == "built for compute capability 9.0, this GPU is 8.9"
    assert engine_mismatches(None, "11.4.0.106", "9.0") == []
    assert engine_mismatches(SIDECAR, "11.4.0.106", None) == [
        "built with TensorRT 10.13.3.9, this is TensorRT 11.4.0.106"]
    # plugin PTX from nvcc 13.0: a driver for CUDA 12.8 cannot compile it at load
    with_kernels = {**SIDECAR, "kernels_nvcc_release": "13.0"}
    assert engine_mismatches(with_kernels, "10.13.3.9", "9.0", (13, 0)) == []
    assert engine_mismatches(with_kernels, "10.13.3.9", "9.0", None) == []
    assert engine_mismatches(with_kernels, "10.13.3.9", "9.0", (12, 8)) == [
        "its plugins' kernels are PTX written by nvcc of CUDA 13.0, and this GPU's driver supports CUDA 12.8 at most, "
        "so it cannot load it: put an nvcc of CUDA 12.8 or older first on PATH, or update the driver"]


def test_deserialize_failure_is_one_line_with_the_reason():
    text = deserialize_failure(Path("fused.plan"), SIDECAR, "11.4.0.106", "9.0")
    assert "built with TensorRT 10.13.3.9, this is TensorRT 11.4.0.106" in text and "\n" not in text
    assert "no .json sidecar" in deserialize_failure(Path("fused.plan"), None, "11.4.0.106", "9.0")
    assert "TensorRT log" in deserialize_failure(Path("fused.plan"), SIDECAR, "10.13.3.9", "9.0")


def test_a_plan_from_another_tensorrt_or_gpu_is_rebuilt_not_reused():
    here = dict(SIDECAR)
    assert graphs.stale_engine_reasons(SIDECAR, here) == []
    assert graphs.stale_engine_reasons(None, here) == ["no engine yet"]
    assert graphs.stale_engine_reasons(SIDECAR, {**here, "tensorrt_version": "11.4.0.106"}) == [
        "built with TensorRT 10.13.3.9, this is TensorRT 11.4.0.106"]
    assert graphs.stale_engine_reasons(SIDECAR, {**here, "compute_capability": "10.0"}) == [
        "built for compute capability 9.0, this GPU is 10.0"]
    assert graphs.stale_engine_reasons(SIDECAR, {**here, "onnx_sha256": "def"}) == ["the source graph changed"]
    assert graphs.stale_engine_reasons(SIDECAR, {**here, "seq_range": "1:128:2048"}) == [
        "seq_range 1:512:2048 -> 1:128:2048"]


def test_layer_times_become_per_run_classes_and_shares():
    ms = {"/layers.0/attn/MatMul": 6.0, "normfuse_AddRMSNorm_0": 2.0, "/layers.0/Add": 1.0, "/Mul + /Add_1": 1.0}
    classes = graphs.layer_classes(ms, runs=2, norm_nodes=set())
    assert classes["matmul"]["time_ms"] == pytest.approx(3.0)
    assert classes["norm"]["time_ms"] == pytest.approx(1.0)
    assert classes["elementwise"] == {"time_ms": pytest.approx(1.0), "kernels": 2, "time_share": pytest.approx(0.2)}
    assert sum(c["time_share"] for c in classes.values()) == pytest.approx(1.0)


def test_layer_profiler_follows_the_tensorrt_interface():
    """IProfiler subclasses must call IProfiler.__init__ (pybind11 trampoline) and override
    report_layer_time(layer_name, ms); the profiled runs go through the model's checked execute()."""
    tree = ast.parse((ROOT / "bench/graphs.py").read_text())
    func = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "trt_layer_times")
    cls = next(n for n in ast.walk(func) if isinstance(n, ast.ClassDef))
    assert ast.unparse(cls.bases[0]) == "trt.IProfiler"
    methods = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
    assert "trt.IProfiler.__init__(self)" in ast.unparse(methods["__init__"])
    assert [a.arg for a in methods["report_layer_time"].args.args] == ["self", "layer_name", "ms"]
    calls = [ast.unparse(c.func) for c in ast.walk(func) if isinstance(c, ast.Call)]
    assert "model.execute" in calls and not any(c.endswith("execute_async_v3") for c in calls)


def _pipeline(precision: str):
    from export.build import Pipeline, parse_args

    return Pipeline(parse_args(["--norm", "rmsnorm", "--precision", precision]), console=None)


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_weak_precision_is_a_flag_error_on_tensorrt_11(precision):
    with pytest.raises(UsageError, match="strongly typed"):
        _pipeline(precision).check_precision(BuilderFlag11, "11.4.0.106")
    _pipeline(precision).check_precision(BuilderFlag10, "10.13.3.9")
    _pipeline("strongly-typed").check_precision(BuilderFlag11, "11.4.0.106")


def test_weak_precision_is_refused_before_the_export(monkeypatch):
    import export.build as build

    def not_reached(*args, **kwargs):
        raise AssertionError("exported before the precision was checked")

    monkeypatch.setattr(build, "resolve_backends", lambda requested: (["tensorrt"], []))
    monkeypatch.setattr(build, "export_model", not_reached)
    pipeline = _pipeline("fp16")
    real = build.Pipeline.check_precision
    monkeypatch.setattr(pipeline, "check_precision", lambda: real(pipeline, BuilderFlag11, "11.4.0.106"))
    with pytest.raises(UsageError, match="strongly typed"):
        pipeline.run()


@pytest.mark.parametrize("requested,candidate,dtype,expected", [
    ("ort-cpu", "tensorrt", "bfloat16", "onnx-reference"),  # ONNX Runtime's CPU provider has no bf16 MatMul
    ("tensorrt", "tensorrt", "bfloat16", "onnx-reference"),
    ("ort-cpu", "tensorrt", "float16", "ort-cpu"),
    ("tensorrt", "tensorrt", "float32", "ort-cpu"),
    ("ort-cuda", "tensorrt", "bfloat16", "ort-cuda"),
    ("ort-cpu", "ort-cpu", "bfloat16", "ort-cpu"),
])
def test_reference_backend_for_an_engine(requested, candidate, dtype, expected):
    assert reference_backend(requested, candidate, dtype) == expected
