"""onnx's own conformance cases for LayerNormalization and RMSNormalization, through the rewriter.

onnx ships the generators of its backend node tests (`onnx.backend.test.case.node`): each case is a
model with inputs and the outputs onnx's reference implementation expects, for every axis,
epsilon and rank, plus the "expanded" form (the op's function body: for LayerNormalization Flatten,
E[x^2] - E[x]^2, Reshape; for RMSNormalization reduction axes computed from the rank). Rewritten for
each target, every case must still produce onnx's expected outputs, and only the norms over the last
axis may be fused. LayerNormalization's cases also expose Mean and
InvStdDev, which the fused ops do not compute, so they are run a second time with Y alone.
"""
from __future__ import annotations

import copy
import re
import warnings

import numpy as np
import pytest

from export.rewrite import rewrite_model
from export.rewrite.evaluate import run_model
from normops import GRAPH


def _cases():
    with warnings.catch_warnings():  # the generators of other ops' cases warn about overflows
        warnings.simplefilter("ignore")
        from onnx.backend.test.case import node

        return [c for c in node.collect_testcases() if re.match(r"test_(layer|rms)_normalization_", c.name)]


CASES = _cases()
# a native op whose `axis` is the last axis: -1, the default, or rank - 1 (2d axis1, 3d axis2, 4d axis3)
LAST_AXIS = re.compile(r"_(default_axis|axis_negative_1|2d_axis1|3d_axis2|4d_axis3)")


def y_only(model):
    """The model with its first output alone (LayerNormalization's Y without Mean and InvStdDev)."""
    out = copy.deepcopy(model)
    del out.graph.output[1:]
    return out


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
@pytest.mark.parametrize("only_y", [False, True], ids=["all outputs", "Y only"])
def test_every_case_keeps_onnxs_expected_outputs_and_only_last_axis_norms_fuse(target, only_y):
    assert len(CASES) >= 90, "onnx's LayerNormalization/RMSNormalization cases were not found"
    fused = []
    for case in CASES:
        model = y_only(case.model) if only_y else case.model
        out, report = rewrite_model(model, target=target)
        for inputs, expected in case.data_sets:
            got = run_model(out, {i.name: v for i, v in zip(model.graph.input, inputs)})
            for g, e in zip(got, expected[:len(model.graph.output)]):
                dtype = "float16" if e.dtype == np.float16 else "float32"
                assert g.shape == e.shape and GRAPH[dtype].passes(np.asarray(g, np.float64), np.asarray(e, np.float64)), \
                    (case.name, target, [f.pattern for f in report.fusions])
        if report.fused:
            fused.append(case.name)
    native_last_axis = {c.name for c in CASES if LAST_AXIS.search(c.name) and "expanded" not in c.name}
    # RMSNormalization's function body takes its axes as Range(rank + axis, rank, 1), which the checks
    # work out from the inferred rank: its last-axis cases fuse. LayerNormalization's flattens X to 2-D
    # at `axis` and normalises the rows of that view: a norm over the view's last axis whatever `axis`
    # is, fused there with the Flatten and the Reshape back left around it (Y alone: with Mean and
    # InvStdDev exposed, the statistics are used outside).
    expanded_rms = {c.name for c in CASES if LAST_AXIS.search(c.name) and "expanded" in c.name and c.name.startswith("test_rms")}
    expanded_layer = {c.name for c in CASES if "expanded" in c.name and c.name.startswith("test_layer")}
    assert len(expanded_rms) == 7 and len(expanded_layer) == 38
    native_rms = {n for n in native_last_axis if n.startswith("test_rms")}
    if only_y and target == "tensorrt":
        assert set(fused) == native_last_axis | expanded_rms | expanded_layer  # LayerNorm and RMSNorm
    elif only_y:  # for ONNX Runtime a lone native LayerNormalization is already the op the target writes
        assert set(fused) == native_rms | expanded_rms | expanded_layer
    else:  # all outputs: LayerNormalization's Mean/InvStdDev are used, so it stays
        assert set(fused) == native_rms | expanded_rms
