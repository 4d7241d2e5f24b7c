"""Write the jax2tf + tf2onnx exports that tests/test_rewrite_framework_exports.py rewrites.

JAX and TensorFlow are not normfuse dependencies, so the exports are committed and this script
says how they were made. tf2onnx converts TensorFlow graphs only, so jax2tf must lower to plain
TensorFlow ops (`native_serialization=False`, `enable_xla=False`), which JAX releases after 0.4
no longer do. Re-run it in an environment of its own:

    python -m venv /tmp/jt && /tmp/jt/bin/pip install tensorflow-cpu tf2onnx "jax==0.4.30" "jaxlib==0.4.30" "flax==0.8.5"
    /tmp/jt/bin/python tests/data/jax2tf/make_fixtures.py

This is how models such as Google's Magika (its file-type classifier, shipped in the `magika`
wheel) were written. Each model is a small Flax (linen) pre-norm residual block (hidden 64,
dynamic batch) with random weights. jax2tf writes Flax's statistics with keepdims=0 sums, then
arithmetic on them (`sum * (1 / n)`, `max(0, E[x^2] - E[x]^2)`), then puts the axis back with a
Reshape and an Expand to a shape sliced from the input's at run time through int32 casts; its
RMSNorm subtracts a mean of zeros broadcast the same way, and the scale multiplies the inverse root:
- `flax-block-rows-float32.onnx`: input [batch, 64] (rows of a 2-D input, as in Magika);
- `flax-block-seq-float32.onnx`: input [batch, 8, 64];
- `flax-middle-axis-float32.onnx`: a LayerNorm over the middle axis of [batch, 8, 64]
  (`reduction_axes=1`, `feature_axes=1`), which no normfuse op computes: nothing may fuse there.
"""
from __future__ import annotations

import json
import os
import tempfile
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402
from jax.experimental import jax2tf  # noqa: E402

HIDDEN, SEQ, OPSET = 64, 8, 17
HERE = Path(__file__).parent


class Block(nn.Module):
    """x -> LayerNorm -> Dense -> + x -> RMSNorm -> Dense -> + -> LayerNorm (jnp.var)."""

    @nn.compact
    def __call__(self, x):
        h = x + nn.Dense(HIDDEN)(nn.LayerNorm(epsilon=1e-5)(x))
        h = h + nn.Dense(HIDDEN)(nn.RMSNorm(epsilon=1e-6)(h))
        return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False)(h)


class MiddleAxis(nn.Module):
    """A LayerNorm over axis 1 of [batch, SEQ, HIDDEN]: statistics per (batch, feature) over the sequence."""

    @nn.compact
    def __call__(self, x):
        return nn.LayerNorm(epsilon=1e-5, reduction_axes=1, feature_axes=1)(x)


def randomise(params, seed: int):
    """Scales near 1 and shifts near 0, no two alike (tf2onnx would merge equal constants)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        base = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(base + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, params)


def export(module: nn.Module, shape: tuple, seed: int) -> onnx.ModelProto:
    params = randomise(module.init(jax.random.PRNGKey(seed), jnp.ones((1,) + shape[1:])), seed)
    poly = "(b, " + ", ".join(str(d) for d in shape[1:]) + ")"
    spec = [tf.TensorSpec(shape, tf.float32, name="x")]
    # with_gradient=True: with False, jax2tf ends the graph in PreventGradient, which tf2onnx cannot convert
    forward = jax2tf.convert(lambda x: module.apply(params, x), polymorphic_shapes=[poly], with_gradient=True,
                             native_serialization=False, enable_xla=False)
    function = tf.function(forward, autograph=False, input_signature=spec)
    model, _ = tf2onnx.convert.from_function(function, input_signature=spec, opset=OPSET)
    return model


def save(model: onnx.ModelProto, name: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=HERE, suffix=".tmp")
    os.close(fd)
    onnx.save(model, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, HERE / name)


def main() -> None:
    made = {}
    for name, module, shape, seed in (("flax-block-rows-float32.onnx", Block(), (None, HIDDEN), 1),
                                      ("flax-block-seq-float32.onnx", Block(), (None, SEQ, HIDDEN), 2),
                                      ("flax-middle-axis-float32.onnx", MiddleAxis(), (None, SEQ, HIDDEN), 3)):
        model = export(module, shape, seed)
        save(model, name)
        made[name] = {"opset": OPSET, "ops": sorted({n.op_type for n in model.graph.node})}
    versions = {p: version(p) for p in ("jax", "flax", "tensorflow-cpu", "tf2onnx", "onnx")}
    (HERE / "MANIFEST.json").write_text(json.dumps({"versions": versions, "models": made}, indent=1) + "\n")
    print(json.dumps(versions), *made, sep="\n")


if __name__ == "__main__":
    main()
