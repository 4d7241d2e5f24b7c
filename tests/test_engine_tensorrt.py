"""TensorRT engines on a GPU: build with our plugins, sidecar, runtime, CUDA graphs, ORT vs TensorRT.

Needs TensorRT (>= 10.9, for AOT plugins) and a GPU; skipped with the reason otherwise.
"""
import json

import numpy as np
import pytest

from export.rewrite import rewrite_file
from export.tensorrt_engine import EngineOptions, Range, tensorrt_status

pytestmark = [
    pytest.mark.tensorrt,
    pytest.mark.gpu,
    # tensorrt-stubs alone makes `import tensorrt` succeed as an empty namespace package.
    pytest.mark.skipif(not tensorrt_status()[0], reason=tensorrt_status()[1] or "TensorRT missing"),
]


@pytest.fixture(scope="module")
def engines(exported, tmp_path_factory):
    from export.tensorrt_engine import build_engine

    root = tmp_path_factory.mktemp("trt")
    built = {}
    for norm in ("rmsnorm", "layernorm"):
        reference = exported(norm, "float16")
        fused = root / f"{norm}-fused-tensorrt.onnx"
        rewrite_file(reference, fused, target="tensorrt")
        options = EngineOptions(batch=Range(1, 1, 4), seq=Range(1, 32, 128), timing_cache=root / "timing.cache")
        for graph, source in (("fused", fused), ("reference", reference)):
            plan = root / f"{norm}-{graph}.plan"
            built[norm, graph] = (plan, build_engine(source, plan, options), source)
    return built


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_engines_build_with_a_sidecar(engines, norm):
    plan, sidecar, _ = engines[norm, "fused"]
    assert plan.stat().st_size == sidecar["plan_bytes"] > 0
    assert json.loads(plan.with_name(plan.name + ".json").read_text()) == sidecar
    assert sidecar["gpu"] and sidecar["compute_capability"]
    assert {p["name"] for p in sidecar["plugins"]} <= {"RMSNorm", "LayerNorm", "AddRMSNorm", "AddLayerNorm"}
    assert sidecar["plugins"] and engines[norm, "reference"][1]["plugins"] == []
    assert (plan.parent / "timing.cache").stat().st_size > 0


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("graph", ["fused", "reference"])
def test_tensorrt_matches_onnx_runtime_reference(engines, norm, graph):
    from export.validate import Side, compare

    reference = engines[norm, "reference"][2]
    ref_backend = "ort-cuda" if _ort_cuda() else "ort-cpu"
    pairs = compare(Side(reference, ref_backend, "reference"), Side(engines[norm, graph][0], "tensorrt", graph),
                    [(1, 1), (1, 32), (4, 128)], "float16")
    assert all(p["passed"] for p in pairs), pairs


def test_runtime_reuses_buffers_and_replays_cuda_graphs(engines):
    import torch

    from export.runtime import load

    plan = engines["rmsnorm", "fused"][0]
    plain, graphed = load(plan), load(plan, cuda_graph=True)
    rng = np.random.default_rng(0)
    for shape in ((1, 1, 64), (1, 1, 64), (2, 17, 64), (1, 1, 64)):
        x = rng.standard_normal(shape).astype(np.float16)
        want = plain.run({"hidden_states": x})["output"]
        got = graphed.run({"hidden_states": x})["output"]
        np.testing.assert_array_equal(got, want)
    before = plain._buffers["hidden_states"].data_ptr()
    plain.run({"hidden_states": rng.standard_normal((1, 1, 64)).astype(np.float16)})
    assert plain._buffers["hidden_states"].data_ptr() == before
    out = plain.run({"hidden_states": torch.randn(1, 3, 64, dtype=torch.float16, device="cuda")})["output"]
    assert out.is_cuda and out.dtype == torch.float16


def test_shape_outside_the_profile_is_one_line(engines):
    from export.errors import NormfuseError
    from export.runtime import load

    model = load(engines["rmsnorm", "fused"][0])
    with pytest.raises(NormfuseError, match="outside the engine's optimisation profile"):
        model.run({"hidden_states": np.zeros((8, 4, 64), np.float16)})


def _ort_cuda() -> bool:
    from export.backends import availability

    return availability("ort-cuda").present
