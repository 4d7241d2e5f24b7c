"""Write the paddle2onnx exports that tests/test_rewrite_framework_exports.py rewrites.

PaddlePaddle is not a normfuse dependency, so the exports are committed and this script says how
they were made. Re-run it in an environment of its own:

    python -m venv /tmp/pd && /tmp/pd/bin/pip install paddlepaddle paddle2onnx packaging onnx
    /tmp/pd/bin/python tests/data/paddle2onnx/make_fixtures.py

The model is a small pre-norm residual block (hidden 64, dynamic batch) with random weights:
`paddle.nn.LayerNorm` on the input, a PaddleNLP-style LLaMA RMSNorm (rsqrt(mean(x^2) + eps) * x,
statistics in float32) and a LayerNorm after residual Adds. paddle2onnx writes an Identity after
each residual Add; at opset 13 the LayerNorms are spelled out (ReduceMean, Sub, Pow, ..., Div), at
opset 17 they are LayerNormalization ops.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx
import paddle

HIDDEN, SEQ = 64, 8
HERE = Path(__file__).parent


class LlamaRMSNorm(paddle.nn.Layer):
    """As PaddleNLP's LLaMA writes it."""

    def __init__(self, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.weight = self.create_parameter([hidden], default_initializer=paddle.nn.initializer.Constant(1.0))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        variance = hidden_states.astype("float32").pow(2).mean(-1, keepdim=True)
        hidden_states = paddle.rsqrt(variance + self.variance_epsilon) * hidden_states
        return hidden_states * self.weight


class Block(paddle.nn.Layer):
    """x -> LayerNorm -> Linear -> + x -> RMSNorm -> Linear -> + -> LayerNorm."""

    def __init__(self):
        super().__init__()
        self.norm_in = paddle.nn.LayerNorm(HIDDEN, epsilon=1e-5)
        self.attn = paddle.nn.Linear(HIDDEN, HIDDEN)
        self.norm_mid = LlamaRMSNorm(HIDDEN)
        self.mlp = paddle.nn.Linear(HIDDEN, HIDDEN)
        self.norm_out = paddle.nn.LayerNorm(HIDDEN, epsilon=1e-5)

    def forward(self, x):
        h = x + self.attn(self.norm_in(x))
        h = h + self.mlp(self.norm_mid(h))
        return self.norm_out(h)


def randomise(model: paddle.nn.Layer, seed: int) -> None:
    """Norm scales near 1 and shifts near 0, no two alike."""
    rng = np.random.default_rng(seed)
    for name, param in model.named_parameters():
        base = 1.0 if name.startswith("norm") and name.endswith("weight") else 0.0
        param.set_value((base + 0.1 * rng.standard_normal(param.shape)).astype("float32"))


def main() -> None:
    paddle.seed(0)
    model = Block()
    randomise(model, seed=1)
    model.eval()
    spec = [paddle.static.InputSpec([None, SEQ, HIDDEN], "float32", "x")]
    made = {}
    for opset in (13, 17):
        name = f"paddle-block-float32-opset{opset}.onnx"
        with tempfile.TemporaryDirectory(dir=HERE) as tmp:
            paddle.onnx.export(model, os.path.join(tmp, "model"), input_spec=spec, opset_version=opset)
            os.chmod(os.path.join(tmp, "model.onnx"), 0o644)
            shutil.move(os.path.join(tmp, "model.onnx"), HERE / name)
        made[name] = {"opset": opset, "ops": sorted({n.op_type for n in onnx.load(str(HERE / name)).graph.node})}
    versions = {p: version(p) for p in ("paddlepaddle", "paddle2onnx", "onnx")}
    (HERE / "MANIFEST.json").write_text(json.dumps({"versions": versions, "models": made}, indent=1) + "\n")
    print(json.dumps(versions), *made, sep="\n")


if __name__ == "__main__":
    main()
