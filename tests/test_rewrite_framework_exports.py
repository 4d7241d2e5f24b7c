"""JAX, Keras and Paddle models as jax2onnx, jax2tf, tf2onnx and paddle2onnx write them: every norm is
fused, nothing else is, and the fused graph computes the same.

The exports are committed under tests/data/<exporter> (JAX, TensorFlow and PaddlePaddle are not
dependencies; the make_fixtures.py beside them rebuilds them and MANIFEST.json records the
versions). Each exporter writes the norms in its library's own arithmetic:
- jax2onnx (default mode): Flax's LayerNorm as E[x^2] - E[x]^2 clamped at zero; jnp.var (Flax
  without fast variance, Equinox) behind a constant-row guard with the mean of the squares in
  float64; Flax's RMSNorm with epsilon as CastLike(eps, x); a hand-written jnp.var as
  ReduceSumSquare (keepdims=0, its axis put back) divided by `n - Cast(ddof)` behind
  Where(n - ddof > 0, ., NaN), and with ddof=1 a near miss that must stay;
- tf2onnx: means over the last axis as GlobalAveragePool; Keras' LayerNorm in batch-norm
  arithmetic, its RMSNormalization as x * (rsqrt(mean(x^2) + eps) * gamma), and its
  LayerNormalization(rms_scaling=True), which scales x by the centred variance: not a norm normfuse
  has, so it must stay as it is;
- jax2tf with tf2onnx (how Google's Magika was exported): Flax's statistics as keepdims=0 sums,
  arithmetic on them, then the axis put back by Reshape and Expand to a shape sliced from the
  input's at run time through int32; its RMSNorm as (x - broadcast zeros) * (rsqrt(.) * scale);
  a LayerNorm over the middle axis, which must stay as it is;
- paddle2onnx: an Identity after every residual Add and op, `var + eps` as Mul(var, 1) + eps, and
  LayerNorm spelled out at opset 13, native at 17.
"""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from test_rewrite_exports import loose_scales

from export.rewrite import rewrite_file
from export.validate import Side, compare, model_dtype

DATA = Path(__file__).parent / "data"

# file -> {target: fused norms by op}. The Flax, Keras and Paddle blocks: a LayerNorm on the block's input,
# an RMSNorm and a LayerNorm each after a residual Add whose sum is used again. The Equinox block:
# a LayerNorm on the input, an RMSNorm after the first residual Add (the second Add ends the block).
# The Keras rms_scaling block ends in its rms_scaling LayerNorm, which is not fused. The onnxruntime
# target leaves a native LayerNormalization without an Add as it is (one op already).
BLOCK = {"LayerNorm": 1, "AddRMSNorm": 1, "AddLayerNorm": 1}
EXPECTED = {
    "jax2onnx/flax-block-float32.onnx": {"tensorrt": BLOCK, "onnxruntime": BLOCK},
    "jax2onnx/flax-block-bfloat16.onnx": {"tensorrt": BLOCK, "onnxruntime": BLOCK},
    "jax2onnx/flax-block-float32-native.onnx": {"tensorrt": BLOCK, "onnxruntime": {"AddRMSNorm": 1, "AddLayerNorm": 1}},
    "jax2onnx/equinox-block-float32.onnx": {"tensorrt": {"LayerNorm": 1, "AddRMSNorm": 1},
                                            "onnxruntime": {"LayerNorm": 1, "AddRMSNorm": 1}},
    # LayerNorms written by hand with jnp.var: ReduceSumSquare over n - ddof behind Where(n - ddof > 0)
    "jax2onnx/hand-var-block-float32.onnx": {"tensorrt": {"LayerNorm": 1, "AddLayerNorm": 1},
                                             "onnxruntime": {"LayerNorm": 1, "AddLayerNorm": 1}},
    "jax2onnx/hand-var-ddof1-block-float32.onnx": {"tensorrt": {}, "onnxruntime": {}},  # Bessel's correction
    "paddle2onnx/paddle-block-float32-opset13.onnx": {"tensorrt": BLOCK, "onnxruntime": BLOCK},
    "paddle2onnx/paddle-block-float32-opset17.onnx": {"tensorrt": BLOCK,
                                                      "onnxruntime": {"AddRMSNorm": 1, "AddLayerNorm": 1}},
    "jax2tf/flax-block-rows-float32.onnx": {"tensorrt": BLOCK, "onnxruntime": BLOCK},
    "jax2tf/flax-block-seq-float32.onnx": {"tensorrt": BLOCK, "onnxruntime": BLOCK},
    "jax2tf/flax-middle-axis-float32.onnx": {"tensorrt": {}, "onnxruntime": {}},  # not over the last axis
    "tf2onnx/keras-block-float32.onnx": {"tensorrt": BLOCK, "onnxruntime": BLOCK},
    "tf2onnx/keras-block-rms-scaling-float32.onnx": {"tensorrt": {"LayerNorm": 1, "AddRMSNorm": 1},
                                                     "onnxruntime": {"LayerNorm": 1, "AddRMSNorm": 1}},
}

# file -> (candidates refused, what each reason says)
NEAR_MISSES = {"jax2onnx/hand-var-ddof1-block-float32.onnx": (2, "divided by 63, not by the row length 64")}


@pytest.mark.parametrize("exporter", ("jax2onnx", "jax2tf", "paddle2onnx", "tf2onnx"))
def test_the_fixtures_are_the_ones_the_manifest_records(exporter):
    manifest = json.loads((DATA / exporter / "MANIFEST.json").read_text())
    on_disk = sorted(f"{exporter}/{p.name}" for p in (DATA / exporter).glob("*.onnx"))
    assert sorted(f"{exporter}/{name}" for name in manifest["models"]) == on_disk
    assert on_disk == sorted(name for name in EXPECTED if name.startswith(exporter))
    assert exporter in manifest["versions"] or exporter == "jax2tf" and "jax" in manifest["versions"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("target", ("tensorrt", "onnxruntime"))
def test_exports_are_fused_and_match(name, target, tmp_path):
    source = DATA / name
    dtype = model_dtype(source)
    fused = tmp_path / f"{target}.onnx"
    report = rewrite_file(source, fused, target=target)
    assert report.counts == EXPECTED[name][target], [r.reason for r in report.rejected]
    if name in NEAR_MISSES:  # each norm-like candidate is refused, with the reason
        assert len(report.rejected) == NEAR_MISSES[name][0]
        assert all(NEAR_MISSES[name][1] in r.reason for r in report.rejected), [r.reason for r in report.rejected]
    else:
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
        rewrite_file(DATA / "jax2onnx" / name, tmp_path / name, target="tensorrt")
        graphs.append([n.op_type for n in onnx.load(str(tmp_path / name)).graph.node
                       if n.op_type in ("LayerNorm", "RMSNorm", "AddLayerNorm", "AddRMSNorm")])
    assert graphs[0] == graphs[1] == ["LayerNorm", "AddRMSNorm", "AddLayerNorm"]


def test_keras_rms_scaling_layer_norm_is_left_as_it_is(tmp_path):
    """LayerNormalization(rms_scaling=True) computes x * rsqrt(var(x) + eps) * gamma: its two
    GlobalAveragePools (mean, variance) and the product with the uncentred x stay in the graph."""
    fused = tmp_path / "fused.onnx"
    rewrite_file(DATA / "tf2onnx" / "keras-block-rms-scaling-float32.onnx", fused, target="tensorrt")
    ops = [n.op_type for n in onnx.load(str(fused)).graph.node]
    assert ops.count("GlobalAveragePool") == 2 and ops.count("Reciprocal") == 1
