"""Write the jax2onnx exports that tests/test_rewrite_framework_exports.py rewrites.

JAX is not a normfuse dependency (jaxlib alone is ~350 MB), so the exports are committed and this
script says how they were made. Re-run it in an environment of its own:

    python -m venv /tmp/jax && /tmp/jax/bin/pip install jax2onnx flax equinox
    /tmp/jax/bin/python tests/data/jax2onnx/make_fixtures.py

Each model is a small pre-norm residual block (hidden 64, dynamic batch) with random weights, so
the norms sit where a Transformer has them: one reads the block's input, the others follow a
residual Add whose sum is used again. jax2onnx writes the norms decomposed by default
(`normalization_mode="auto"`), in the spelling of the library's own code:

- Flax `nnx.LayerNorm` (its default `use_fast_variance`): var = max(E[x^2] - E[x]^2, 0);
- Flax `nnx.LayerNorm(use_fast_variance=False)` and Equinox `LayerNorm`: jnp.var, which jax2onnx
  writes with a constant-row guard (Where(min == max and mean finite, 0, x - mean)) and the mean
  of the squares in float64;
- Flax `nnx.RMSNorm`: epsilon as CastLike(eps, x);
- with `normalization_mode="prefer_native"`: LayerNormalization and RMSNormalization (opset 23);
- a LayerNorm written by hand with `jnp.var` (ReduceSumSquare over n - ddof behind a Where on
  n - ddof > 0), and the same with ddof=1, a near miss.
"""
from __future__ import annotations

import json
import os
import tempfile
from importlib.metadata import version
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import onnx
from flax import nnx
from jax2onnx import to_onnx

HIDDEN, SEQ = 64, 8
HERE = Path(__file__).parent


def randomise(module: nnx.Module, seed: int) -> None:
    """Norm scales near 1 and biases near 0, but no two alike (untrained ones are all 1 and 0)."""
    rng = np.random.default_rng(seed)
    for path, param in nnx.iter_graph(module):
        if isinstance(param, nnx.Param):
            name = str(path[-1]) if path else ""
            base = 1.0 if name == "scale" else 0.0
            value = param.get_value()
            param.set_value(jnp.asarray(base + 0.1 * rng.standard_normal(value.shape), value.dtype))


class FlaxBlock(nnx.Module):
    """x -> LayerNorm -> Linear -> + x -> RMSNorm -> Linear -> + -> LayerNorm (jnp.var)."""

    def __init__(self, dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)  # all in one dtype (the norms' statistics still fp32)
        self.norm_in = nnx.LayerNorm(HIDDEN, **kw)
        self.attn = nnx.Linear(HIDDEN, HIDDEN, **kw)
        self.norm_mid = nnx.RMSNorm(HIDDEN, **kw)
        self.mlp = nnx.Linear(HIDDEN, HIDDEN, **kw)
        self.norm_out = nnx.LayerNorm(HIDDEN, use_fast_variance=False, **kw)

    def __call__(self, x):
        h = x + self.attn(self.norm_in(x))
        h = h + self.mlp(self.norm_mid(h))
        return self.norm_out(h)


class EquinoxBlock(eqx.Module):
    """x -> LayerNorm -> Linear -> + x -> RMSNorm -> Linear -> +; per token (vmapped), as Equinox writes it."""

    norm_in: eqx.nn.LayerNorm
    attn: eqx.nn.Linear
    norm_mid: eqx.nn.RMSNorm
    mlp: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.norm_in = eqx.nn.LayerNorm(HIDDEN, eps=1e-5)
        self.attn = eqx.nn.Linear(HIDDEN, HIDDEN, key=k1)
        self.norm_mid = eqx.nn.RMSNorm(HIDDEN, eps=1e-6, use_bias=False)
        self.mlp = eqx.nn.Linear(HIDDEN, HIDDEN, key=k2)
        rng = np.random.default_rng(3)
        self.norm_in = eqx.tree_at(lambda n: (n.weight, n.bias), self.norm_in,
                                   (jnp.asarray(1 + 0.1 * rng.standard_normal(HIDDEN), jnp.float32),
                                    jnp.asarray(0.1 * rng.standard_normal(HIDDEN), jnp.float32)))
        self.norm_mid = eqx.tree_at(lambda n: n.weight, self.norm_mid,
                                    jnp.asarray(1 + 0.1 * rng.standard_normal(HIDDEN), jnp.float32))

    def token(self, x):
        h = x + self.attn(self.norm_in(x))
        return h + self.mlp(self.norm_mid(h))

    def __call__(self, x):
        return jax.vmap(jax.vmap(self.token))(x)


class HandVarBlock(nnx.Module):
    """x -> LayerNorm written by hand with jnp.var -> Linear -> + x -> the same LayerNorm. jax2onnx
    writes jnp.var as ReduceSumSquare of the centred values over n - ddof, behind
    Where(n - ddof > 0, ., NaN); with ddof=1 (Bessel's correction) the norms are no LayerNorms."""

    def __init__(self, ddof: int, rngs: nnx.Rngs):
        rng = np.random.default_rng(4)
        self.ddof = ddof
        self.attn = nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)
        self.w = nnx.List([nnx.Param(jnp.asarray(1 + 0.1 * rng.standard_normal(HIDDEN), jnp.float32)) for _ in range(2)])
        self.b = nnx.List([nnx.Param(jnp.asarray(0.1 * rng.standard_normal(HIDDEN), jnp.float32)) for _ in range(2)])

    def norm(self, x, i):
        mean = x.mean(-1, keepdims=True)
        var = jnp.var(x, -1, keepdims=True, ddof=self.ddof)
        return (x - mean) / jnp.sqrt(var + 1e-5) * self.w[i].get_value() + self.b[i].get_value()

    def __call__(self, x):
        h = x + self.attn(self.norm(x, 0))
        return self.norm(h, 1)


def save(model: onnx.ModelProto, name: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=HERE, suffix=".tmp")
    os.close(fd)
    onnx.save(model, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, HERE / name)


def main() -> None:
    made = {}
    cases = []
    for dtype in ("float32", "bfloat16"):
        block = FlaxBlock(getattr(jnp, dtype), nnx.Rngs(0))
        randomise(block, seed=1)
        cases.append((f"flax-block-{dtype}", block, dtype))
    cases.append(("equinox-block-float32", EquinoxBlock(jax.random.PRNGKey(2)), "float32"))
    cases.append(("hand-var-block-float32", HandVarBlock(0, nnx.Rngs(5)), "float32"))
    cases.append(("hand-var-ddof1-block-float32", HandVarBlock(1, nnx.Rngs(5)), "float32"))
    for name, fn, dtype in cases:
        for mode in ("auto", "prefer_native"):
            if mode == "prefer_native" and not name.startswith("flax-block-float32"):
                continue
            stem = name if mode == "auto" else f"{name}-native"
            batch = jax.export.symbolic_shape("B")[0]
            spec = jax.ShapeDtypeStruct((batch, SEQ, HIDDEN), getattr(jnp, dtype))
            model = to_onnx(fn, [spec], model_name=stem, normalization_mode=mode)
            save(model, f"{stem}.onnx")
            made[f"{stem}.onnx"] = {"normalization_mode": mode, "dtype": dtype,
                                    "ops": sorted({n.op_type for n in model.graph.node})}
    versions = {p: version(p) for p in ("jax", "flax", "equinox", "jax2onnx", "onnx")}
    (HERE / "MANIFEST.json").write_text(json.dumps({"versions": versions, "models": made}, indent=1) + "\n")
    print(json.dumps(versions), *made, sep="\n")


if __name__ == "__main__":
    main()
