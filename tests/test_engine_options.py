"""TensorRT engine building, the parts that need no TensorRT: profiles, sidecar, plugin inventory,
and the one-line error (with how to install it) when TensorRT is missing."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from export.errors import NormfuseError, UsageError
from trt_enum_values import BuilderFlag10, BuilderFlag11, CreationFlag10, CreationFlag11
from export.tensorrt_engine import (EngineOptions, Range, TensorRTMissing, build_engine, check_sidecar, make_sidecar,
                                    network_flags, plugin_ops, precision_builder_flag, profile_shapes, sha256,
                                    sidecar_path, tensorrt_status)

ROOT = Path(__file__).resolve().parent.parent
needs_no_tensorrt = pytest.mark.skipif(tensorrt_status()[0], reason="TensorRT is importable here")


@pytest.fixture(scope="module")
def graphs(rewritten):
    return rewritten("layernorm")


@pytest.mark.parametrize("text,expected", [("8", Range(8, 8, 8)), ("1:128:512", Range(1, 128, 512)),
                                           ("2:2:2", Range(2, 2, 2))])
def test_range_parsing(text, expected):
    assert Range.parse(text) == expected
    assert str(expected) == f"{expected.min}:{expected.opt}:{expected.max}"


@pytest.mark.parametrize("text", ["0:1:2", "4:2:8", "1:2", "a:b:c", "1:2:3:4", ""])
def test_bad_ranges_are_usage_errors(text):
    with pytest.raises(UsageError, match="--seq"):
        Range.parse(text, "--seq")


def test_covering_widens_only_as_needed():
    assert Range(4, 8, 16).covering(1, 32) == Range(1, 8, 32)
    assert Range(1, 8, 16).covering(8) == Range(1, 8, 16)


def test_profile_binds_batch_and_sequence_and_keeps_hidden(graphs):
    shapes = profile_shapes(graphs["trt"], Range(1, 2, 8), Range(1, 128, 2048))
    assert shapes == {"hidden_states": {"min": [1, 1, 64], "opt": [2, 128, 64], "max": [8, 2048, 64]}}


def test_plugin_inventory(graphs):
    ops = plugin_ops(graphs["trt"])
    assert {op["name"] for op in ops} == {"LayerNorm", "AddLayerNorm"}
    assert all(op["namespace"] == "normfuse" and op["version"] == "1" for op in ops)
    assert sum(op["nodes"] for op in ops) == 5
    assert plugin_ops(graphs["reference"]) == []


def test_plugin_inventory_counts_ops_inside_control_flow(tmp_path):
    """A merged decoder's norms are fused inside its If's branches: the parser needs their plugins
    registered, and ONNX Runtime must refuse the graph, as for the main graph's."""
    import onnx

    from export.backends import refuse_plugin_ops
    from export.rewrite import rewrite_model
    from export.rewrite.synth import NormSpec, if_model

    model, _ = rewrite_model(if_model(NormSpec(), NormSpec()), target="tensorrt")
    assert not any(node.domain == "normfuse" for node in model.graph.node)  # both fused ops are in the branches
    path = tmp_path / "if.onnx"
    onnx.save(model, str(path))
    assert [(op["name"], op["nodes"]) for op in plugin_ops(path)] == [("RMSNorm", 2)]
    with pytest.raises(NormfuseError, match="holds normfuse plugin ops"):
        refuse_plugin_ops(path, "ONNX Runtime")


def test_sidecar_records_what_an_engine_depends_on(graphs, tmp_path):
    plan = tmp_path / "fused.plan"
    options = EngineOptions(batch=Range(1, 1, 4), seq=Range(1, 64, 256), precision="fp16", workspace_mb=512)
    profiles = profile_shapes(graphs["trt"], options.batch, options.seq)
    sidecar = make_sidecar(graphs["trt"], plan, options, tensorrt_version="10.13.0.35",
                           gpu={"name": "NVIDIA H100", "compute_capability": "9.0", "driver": "580"},
                           profiles=profiles, build_seconds=12.3456, plan_bytes=1000)
    json.dumps(sidecar)  # plain JSON
    assert sidecar["tensorrt_version"] == "10.13.0.35" and sidecar["compute_capability"] == "9.0"
    assert sidecar["onnx_sha256"] == sha256(graphs["trt"]) and len(sidecar["onnx_sha256"]) == 64
    assert sidecar["profiles"] == [profiles] and sidecar["batch_range"] == "1:1:4"
    assert {p["name"] for p in sidecar["plugins"]} == {"LayerNorm", "AddLayerNorm"}
    assert sidecar["io"]["inputs"][0] == {"name": "hidden_states", "dtype": "float32", "shape": [None, None, 64],
                                          "dim_params": ["batch", "seq", None], "rank_known": True}
    assert sidecar["precision"] == "fp16" and sidecar["workspace_mb"] == 512
    assert sidecar_path(plan) == tmp_path / "fused.plan.json"
    assert sidecar["kernel_switches"] == []
    from plugins.build import kernels_fingerprint, nvcc_release

    assert sidecar["kernels_fingerprint"] == kernels_fingerprint()
    assert sidecar["kernels_nvcc_release"] == (".".join(map(str, nvcc_release())) if nvcc_release() else None)
    reference = make_sidecar(graphs["reference"], plan, options, tensorrt_version="10.13.0.35", gpu={},
                             profiles=profiles, build_seconds=0, plan_bytes=1)
    assert "kernels_fingerprint" not in reference  # no plugins, no kernels of ours


def test_timing_cache_of_other_kernels_is_left_out_of_plugin_builds(tmp_path, monkeypatch):
    """TensorRT keys a plugin's timings by its name and shapes: after a kernel, launch-table or
    switch change it would reuse a tactic number timed for other kernels, so a plugin build starts
    afresh unless the cache says it timed today's kernels."""
    from export.tensorrt_engine import kernels_stamp, save_timing_cache, timing_cache_in

    monkeypatch.delenv("NORMFUSE_AB_DEFINES", raising=False)
    cache = tmp_path / "timing.cache"
    assert timing_cache_in(cache, True) == (b"", None) and timing_cache_in(None, True) == (b"", None)
    save_timing_cache(cache, b"reference timings", uses_plugins=False)
    assert not kernels_stamp(cache).exists()
    assert timing_cache_in(cache, False) == (b"reference timings", None)
    data, why = timing_cache_in(cache, True)  # which kernels it timed is not known
    assert data == b"" and why == f"{cache} was left out: it does not say which normfuse kernels it timed, which " \
                                  "TensorRT would not time again"
    save_timing_cache(cache, b"plugin timings", uses_plugins=True)
    assert timing_cache_in(cache, True) == (b"plugin timings", None)
    save_timing_cache(cache, b"both", uses_plugins=False)  # a reference build keeps the plugin timings it was given
    assert timing_cache_in(cache, True) == (b"both", None)
    monkeypatch.setenv("NORMFUSE_AB_DEFINES", "NORMFUSE_AB_NO_TRAILING_SYNC")  # other kernels
    data, why = timing_cache_in(cache, True)
    assert data == b"" and "timed other normfuse kernels" in why
    assert timing_cache_in(cache, False) == (b"both", None)


def test_sidecar_records_kernel_switches_in_force(graphs, tmp_path, monkeypatch):
    monkeypatch.setenv("NORMFUSE_AB_DEFINES", "NORMFUSE_AB_NO_TRAILING_SYNC")
    options = EngineOptions(batch=Range(1, 1, 4), seq=Range(1, 64, 256))
    sidecar = make_sidecar(graphs["trt"], tmp_path / "e.plan", options, tensorrt_version="10.13.0.35", gpu={},
                           profiles={}, build_seconds=0, plan_bytes=1)
    assert sidecar["kernel_switches"] == ["NORMFUSE_AB_NO_TRAILING_SYNC"]


def test_sidecar_check_notices_a_changed_onnx(graphs, tmp_path):
    plan = tmp_path / "e.plan"
    plan.write_bytes(b"x")
    assert "no sidecar" in check_sidecar(plan)[0]
    copy = tmp_path / "g.onnx"
    copy.write_bytes(graphs["trt"].read_bytes())
    options = EngineOptions()
    sidecar = make_sidecar(copy, plan, options, tensorrt_version="0", gpu={}, profiles={}, build_seconds=0, plan_bytes=1)
    sidecar_path(plan).write_text(json.dumps(sidecar))
    assert check_sidecar(plan, copy) == []
    copy.write_bytes(graphs["reference"].read_bytes())
    assert any("changed" in p for p in check_sidecar(plan, copy))


def test_type_stubs_alone_do_not_count_as_tensorrt():
    present, reason = tensorrt_status()
    try:
        import tensorrt
    except ImportError:
        assert not present
        return
    assert present == hasattr(tensorrt, "Builder"), reason


@needs_no_tensorrt
def test_building_without_tensorrt_is_one_error_with_the_install_hint(graphs, tmp_path):
    with pytest.raises(TensorRTMissing, match="pip install tensorrt") as info:
        build_engine(graphs["trt"], tmp_path / "x.plan")
    assert isinstance(info.value, NormfuseError) and "\n" not in str(info.value)
    assert not (tmp_path / "x.plan").exists()


@needs_no_tensorrt
def test_engine_command_without_tensorrt(graphs, tmp_path):
    done = subprocess.run([sys.executable, "-m", "export.tensorrt_engine", str(graphs["trt"]), "-o",
                           str(tmp_path / "x.plan")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "pip install tensorrt" in done.stderr
    done = subprocess.run([sys.executable, "-m", "export.tensorrt_engine", str(graphs["trt"]), "-o",
                           str(tmp_path / "x.plan"), "--seq", "9:1:3"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and "--seq" in done.stderr


@needs_no_tensorrt
def test_build_with_backend_tensorrt_fails_fast_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "export.build", "--norm", "rmsnorm", "--preset", "tiny", "--backend",
                           "tensorrt", "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "--backend tensorrt" in done.stderr and "pip install tensorrt" in done.stderr
    assert not (tmp_path / "out").exists()


def test_auto_lists_tensorrt_under_skipped_when_absent():
    from export.backends import resolve_backends

    backends, skipped = resolve_backends("auto")
    if "tensorrt" in backends:
        pytest.skip("TensorRT is present here")
    (entry,) = [s for s in skipped if "tensorrt" in s["stage"]]
    assert "install" in entry["reason"]


def test_build_rejects_a_malformed_range_flag(tmp_path):
    done = subprocess.run([sys.executable, "-m", "export.build", "--norm", "rmsnorm", "--preset", "tiny",
                           "--seq-range", "1:4:x", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 2 and "--seq-range" in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags,batch,seq", [
    ([], Range(1, 1, 2), Range(1, 128, 128)),
    (["--batch", "4", "--seq", "8"], Range(1, 4, 4), Range(1, 8, 16)),
    (["--batch-range", "1:2:8", "--seq-range", "1:64:512"], Range(1, 2, 8), Range(1, 64, 512)),
])
def test_build_profile_covers_validation_and_bench_shapes(flags, batch, seq):
    from export.build import Pipeline, parse_args

    pipeline = Pipeline(parse_args(["--norm", "rmsnorm", *flags]), console=None)
    assert pipeline.profile() == (batch, seq)


def test_build_profile_that_misses_a_shape_is_a_usage_error():
    from export.build import Pipeline, parse_args

    pipeline = Pipeline(parse_args(["--norm", "rmsnorm", "--seq", "256", "--seq-range", "1:64:128"]), console=None)
    with pytest.raises(UsageError, match="outside the engine profile"):
        pipeline.profile()


@pytest.mark.parametrize("flags,aot,strong", [(CreationFlag10, 1 << 3, 1 << 1), (CreationFlag11, 1 << 2, 1 << 0)])
def test_network_flags_follow_the_enum_values_not_fixed_bits(flags, aot, strong):
    assert network_flags(flags, "strongly-typed", uses_plugins=True) == aot | strong
    assert network_flags(flags, "strongly-typed", uses_plugins=False) == strong
    assert network_flags(flags, "fp16", uses_plugins=True) == aot


def test_weak_precisions_set_their_builder_flag_where_tensorrt_has_one():
    assert precision_builder_flag(BuilderFlag10, "fp16") is BuilderFlag10.FP16
    assert precision_builder_flag(BuilderFlag10, "bf16") is BuilderFlag10.BF16
    assert precision_builder_flag(BuilderFlag10, "fp32") is None
    assert precision_builder_flag(BuilderFlag11, "strongly-typed") is None


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_weak_precisions_are_a_usage_error_on_tensorrt_11(precision):
    with pytest.raises(UsageError, match="strongly typed") as info:
        precision_builder_flag(BuilderFlag11, precision, "11.4.0.106")
    assert "--precision strongly-typed" in str(info.value) and "11.4.0.106" in str(info.value)


def test_the_flag_names_used_are_in_the_tensorrt_stubs():
    """The engine code names these members through its helpers; the stubs (10.13) must have them."""
    import sysconfig

    pyi = Path(sysconfig.get_paths()["purelib"]) / "tensorrt_bindings" / "tensorrt.pyi"
    if not pyi.exists():
        pytest.skip("tensorrt-stubs is not installed")
    text = pyi.read_text()
    for cls, members in (("NetworkDefinitionCreationFlag", ("STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS")),
                         ("BuilderFlag", ("FP16", "BF16"))):
        body = text.split(f"class {cls}:", 1)[1].split("\nclass ", 1)[0]
        for member in members:
            assert f"    {member}: " in body or f"    {member} = " in body, (cls, member)
