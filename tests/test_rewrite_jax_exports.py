"""JAX models as jax2onnx writes them: every norm is fused, and the fused graph computes the same.

The exports are committed under tests/data/jax2onnx (JAX is not a dependency; make_fixtures.py
there rebuilds them and MANIFEST.json records the versions). jax2onnx's default writes the norms
decomposed in each library's own arithmetic: Flax's LayerNorm as E[x^2] - E[x]^2 clamped at zero,
jnp.var (Flax without fast variance, Equinox) behind a constant-row guard with the mean of the
squares in float64, Flax's RMSNorm with epsilon as CastLike(eps, x).
"""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from test_rewrite_exports import loose_scales

from export.rewrite import rewrite_file
from export.validate import Side, compare, model_dtype

DATA = Path(__file__).parent / "data" / "jax2onnx"

# file -> {target: fused norms by op}. The Flax block: a LayerNorm on the block's input, an RMSNorm
# and a LayerNorm each after a residual Add whose sum is used again. The Equinox block: a LayerNorm
# on the input, an RMSNorm after the first residual Add (the second Add ends the block). The
# onnxruntime target leaves a native LayerNormalization without an Add as it is (one op already).
FLAX = {"LayerNorm": 1, "AddRMSNorm": 1, "AddLayerNorm": 1}
EXPECTED = {
    "flax-block-float32.onnx": {"tensorrt": FLAX, "onnxruntime": FLAX},
    "flax-block-bfloat16.onnx": {"tensorrt": FLAX, "onnxruntime": FLAX},
    "flax-block-float32-native.onnx": {"tensorrt": FLAX, "onnxruntime": {"AddRMSNorm": 1, "AddLayerNorm": 1}},
    "equinox-block-float32.onnx": {"tensorrt": {"LayerNorm": 1, "AddRMSNorm": 1},
                                   "onnxruntime": {"LayerNorm": 1, "AddRMSNorm": 1}},
}


def test_the_fixtures_are_the_ones_the_manifest_records():
    manifest = json.loads((DATA / "MANIFEST.json").read_text())
    assert sorted(manifest["models"]) == sorted(p.name for p in DATA.glob("*.onnx")) == sorted(EXPECTED)
    assert {"jax", "flax", "equinox", "jax2onnx"} <= set(manifest["versions"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("target", ("tensorrt", "onnxruntime"))
def test_jax2onnx_exports_are_fused_and_match(name, target, tmp_path):
    source = DATA / name
    dtype = model_dtype(source)
    fused = tmp_path / f"{target}.onnx"
    report = rewrite_file(source, fused, target=target)
    assert report.counts == EXPECTED[name][target], [r.reason for r in report.rejected]
    assert not report.rejected
    assert not loose_scales(onnx.load(str(fused)))
    # the tensorrt target on onnx's reference evaluator (plugin ops through normops); the onnxruntime
    # target on ONNX Runtime's CPU provider, which has no bfloat16 Gemm
    backend = "ort-cpu" if target == "onnxruntime" and dtype != "bfloat16" else "onnx-reference"
    for pair in compare(Side(source, backend, "reference"), Side(fused, backend, "fused"), [(1, 8), (3, 8)], dtype):
        assert pair["passed"], pair


def test_decomposed_and_native_flax_exports_fuse_to_the_same_ops(tmp_path):
    """jax2onnx's two normalisation modes of one Flax block give one fused graph: the same op types in the same order."""
    graphs = []
    for name in ("flax-block-float32.onnx", "flax-block-float32-native.onnx"):
        rewrite_file(DATA / name, tmp_path / name, target="tensorrt")
        graphs.append([n.op_type for n in onnx.load(str(tmp_path / name)).graph.node
                       if n.op_type in ("LayerNorm", "RMSNorm", "AddLayerNorm", "AddRMSNorm")])
    assert graphs[0] == graphs[1] == ["LayerNorm", "AddRMSNorm", "AddLayerNorm"]
