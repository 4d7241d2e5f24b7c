"""The norm patterns, written as the maths they match.

Each `NormPattern` names the variables the checks read: `x` (the input, before any cast), `eps`,
`gamma` and `beta` (absent when the pattern has none), and the constants the structure relies on
(`square_exp`, `rsqrt_exp`, `one`), which the checks require to equal 2, -0.5 and 1. Alternatives
are listed most complete first, so a norm is fused with its scale and bias when they qualify.
Adding an exporter's new spelling is a line in one of the helpers below.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from .matcher import Op, Or, Pattern, Var

_ids = itertools.count()


def _fresh(prefix: str) -> Var:
    """A variable bound once per occurrence (axes inputs differ between ReduceMeans)."""
    return Var(f"{prefix}#{next(_ids)}")


def maybe_cast(p: Pattern, role: str) -> Pattern:
    return Or(Op("Cast", p, role=role), p)


def mean_last(p: Pattern) -> Pattern:
    """ReduceMean with axes as attribute (opset < 18) or as a second input (opset >= 18)."""
    return Or(Op("ReduceMean", p, role="reduce"), Op("ReduceMean", p, _fresh("axes"), role="reduce"))


def square(p: Pattern) -> Pattern:
    return Or(Op("Pow", p, Var("square_exp")), Op("Mul", p, p))


def inv_sqrt(p: Pattern) -> Pattern:
    return Or(
        Op("Reciprocal", Op("Sqrt", p)),
        Op("Div", Var("one"), Op("Sqrt", p)),
        Op("Pow", p, Var("rsqrt_exp")),
    )


def normalise(t: Pattern, variance: Pattern) -> Pattern:
    """t / sqrt(variance + eps), in each spelling exporters use."""
    plus_eps = Op("Add", variance, Var("eps"), commutative=True)
    return Or(
        Op("Mul", t, inv_sqrt(plus_eps), commutative=True),
        Op("Div", t, Op("Sqrt", plus_eps)),
    )


def scaled(t: Pattern) -> Pattern:
    return Op("Mul", t, Var("gamma"), commutative=True, role="scale")


def biased(t: Pattern) -> Pattern:
    return Op("Add", t, Var("beta"), commutative=True, role="bias")


@dataclass(frozen=True)
class NormPattern:
    name: str
    centered: bool  # LayerNorm (True) or RMSNorm (False)
    pattern: Pattern
    native: bool = False  # one framework op (its attributes carry axis and epsilon)
    skip: bool = False  # ONNX Runtime's Skip*LayerNormalization: the residual Add is inside the op


def _rms_patterns() -> list[NormPattern]:
    x = maybe_cast(Var("x"), "cast_in")
    normalised = normalise(x, mean_last(square(x)))
    out = maybe_cast(normalised, "cast_out")
    return [
        # LLaMA/Mistral: weight * normalised.to(dtype); T5: weight * normalised (no cast back)
        NormPattern("rmsnorm", False, maybe_cast(scaled(out), "cast_scaled")),
        NormPattern("rmsnorm-unscaled", False, out),
    ]


def _layernorm_patterns() -> list[NormPattern]:
    x = maybe_cast(Var("x"), "cast_in")
    centred = Op("Sub", x, mean_last(x), role="centre")
    out = maybe_cast(normalise(centred, mean_last(square(centred))), "cast_out")
    return [
        NormPattern("layernorm", True, maybe_cast(biased(scaled(out)), "cast_scaled")),
        NormPattern("layernorm-no-bias", True, maybe_cast(scaled(out), "cast_scaled")),
        NormPattern("layernorm-no-scale", True, maybe_cast(biased(out), "cast_scaled")),
        NormPattern("layernorm-unscaled", True, out),
    ]


def _affine_layernorm_patterns() -> list[NormPattern]:
    """LayerNorm in TensorFlow's batch-normalisation arithmetic, as tf2onnx writes Keras and TF BERT
    LayerNorms: s = gamma / sqrt(var + eps), y = x * s + (beta - mean * s). The mean is taken out
    in the affine shift instead of from x (Keras 3 spells the shift -mean * s + beta)."""
    x = maybe_cast(Var("x"), "cast_in")
    variance = mean_last(square(Op("Sub", x, mean_last(x), role="centre")))
    inv = inv_sqrt(Op("Add", variance, Var("eps"), commutative=True))

    def affine(s: Pattern, with_beta: bool) -> Pattern:
        mean_s = Op("Mul", mean_last(x), s, commutative=True)
        minus_mean_s = Or(Op("Neg", mean_s), Op("Mul", Op("Neg", mean_last(x)), s, commutative=True))
        x_s = Op("Mul", x, s, commutative=True)
        if with_beta:
            shift = Or(Op("Sub", Var("beta"), mean_s), Op("Add", minus_mean_s, Var("beta"), commutative=True))
            return maybe_cast(Op("Add", x_s, shift, commutative=True, role="bias"), "cast_scaled")
        return maybe_cast(Or(Op("Sub", x_s, mean_s), Op("Add", x_s, minus_mean_s, commutative=True)), "cast_scaled")

    scaled_inv = Op("Mul", inv, Var("gamma"), commutative=True, role="scale")
    return [
        NormPattern("layernorm-affine", True, affine(scaled_inv, True)),
        NormPattern("layernorm-affine-no-bias", True, affine(scaled_inv, False)),
        NormPattern("layernorm-affine-no-scale", True, affine(inv, True)),
        NormPattern("layernorm-affine-unscaled", True, affine(inv, False)),
    ]


def _native_patterns() -> list[NormPattern]:
    x = maybe_cast(Var("x"), "cast_in")

    def native(op, *args):
        return maybe_cast(Op(op, x, *args, role="native"), "cast_out")

    return [
        NormPattern("LayerNormalization", True, native("LayerNormalization", Var("gamma"), Var("beta")), native=True),
        NormPattern("LayerNormalization-no-bias", True, native("LayerNormalization", Var("gamma")), native=True),
        NormPattern("RMSNormalization", False, native("RMSNormalization", Var("gamma")), native=True),
        NormPattern("SimplifiedLayerNormalization", False, native("SimplifiedLayerNormalization", Var("gamma")), native=True),
        NormPattern("SkipLayerNormalization", True, skip_native("SkipLayerNormalization", Var("gamma"), Var("beta")), native=True, skip=True),
        NormPattern("SkipLayerNormalization-input-bias", True,
                    skip_native("SkipLayerNormalization", Var("gamma"), Var("beta"), Var("skip_bias")), native=True, skip=True),
        NormPattern("SkipLayerNormalization-no-bias", True, skip_native("SkipLayerNormalization", Var("gamma")), native=True, skip=True),
        NormPattern("SkipSimplifiedLayerNormalization", False, skip_native("SkipSimplifiedLayerNormalization", Var("gamma")), native=True, skip=True),
        NormPattern("SkipSimplifiedLayerNormalization-input-bias", False,
                    skip_native("SkipSimplifiedLayerNormalization", Var("gamma"), Var("skip_bias")), native=True, skip=True),
    ]


def skip_native(op: str, *params: Pattern) -> Pattern:
    """ONNX Runtime's fused residual norms (outputs: y, mean, inv_std, sum): a graph that ONNX Runtime's
    optimizer has already seen keeps its norms in these; for TensorRT they become AddLayerNorm/AddRMSNorm."""
    return Op(op, Var("x"), Var("skip"), *params, role="native", domains=("com.microsoft",))


NORM_PATTERNS: list[NormPattern] = (_native_patterns() + _layernorm_patterns() + _rms_patterns()
                                    + _affine_layernorm_patterns())
# Node types that can be the last node of a norm subgraph: only their outputs are tried as roots.
ROOT_OPS = frozenset({"Mul", "Div", "Add", "Sub", "Cast", "LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
                      "SkipLayerNormalization", "SkipSimplifiedLayerNormalization"})
