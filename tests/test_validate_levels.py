"""The reference runs as written and the candidate as deployed (ONNX Runtime's optimisations on), so
a failing pair is judged again against the reference optimised as the candidate is: what remains is
the rewrite's doing. A random-weight convolution stack whose outputs reach 1e5 differs from itself
across ONNX Runtime's levels by more than float32's graph tolerance on its smallest outputs (its
convolutions run in another layout, summed in another order)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.rewrite import rewrite_file
from export.rewrite.synth import NormSpec, build, plain_rms_constants, plain_rms_nodes
from export.runtime import ORT_NORM_FUSIONS
from export.validate import Side, compare, main

CHANNELS, LAYERS, SIDE = 32, 5, 32


def conv_stack(path):
    """Convolutions with unit-normal weights and no normalisation between them (their outputs grow
    about 10x a layer), then an RMSNorm over the last axis (the width): outputs `c` and `y`."""
    rng = np.random.default_rng(0)
    nodes, inits, current = [], [], "x"
    for i in range(LAYERS):
        weight = rng.standard_normal((CHANNELS, CHANNELS if i else 3, 3, 3)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        nodes.append(helper.make_node("Conv", [current, f"w{i}"], [f"conv{i}"], pads=[1, 1, 1, 1]))
        current = f"conv{i}"
        if i < LAYERS - 1:
            nodes.append(helper.make_node("Relu", [current], [f"relu{i}"]))
            current = f"relu{i}"
    nodes += [helper.make_node("Identity", [current], ["c"])] + plain_rms_nodes("c", "y")
    graph = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, SIDE, SIDE])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("c", "y")],
                              inits + plain_rms_constants(SIDE))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


@pytest.fixture
def convs(tmp_path):
    reference = conv_stack(tmp_path / "convs.onnx")
    fused = tmp_path / "fused.onnx"
    assert rewrite_file(reference, fused, target="onnxruntime").fused == 1
    return reference, fused


def test_a_pair_that_differs_by_onnx_runtimes_optimisations_alone_passes_and_says_so(convs):
    reference, fused = convs
    (pair,) = compare(Side(reference, "ort-cpu", "reference"), Side(fused, "ort-cpu", "fused"), [(1, 1)], "float32")
    assert pair["passed"] and pair["reference_optimization"] == "all"
    # as written, the convolutions' output differs beyond the tolerance: the condition this covers
    assert not pair["as_written"]["c"]["passed"] and pair["as_written"]["c"]["max_abs"] > 1e-3
    assert pair["outputs"]["c"]["max_abs"] == 0.0  # the same convolutions, optimised alike
    assert "norm_check" not in pair


def test_a_wrong_fusion_fails_against_the_reference_optimised_too(convs, tmp_path):
    reference, fused = convs
    model = onnx.load(str(fused))
    norm = next(n for n in model.graph.node if n.op_type == "SimplifiedLayerNormalization")
    # as large as the squares of its 1e5-sized inputs (the graph adds 1e-5)
    next(a for a in norm.attribute if a.name == "epsilon").f = 1e14
    onnx.save(model, str(tmp_path / "wrong.onnx"))
    (pair,) = compare(Side(reference, "ort-cpu", "reference"), Side(tmp_path / "wrong.onnx", "ort-cpu", "wrong"),
                      [(1, 1)], "float32")
    assert not pair["passed"] and "as_written" not in pair
    assert not pair["outputs"]["y"]["passed"]


def test_the_validate_command_prints_which_reference_judged_the_pair(convs, capsys):
    reference, fused = convs
    assert main([str(reference), str(fused), "--backend", "ort-cpu", "--shapes", "1x1"]) == 0
    out = capsys.readouterr().out
    assert "judged against the reference run at ONNX Runtime's optimisation level 'all'" in out
    assert "with ONNX Runtime's own norm fusions off" in out
    assert "ONNX Runtime's other optimisations, not the rewrite" in out


ORT_NORM_OPS = {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
                "SkipSimplifiedLayerNormalization"}


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_onnx_runtimes_norm_fusions_are_all_turned_off_by_name(kind, tmp_path):
    """The second opinion keeps the reference's norms as written by naming ONNX Runtime's norm
    fusions; a name it changes would let them back in silently, so a spelling it does fuse at level
    all (a LayerNorm with its residual Add as a Skip op) must stay spelled out with them off."""
    import onnxruntime as ort

    source = tmp_path / "norm.onnx"
    onnx.save(build(NormSpec(kind=kind, inverse="div", residual="private")), str(source))

    def optimised_ops(disabled):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
        return {n.op_type for n in onnx.load(str(tmp_path / "optimised.onnx")).graph.node}

    fused_by_ort = optimised_ops(set())
    assert fused_by_ort & ORT_NORM_OPS  # the premise: ONNX Runtime fuses this spelling
    assert "ReduceMean" not in fused_by_ort
    as_written = optimised_ops(set(ORT_NORM_FUSIONS))
    assert "ReduceMean" in as_written
    assert not as_written & ORT_NORM_OPS


def test_a_session_level_with_or_without_norm_fusions_is_checked(convs):
    from export.errors import NormfuseError
    from export.runtime import OrtModel

    reference, _ = convs
    OrtModel(reference, optimization="basic-without-norm-fusions")  # loads
    for wrong in ("none-without-norm-fusions", "fast", "all-without-norms"):
        with pytest.raises(NormfuseError, match="unknown ONNX Runtime optimisation level"):
            OrtModel(reference, optimization=wrong)
