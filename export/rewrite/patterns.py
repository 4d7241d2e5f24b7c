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


def reduce_last(op: str, p: Pattern, role: str | None = "reduce") -> Pattern:
    """A reduction with axes as attribute (opset < 18) or as a second input (opset >= 18); the checks
    require the last axis and keepdims."""
    return Or(Op(op, p, role=role), Op(op, p, _fresh("axes"), role=role))


def mean_last(p: Pattern) -> Pattern:
    """ReduceMean over the last axis; GlobalAveragePool, which tf2onnx writes for it: on a rank-3
    input [N, C, L] it averages L alone (the checks refuse it on any other rank); or ReduceSum over
    the last axis divided by a constant, which the checks require to be the row's length (torch's
    dynamo exporter writes var_mean's mean this way, and so do hand-written sum(x * x) / hidden), or
    multiplied by one, which they require to be the row length's inverse as the constant's type
    holds it (TensorFlow's constant folding writes `sum * (1 / n)`, as jax2tf and tf2onnx export)."""
    total = maybe_cast(reduce_last("ReduceSum", p), "cast_stat")
    mean = Or(reduce_last("ReduceMean", p), Op("GlobalAveragePool", p, role="reduce"), Op("Div", total, _fresh("row_length")),
              Op("Mul", total, _fresh("row_fraction"), commutative=True))
    return maybe_cast(mean, "cast_stat")  # a statistic taken in float32 and cast back to the half type


def square(p: Pattern, exponent: str = "square_exp") -> Pattern:
    return Or(Op("Pow", p, Var(exponent)), Op("Mul", p, p))


def mean_of_squares(p: Pattern) -> Pattern:
    """mean(p^2) over the last axis: the mean of the squares, the squares cast to a wider type and
    the mean cast back, or ReduceSumSquare over the last axis divided by the row length (jax2onnx
    writes jnp.var so)."""
    sum_of_squares = maybe_cast(reduce_last("ReduceSumSquare", p), "cast_stat")
    return Or(mean_last(maybe_cast(square(p), "cast_stat")), Op("Div", sum_of_squares, _fresh("row_length")),
              Op("Mul", sum_of_squares, _fresh("row_fraction"), commutative=True))


def sum_of_squares(p: Pattern) -> Pattern:
    """sum(p^2) over the last axis, not divided: an L2 norm's statistic. ReduceSum of the squares
    (cast to a wider type first or not: nGPT's `x.float().pow(2).sum(-1)`) or ReduceSumSquare."""
    return maybe_cast(Or(reduce_last("ReduceSum", maybe_cast(square(p), "cast_stat")), reduce_last("ReduceSumSquare", p)),
                      "cast_stat")


def variance(x: Pattern, centred: Pattern) -> Pattern:
    """Var over the last axis, as exporters write it:
    - mean((x - mean)^2), the textbook form;
    - the same with the squares cast to a wider type and the mean cast back (jax2onnx's jnp.var, in
      float64; torch, in float32 from half-precision squares); a cast that narrows what the mean reads
      is refused by the checks;
    - E[x^2] - E[x]^2, clamped at zero or not (Flax's default `use_fast_variance`). Equal in exact
      arithmetic; the fused op computes it the sound way, so where the two moments cancel (means
      large against the spread) the fused result is the more accurate one."""
    moments = Op("Sub", mean_last(square(x)), square(mean_last(x), "mean_square_exp"))
    return Or(mean_of_squares(centred), Op("Max", moments, Var("clamp_zero"), commutative=True), moments)


def constant_row_guard(x: Pattern, centred: Pattern) -> Pattern:
    """jax2onnx's guard on centred values: Where(row is constant and its mean finite, 0, x - mean),
    the row constant when min == max, the mean finite when mean - mean == 0. In exact arithmetic
    x - mean is zero on such a row already, so the guard only pins the rounding of its mean."""
    constant = Op("Equal", reduce_last("ReduceMin", x, "row_min"), reduce_last("ReduceMax", x, "row_max"), commutative=True)
    # fresh zeros: the numerator's guard and the variance's may each be in their own type
    finite = Op("Equal", Op("Sub", mean_last(x), mean_last(x)), _fresh("finite_zero"), commutative=True)
    return Op("Where", Op("And", constant, finite, commutative=True), _fresh("guard_zero"), centred, role="guard")


def inv_sqrt(p: Pattern) -> Pattern:
    return Or(
        Op("Reciprocal", Op("Sqrt", p)),
        Op("Div", Var("one"), Op("Sqrt", p)),
        Op("Pow", p, Var("rsqrt_exp")),
    )


def plus_epsilon(var: Pattern) -> Pattern:
    """var + eps; or var alone, a norm with epsilon 0: torch's exporter, with its optimiser on (the
    default), drops an epsilon of 1e-8 or less as an Add of zero (Helium's RMSNorm, eps 1e-8)."""
    return Or(Op("Add", var, Var("eps"), commutative=True), var)


def rounded_factor(p: Pattern) -> Pattern:
    """The factor x is multiplied or divided by, computed in float32 and cast back to x's half type
    first, or not: DeepSeek V4's unweighted RMSNorm, `x * rsqrt(mean(x.float()^2) + eps).to(x.dtype)`.
    Rounding the factor before the product is the same double rounding as a statistic cast back, as
    long as epsilon keeps the factor within the type's normal range (checks.rounded_factor_refusal).
    A scale carried on the inverse root multiplies it after the cast, in x's type."""
    return maybe_cast(p, "cast_factor")


def normalise(t: Pattern, var: Pattern) -> Pattern:
    """t / sqrt(var + eps), in each spelling exporters use."""
    plus_eps = plus_epsilon(var)
    return Or(
        Op("Mul", t, rounded_factor(inv_sqrt(plus_eps)), commutative=True),
        Op("Div", t, rounded_factor(Op("Sqrt", plus_eps))),
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
    # the statistic is the row's sum of squares, not their mean: an L2 norm, x / sqrt(sum(x^2) + eps),
    # which is the RMSNorm with epsilon eps / n and its scale times 1 / sqrt(n), n the row length
    row_sum: bool = False
    # a spelling one step from a norm, matched only to be refused with this reason (never fused)
    refusal: str | None = None


def _rms_patterns() -> list[NormPattern]:
    x = maybe_cast(Var("x"), "cast_in")
    normalised = normalise(x, mean_of_squares(x))  # squared in the half type, summed in float32, say
    out = maybe_cast(normalised, "cast_out")
    # Keras' RMSNormalization, as tf2onnx writes it: the scale multiplies the inverse root, then x
    inv = inv_sqrt(plus_epsilon(mean_of_squares(x)))
    scaled_inv = Op("Mul", rounded_factor(inv), Var("gamma"), commutative=True, role="scale")
    return [
        # LLaMA/Mistral: weight * normalised.to(dtype); T5: weight * normalised (no cast back)
        NormPattern("rmsnorm", False, maybe_cast(scaled(out), "cast_scaled")),
        NormPattern("rmsnorm-scaled-inverse", False, maybe_cast(Op("Mul", x, scaled_inv, commutative=True), "cast_scaled")),
        NormPattern("rmsnorm-unscaled", False, out),
    ]


def _l2_patterns() -> list[NormPattern]:
    """x / ||x|| over the last axis, with epsilon inside the root (nGPT's normalisation, transformers'
    Dory: `x * rsqrt(x.pow(2).sum(-1) + eps)`) or none (`x / x.norm(dim=-1)`, which exporters write
    as ReduceL2). x / (||x|| + eps) and F.normalize's x / max(||x||, eps) put epsilon outside the root:
    no RMSNorm, and refused (`_near_misses`)."""
    x = maybe_cast(Var("x"), "cast_in")
    length = reduce_last("ReduceL2", x)
    normalised = Or(normalise(x, sum_of_squares(x)), Op("Div", x, rounded_factor(length)),
                    Op("Mul", x, rounded_factor(Op("Reciprocal", length)), commutative=True))
    out = maybe_cast(normalised, "cast_out")
    return [
        NormPattern("l2norm", False, maybe_cast(scaled(out), "cast_scaled"), row_sum=True),
        NormPattern("l2norm-unscaled", False, out, row_sum=True),
    ]


def _layernorm_patterns() -> list[NormPattern]:
    x = maybe_cast(Var("x"), "cast_in")

    def centred() -> Pattern:
        # one instance per use: the values divided and the values squared may be centred by two
        # separate means of x (torch computes x.var's own), each reading its own axes tensor
        raw = Op("Sub", x, mean_last(x), role="centre")
        return Or(constant_row_guard(x, raw), raw)

    out = maybe_cast(normalise(centred(), variance(x, centred())), "cast_out")
    # Flax's LayerNorm as jax2tf writes it: the scale multiplies the inverse root, then x - mean
    inv = inv_sqrt(plus_epsilon(variance(x, centred())))
    scaled_inv = Op("Mul", centred(), Op("Mul", rounded_factor(inv), Var("gamma"), commutative=True, role="scale"),
                    commutative=True)
    return [
        NormPattern("layernorm", True, maybe_cast(biased(scaled(out)), "cast_scaled")),
        NormPattern("layernorm-no-bias", True, maybe_cast(scaled(out), "cast_scaled")),
        NormPattern("layernorm-no-scale", True, maybe_cast(biased(out), "cast_scaled")),
        NormPattern("layernorm-unscaled", True, out),
        NormPattern("layernorm-scaled-inverse", True, maybe_cast(biased(scaled_inv), "cast_scaled")),
        NormPattern("layernorm-scaled-inverse-no-bias", True, maybe_cast(scaled_inv, "cast_scaled")),
    ]


def _affine_layernorm_patterns() -> list[NormPattern]:
    """LayerNorm in TensorFlow's batch-normalisation arithmetic, as tf2onnx writes Keras and TF BERT
    LayerNorms: s = gamma / sqrt(var + eps), y = x * s + (beta - mean * s). The mean is taken out
    in the affine shift instead of from x (Keras 3 spells the shift -mean * s + beta)."""
    x = maybe_cast(Var("x"), "cast_in")
    var = variance(x, Op("Sub", x, mean_last(x), role="centre"))
    inv = inv_sqrt(plus_epsilon(var))

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


OUTSIDE_THE_ROOT = ("epsilon is added outside the square root{what}: the fused norms divide by sqrt({stat} + eps), "
                    "which differs from it beyond rounding wherever the {stat} is not far above epsilon (a "
                    "constant row, a padded position), so it is left as written, as no norm")


SCALED_VARIANCE = ("the variance is scaled by a constant before its root, as torch's x.var(-1) and x.std(-1) "
                   "make it unbiased (the squared deviations summed over n - 1, not n): a LayerNorm divides by the "
                   "root of their mean, so it is left as written, as no norm")


def _near_misses() -> list[NormPattern]:
    """Norms with epsilon outside the root, or with an unbiased variance, which no fused op computes:
    matched after every norm, to be refused with the reason rather than left unexplained. The Annotated Transformer's LayerNorm
    (x - mean) / (std + eps), an RMSNorm x / (rms + eps), and an L2 norm x / (||x|| + eps) or
    F.normalize's x / max(||x||, eps) (torch writes the max as a Clip, and expands it to x's shape).
    The statistic under the root is not looked at: whatever it is, the spelling is refused, and
    reported as no norm (`Rejection.no_norm`), so it is not counted among a model's norms."""
    x = maybe_cast(Var("x"), "cast_in")

    def over(numerator: Pattern, denominator: Pattern) -> Pattern:
        # the scale may multiply the numerator first, as the Annotated Transformer's a_2 * (x - mean) / (std + eps)
        numerator = Or(numerator, Op("Mul", numerator, Var("gamma"), commutative=True, role="scale"))
        # or a constant over the root multiplies x, as Zaya's query-key norm, x * (sqrt(d) / max(||x||, eps)),
        # which torch writes as x * (Reciprocal(root) * sqrt(d))
        over_root = Or(Op("Div", Var("scale_over"), denominator),
                       Op("Mul", Op("Reciprocal", denominator), Var("scale_over"), commutative=True))
        return Or(Op("Div", numerator, denominator), Op("Mul", numerator, Op("Reciprocal", denominator), commutative=True),
                  Op("Mul", numerator, over_root, commutative=True))

    def plus_eps_outside(root: Pattern) -> Pattern:
        return Op("Add", root, Var("eps"), commutative=True)

    # the deviation's statistic: the variance, made unbiased (x n / (n - 1)) or not, or whatever it
    # is (the nodes matched are named in the refusal; a statistic not matched keeps its own means)
    var = variance(x, Op("Sub", x, mean_last(x)))
    # var * n / (n - 1): torch writes the correction as a Mul and a Div, or one of them
    unbiased = Or(Op("Mul", var, Var("correction"), commutative=True), Op("Div", var, Var("correction")),
                  Op("Div", Op("Mul", var, Var("count"), commutative=True), Var("correction")))
    root = Op("Sqrt", Or(var, unbiased, Var("statistic")))
    length = Or(reduce_last("ReduceL2", x), Op("Sqrt", sum_of_squares(x)))
    clamped = Or(Op("Clip", length, Var("eps")), Op("Clip", length, Var("eps"), Var("ceiling")),
                 Op("Max", length, Var("eps"), commutative=True))
    l2_denominator = Or(plus_eps_outside(length), clamped)
    return [
        # (x - mean) / sqrt(var * n / (n - 1) + eps)
        NormPattern("layernorm-unbiased-variance", True, normalise(Op("Sub", x, mean_last(x), role="centre"), unbiased),
                    refusal=SCALED_VARIANCE),
        NormPattern("layernorm-epsilon-outside-root", True, over(Op("Sub", x, mean_last(x), role="centre"),
                                                                 plus_eps_outside(root)),
                    refusal=OUTSIDE_THE_ROOT.format(what=" of the deviation ((x - mean) / (std + eps))", stat="variance")),
        NormPattern("rmsnorm-epsilon-outside-root", False, over(x, plus_eps_outside(Op("Sqrt", mean_of_squares(x)))),
                    refusal=OUTSIDE_THE_ROOT.format(what=" of the mean square (x / (rms + eps))", stat="mean square")),
        NormPattern("l2norm-epsilon-outside-root", False,
                    over(x, Or(l2_denominator, Op("Expand", l2_denominator, _fresh("shape")))), row_sum=True,
                    refusal=OUTSIDE_THE_ROOT.format(what=" of the sum of squares (x / (||x|| + eps), or F.normalize's "
                                                         "x / max(||x||, eps))", stat="sum of squares")),
    ]


NORM_PATTERNS: list[NormPattern] = (_native_patterns() + _layernorm_patterns() + _rms_patterns()
                                    + _affine_layernorm_patterns() + _l2_patterns() + _near_misses())
# Node types that can be the last node of a norm subgraph: only their outputs are tried as roots.
ROOT_OPS = frozenset({"Mul", "Div", "Add", "Sub", "Cast", "LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
                      "SkipLayerNormalization", "SkipSimplifiedLayerNormalization"})
