"""Write the tf2onnx exports that tests/test_rewrite_framework_exports.py rewrites.

TensorFlow is not a normfuse dependency, so the exports are committed and this script says how
they were made. Re-run it in an environment of its own:

    python -m venv /tmp/tf && /tmp/tf/bin/pip install tensorflow-cpu tf2onnx
    /tmp/tf/bin/python tests/data/tf2onnx/make_fixtures.py

Each model is a small Keras 3 pre-norm residual block (hidden 64, dynamic batch) with random
weights. tf2onnx writes the norms in TensorFlow's own arithmetic, with GlobalAveragePool for the
mean over the last axis of a rank-3 tensor:

- `keras.layers.LayerNormalization`: s = gamma * rsqrt(var + eps), y = x * s + (beta - mean * s);
- `keras.layers.RMSNormalization`: y = x * (rsqrt(mean(x^2) + eps) * gamma);
- `keras.layers.LayerNormalization(rms_scaling=True)`: y = x * rsqrt(var + eps) * gamma, which
  scales the uncentred x by the centred variance: neither a LayerNorm nor an RMSNorm, so nothing
  may fuse there (a near miss written by a real exporter).
"""
from __future__ import annotations

import json
import os
import tempfile
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402

HIDDEN, SEQ, OPSET = 64, 8, 17
HERE = Path(__file__).parent


def block(rms_scaling_tail: bool = False) -> keras.Model:
    """x -> LayerNorm -> Dense -> + x -> RMSNorm -> Dense -> + -> LayerNorm (or the rms_scaling one)."""
    x = keras.Input((SEQ, HIDDEN), name="x")
    h = keras.layers.Add()([x, keras.layers.Dense(HIDDEN)(keras.layers.LayerNormalization(epsilon=1e-5)(x))])
    h = keras.layers.Add()([h, keras.layers.Dense(HIDDEN)(keras.layers.RMSNormalization(epsilon=1e-6)(h))])
    tail = keras.layers.LayerNormalization(epsilon=1e-5, rms_scaling=rms_scaling_tail)
    return keras.Model(x, tail(h))


def randomise(model: keras.Model, seed: int) -> None:
    """Scales near 1 and shifts near 0, no two alike (tf2onnx would merge equal constants)."""
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        base = 1.0 if "gamma" in weight.path or "scale" in weight.path else 0.0
        weight.assign((base + 0.1 * rng.standard_normal(weight.shape)).astype("float32"))


def export(model: keras.Model, name: str) -> onnx.ModelProto:
    spec = [tf.TensorSpec((None, SEQ, HIDDEN), tf.float32, name="x")]

    @tf.function(input_signature=spec)
    def forward(x):
        return model(x)

    onnx_model, _ = tf2onnx.convert.from_function(forward, input_signature=spec, opset=OPSET)
    fd, tmp = tempfile.mkstemp(dir=HERE, suffix=".tmp")
    os.close(fd)
    onnx.save(onnx_model, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, HERE / name)
    return onnx_model


def main() -> None:
    made = {}
    for name, rms_scaling_tail in (("keras-block-float32.onnx", False), ("keras-block-rms-scaling-float32.onnx", True)):
        model = block(rms_scaling_tail)
        randomise(model, seed=1)
        onnx_model = export(model, name)
        made[name] = {"opset": OPSET, "ops": sorted({n.op_type for n in onnx_model.graph.node})}
    versions = {p: version(p) for p in ("tensorflow-cpu", "keras", "tf2onnx", "onnx")}
    (HERE / "MANIFEST.json").write_text(json.dumps({"versions": versions, "models": made}, indent=1) + "\n")
    print(json.dumps(versions), *made, sep="\n")


if __name__ == "__main__":
    main()
