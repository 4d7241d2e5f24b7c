"""Norm subgraphs as exporters write them, and near-misses, built directly with onnx.helper.

Tests, property-based runs and benchmarks describe a graph with a `NormSpec` and get a small
model whose output is the norm (and, with a residual, the sum when something else uses it).
Every spelling the rewriter knows is a field value here, so a test reads as the variant it covers:

    NormSpec(kind="rms", dtype="float16", casts="llama", square="mul", inverse="div")

A `mutation` turns the norm into a near-miss that must not be fused as a norm over the last
axis: the wrong axis, keepdims 0, two axes, Pow 3, epsilon as an input, a shared intermediate, a
scale that broadcasts over more than the last axis, a sum times 1 / (hidden + 1).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from normops import numpy_dtype

from .checks import FLOAT_TYPES, ONNX_TYPES, rounded_factor_refusal

KINDS = ("rms", "layer")
SQUARES = ("pow", "mul")
INVERSES = ("sqrt_reciprocal", "div", "one_div", "pow")  # Sqrt+Reciprocal+Mul, x/Sqrt, Div(1,Sqrt)+Mul, Pow(-0.5)+Mul
# Where the fp32 island of a half-precision norm ends: llama casts back before the scale, t5 also
# casts x twice (once for the statistics, once for the product), nn.RMSNorm scales in fp32 and then casts,
# factor casts the inverse root (or root) back and multiplies (divides) x in its own type: DeepSeek V4's
# `x * rsqrt(mean(x.float()^2) + eps).to(x.dtype)` (a LayerNorm's numerator is then x - mean cast back).
CASTS = ("none", "llama", "scale_then_cast", "t5", "factor")
SCALES = ("none", "right", "left", "gemma", "cast_w")
# the scale also on the inverse root: Keras' RMSNormalization, x * (inverse root * gamma), and
# Flax's LayerNorm as jax2tf writes it, (x - mean) * (inverse root * gamma)
RMS_SCALES = SCALES + ("inverse",)
# The mean over the last axis: ReduceMean, GlobalAveragePool on a rank-3 tensor (tf2onnx), or
# ReduceSum times 1 / hidden (TensorFlow's constant folding, as jax2tf writes it)
MEANS = ("reduce", "global_pool", "sum_fraction")
RESIDUALS = ("none", "private", "exposed")
# What an RMSNorm divides by: the root of the mean of the squares, or an L2 norm's root of their sum
# ("row_sum", nGPT's `x * rsqrt(x.pow(2).sum(-1) + eps)`) or ReduceL2 with no epsilon ("reduce_l2",
# torch's `x / x.norm(dim=-1)`): the RMSNorm with epsilon / n and its scale / sqrt(n).
RMS_STATISTICS = ("mean", "row_sum", "reduce_l2")
# LayerNorm's variance: mean((x - mean)^2); the same averaged in float64 and cast back (jax2onnx's
# jnp.var in Flax and Equinox); E[x^2] - E[x]^2 (Flax's fast variance), clamped at zero or not;
# ReduceSumSquare(x - mean) / n (jax2onnx's hand-written jnp.var).
VARIANCES = ("centred", "float64", "moments", "moments_clamped", "sum_square")
# LayerNorm-only near misses (each brings its own variance spelling): the variance averaged in fp16,
# E[x^2] - E[x]^2 clamped at 1, a constant-row guard that gives 1.
LAYER_MUTATIONS = ("variance_in_half", "clamp_nonzero", "guard_nonzero")
AXIS_MUTATIONS = ("wrong_axis", "keepdims0", "two_axes")  # these keep ReduceMean, whatever `mean` says
MUTATIONS = (None, "wrong_axis", "keepdims0", "two_axes", "pow3", "eps_input", "shared", "broadcast_scale",
             "pool_rank4", "wrong_fraction") + LAYER_MUTATIONS


@dataclass(frozen=True)
class NormSpec:
    kind: str = "rms"
    dtype: str = "float32"
    square: str = "pow"
    inverse: str = "sqrt_reciprocal"
    casts: str = "none"  # only meaningful for float16/bfloat16
    scale: str = "right"
    bias: bool = True  # LayerNorm only
    residual: str = "none"
    axes_input: bool = True  # opset >= 18 ReduceMean takes axes as an input
    positive_axis: bool = False
    epsilon: float = 1e-5
    epsilon_castlike: bool = False  # epsilon as CastLike(eps, x), as Flax writes it
    epsilon_dropped: bool = False  # no Add of epsilon: torch's optimiser drops one of 1e-8 or less
    mean: str = "reduce"  # one of MEANS; global_pool makes the input rank 3
    variance: str = "centred"  # LayerNorm only: one of VARIANCES
    guard: bool = False  # LayerNorm only: jax2onnx's Where(row constant and mean finite, 0, x - mean)
    # RMSNorm only: one of RMS_STATISTICS (reduce_l2 ignores square and epsilon). Not with scale "inverse":
    # no exporter scales an L2 norm's inverse root, and the rewriter does not match one so
    statistic: str = "mean"
    hidden: int = 16
    mutation: str | None = None

    @property
    def opset(self) -> int:
        return 18 if self.axes_input else 17

    @property
    def stats_dtype(self) -> str:
        return "float32" if self.casts != "none" and self.dtype != "float32" else self.dtype

    def describe(self) -> str:
        fields = [self.kind, self.dtype, self.square, self.inverse, f"casts={self.casts}", f"scale={self.scale}",
                  f"residual={self.residual}", "axes=input" if self.axes_input else "axes=attr"]
        if self.kind == "layer":
            fields.append(f"bias={self.bias}")
            if self.variance != "centred":
                fields.append(f"variance={self.variance}")
            if self.guard:
                fields.append("guard")
        if self.epsilon_castlike:
            fields.append("eps=CastLike")
        if self.epsilon_dropped:
            fields.append("eps=none")
        if self.mean != "reduce":
            fields.append(f"mean={self.mean}")
        if self.kind == "rms" and self.statistic != "mean":
            fields.append(f"statistic={self.statistic}")
        if self.positive_axis:
            fields.append("axis=+")
        if self.mutation:
            fields.append(f"mutation={self.mutation}")
        return " ".join(fields)


class _Builder:
    def __init__(self, prefix: str = ""):
        self.nodes, self.inits, self.prefix, self.count = [], [], prefix, 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{self.prefix}{stem}_{self.count}"

    def const(self, value, dtype) -> str:
        name = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value).astype(numpy_dtype(dtype)), name))
        return name

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out + "_node", **attrs))
        return out


def _mean(b: _Builder, spec: NormSpec, t: str, rank: int, op: str = "ReduceMean", dtype: str | None = None) -> str:
    """The mean of `t` over the last axis as spec.mean spells it (or `op`'s reduction); `dtype`: t's, when
    it is not the statistics' own."""
    if op == "ReduceMean" and uses_global_pool(spec):
        return b.op("GlobalAveragePool", t)  # averages every axis after the first two
    axis = rank - 1 if spec.positive_axis else -1
    axes, keepdims = [axis], 1
    if spec.mutation == "wrong_axis":
        axes = [0]  # build() makes the rank at least 2, so axis 0 is never the last one
    elif spec.mutation == "two_axes":
        axes = [-2, -1]
    elif spec.mutation == "keepdims0":
        keepdims = 0
    fraction = op == "ReduceMean" and (spec.mean == "sum_fraction" or spec.mutation == "wrong_fraction")
    reduce_op = "ReduceSum" if fraction else op
    if spec.axes_input or reduce_op == "ReduceSum":  # ReduceSum's axes are an input from opset 13
        reduced = b.op(reduce_op, t, b.const(np.array(axes, dtype=np.int64), "int64"), keepdims=keepdims)
    else:
        reduced = b.op(reduce_op, t, axes=axes, keepdims=keepdims)
    if not fraction:
        return reduced
    count = spec.hidden + (1 if spec.mutation == "wrong_fraction" else 0)  # the near miss divides by one too many
    return b.op("Mul", reduced, b.const(1.0 / count, dtype or spec.stats_dtype))


def uses_global_pool(spec: NormSpec) -> bool:
    return (spec.mean == "global_pool" or spec.mutation == "pool_rank4") and spec.mutation not in AXIS_MUTATIONS


def _square(b: _Builder, spec: NormSpec, t: str, dtype: str) -> str:
    if spec.square == "pow" or spec.mutation == "pow3":
        return b.op("Pow", t, b.const(3.0 if spec.mutation == "pow3" else 2.0, dtype))
    return b.op("Mul", t, t)


def _variance(b: _Builder, spec: NormSpec, x: str, mean: str, centred: str, rank: int) -> str:
    """LayerNorm's variance of x (its mean and centred values given) in the spelling spec.variance names."""
    s = spec.stats_dtype
    spelling = {"variance_in_half": "float64", "clamp_nonzero": "moments_clamped"}.get(spec.mutation, spec.variance)
    if spelling in ("moments", "moments_clamped"):
        var = b.op("Sub", _mean(b, spec, _square(b, spec, x, s), rank), _square(b, spec, mean, s))
        if spelling == "moments":
            return var
        return b.op("Max", var, b.const(1.0 if spec.mutation == "clamp_nonzero" else 0.0, s))
    if spelling == "sum_square":
        return b.op("Div", _mean(b, spec, centred, rank, "ReduceSumSquare"), b.const(float(spec.hidden), s))
    squares = _square(b, spec, centred, s)
    if spelling == "float64":
        half = onnx.TensorProto.BFLOAT16 if s == "float16" else onnx.TensorProto.FLOAT16  # never the squares' own type
        wide = half if spec.mutation == "variance_in_half" else onnx.TensorProto.DOUBLE
        return b.op("Cast", _mean(b, spec, b.op("Cast", squares, to=wide), rank, dtype=FLOAT_TYPES[wide]), to=ONNX_TYPES[s])
    return _mean(b, spec, squares, rank)


def _constant_row_guard(b: _Builder, spec: NormSpec, x: str, mean: str, centred: str, rank: int,
                        dtype: str | None = None) -> str:
    """Where(min == max and mean - mean == 0, 0, x - mean), as jax2onnx writes jnp.var's centring;
    `dtype`: x's, when it is not the statistics' own."""
    s = dtype or spec.stats_dtype
    zero = b.const(0.0, s)
    constant = b.op("Equal", _mean(b, spec, x, rank, "ReduceMin"), _mean(b, spec, x, rank, "ReduceMax"))
    finite = b.op("Equal", b.op("Sub", mean, mean), zero)
    value = b.const(1.0, s) if spec.mutation == "guard_nonzero" else zero
    return b.op("Where", b.op("And", constant, finite), value, centred)


def norm_subgraph(b: _Builder, spec: NormSpec, x: str, rank: int, weights: dict | None = None) -> tuple[str, list[str]]:
    """Append the norm of `x` to `b`; returns (y, extra graph outputs). `weights` names given gamma/beta."""
    d, s = spec.dtype, spec.stats_dtype
    weights = weights or {}
    t = x_in_stats = b.op("Cast", x, to=ONNX_TYPES[s]) if s != d else x
    rounded_factor = spec.casts == "factor" and s != d  # the factor cast back to x's type, the product in it
    extra = []
    if spec.kind == "layer":
        mean = _mean(b, spec, t, rank)
        centred = raw = b.op("Sub", t, mean)
        if spec.guard or spec.mutation == "guard_nonzero":
            centred = _constant_row_guard(b, spec, t, mean, raw, rank)
        # the near miss guards the numerator only: guarding both would be an RMSNorm of the guarded values
        var = _variance(b, spec, t, mean, raw if spec.mutation == "guard_nonzero" else centred, rank)
        t = like = centred  # like: a tensor of the statistics' type, which CastLike reads
        if rounded_factor:  # the numerator in x's type: x minus the mean cast back
            like = x_in_stats  # the centred values in float32 may have no other reader (E[x^2] - E[x]^2)
            mean_d = b.op("Cast", mean, to=ONNX_TYPES[d])
            t = b.op("Sub", x, mean_d)
            if spec.guard or spec.mutation == "guard_nonzero":
                t = _constant_row_guard(b, spec, x, mean_d, t, rank, dtype=d)
    else:
        sq = _square(b, spec, t, s) if spec.statistic != "reduce_l2" else None
        statistic_of = t
        if spec.casts == "t5" and s != d:  # T5 casts x again for the product
            t = b.op("Cast", x, to=ONNX_TYPES[s])
        like = t
        if rounded_factor:
            t = x  # the product in x's type
        if spec.statistic == "reduce_l2":
            length = _mean(b, spec, statistic_of, rank, "ReduceL2")
            if spec.mutation == "shared":
                extra.append(length)
            factor = length if spec.inverse == "div" else b.op("Reciprocal", length)
            if rounded_factor:
                factor = b.op("Cast", factor, to=ONNX_TYPES[d])
            normed = b.op("Div" if spec.inverse == "div" else "Mul", t, factor)
            return _scale_and_bias(b, spec, normed, weights), extra
        var = _mean(b, spec, sq, rank, "ReduceSum" if spec.statistic == "row_sum" else "ReduceMean")
    if spec.mutation == "shared":
        extra.append(var)
    eps = "epsilon_input" if spec.mutation == "eps_input" else b.const(spec.epsilon, s)
    if spec.epsilon_castlike and spec.mutation != "eps_input":
        eps = b.op("CastLike", b.const(spec.epsilon, "float64"), like)
    plus = var if spec.epsilon_dropped and spec.mutation != "eps_input" else b.op("Add", var, eps)
    hidden = spec.hidden
    rng = np.random.default_rng(hidden)
    w_shape = (2, hidden) if spec.mutation == "broadcast_scale" else (hidden,)  # build() makes dim -2 be 2
    inverse_scaled = spec.scale == "inverse"
    if spec.inverse == "div" and not inverse_scaled:
        root = b.op("Sqrt", plus)
        normed = b.op("Div", t, b.op("Cast", root, to=ONNX_TYPES[d]) if rounded_factor else root)
    else:
        if spec.inverse == "pow":
            inv = b.op("Pow", plus, b.const(-0.5, s))
        elif spec.inverse == "one_div":
            inv = b.op("Div", b.const(1.0, s), b.op("Sqrt", plus))
        else:  # sqrt_reciprocal (and div, when the scale goes on the inverse root)
            inv = b.op("Reciprocal", b.op("Sqrt", plus))
        if rounded_factor:
            inv = b.op("Cast", inv, to=ONNX_TYPES[d])
        if inverse_scaled:  # Keras, Flax: x * (rsqrt(...) * gamma), gamma in the inverse root's dtype
            inv = b.op("Mul", inv, weights.get("gamma") or b.const(rng.uniform(0.5, 1.5, w_shape), d if rounded_factor else s))
        normed = b.op("Mul", t, inv)
    return _scale_and_bias(b, spec, normed, weights), extra


def _scale_and_bias(b: _Builder, spec: NormSpec, normed: str, weights: dict) -> str:
    """The normalised values cast back, scaled and biased as spec says."""
    d, s, hidden = spec.dtype, spec.stats_dtype, spec.hidden
    rng = np.random.default_rng(hidden)
    w_shape = (2, hidden) if spec.mutation == "broadcast_scale" else (hidden,)  # build() makes dim -2 be 2
    w_dtype = d if spec.casts in ("none", "llama", "t5", "factor") else s
    y = normed
    if spec.casts in ("llama", "t5") and s != d:
        y = b.op("Cast", y, to=ONNX_TYPES[d])
    if spec.scale not in ("none", "inverse"):
        w = weights.get("gamma") or b.const(rng.uniform(0.5, 1.5, w_shape), w_dtype)
        if spec.scale == "gemma":
            w = b.op("Add", b.const(1.0, w_dtype), w)
        elif spec.scale == "cast_w":
            w_half = weights.get("gamma") or b.const(rng.uniform(0.5, 1.5, w_shape), d)
            w = b.op("Cast", w_half, to=ONNX_TYPES[w_dtype]) if w_dtype != d else w_half
        y = b.op("Mul", w, y) if spec.scale == "left" else b.op("Mul", y, w)
    if spec.kind == "layer" and spec.bias:
        beta = weights.get("beta") or b.const(rng.uniform(-0.5, 0.5, (hidden,)), w_dtype)
        y = b.op("Add", y, beta)
    if spec.casts == "scale_then_cast" and s != d:
        y = b.op("Cast", y, to=ONNX_TYPES[d])
    return y


def build(spec: NormSpec, leading: tuple = (2, 5)) -> onnx.ModelProto:
    """A model computing the norm described by `spec` on input `x` (and `r` with a residual).

    `leading` are the dims before the normalised one: ints, or names for symbolic dims."""
    b = _Builder()
    d = spec.dtype
    leading = tuple(leading)
    if uses_global_pool(spec):  # rank 3 (4 for the near miss): [N, C, hidden]
        wanted = 3 if spec.mutation == "pool_rank4" else 2
        leading = (leading + (2, 3, 2))[:wanted]
    if spec.mutation in ("wrong_axis", "two_axes") and not leading:
        leading = (2,)
    if spec.mutation == "broadcast_scale":  # the [2, H] scale must broadcast against x
        leading = leading[:-1] + (2,) if leading else (2,)
    shape = list(leading) + [spec.hidden]
    if spec.mutation == "keepdims0":  # a keepdims-0 mean of shape [1, H] broadcasts against [1, H, H]
        shape = [1, spec.hidden, spec.hidden]
    inputs = [helper.make_tensor_value_info("x", ONNX_TYPES[d], shape)]
    x = "x"
    outputs = []
    if spec.residual != "none":
        inputs.append(helper.make_tensor_value_info("r", ONNX_TYPES[d], shape))
        x = b.op("Add", "x", "r")
    if spec.mutation == "eps_input":
        inputs.append(helper.make_tensor_value_info("epsilon_input", ONNX_TYPES[spec.stats_dtype], []))
    y, extra = norm_subgraph(b, spec, x, len(shape))
    outputs.append(helper.make_tensor_value_info(y, ONNX_TYPES[d], None))
    if spec.residual == "exposed":
        outputs.append(helper.make_tensor_value_info(b.op("Relu", x), ONNX_TYPES[d], None))
    outputs += [helper.make_tensor_value_info(e, ONNX_TYPES[spec.stats_dtype], None) for e in extra]
    graph = helper.make_graph(b.nodes, "norm", inputs, outputs, initializer=b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", spec.opset)], ir_version=9)


def expected_fusions(spec: NormSpec) -> int:
    """How many norms a correct rewriter fuses in `build(spec)` (0 for a near-miss)."""
    if spec.mutation in (None, "broadcast_scale") and rounded_factor_refused(spec):
        return 0
    if spec.mutation == "broadcast_scale":  # fused without its scale, unless the scale sits on the inverse root
        return 0 if spec.scale == "inverse" else 1
    return 0 if spec.mutation is not None else 1


def rounded_factor_refused(spec: NormSpec) -> bool:
    """A factor cast back to a half type where epsilon leaves it room to overflow (or a root, to lose
    its precision): more than a rounding, so no norm to fuse (checks.rounded_factor_refusal)."""
    if spec.casts != "factor" or spec.stats_dtype == spec.dtype:
        return False
    reduce_l2 = spec.kind == "rms" and spec.statistic == "reduce_l2"
    epsilon = 0.0 if spec.epsilon_dropped or reduce_l2 else float(np.float32(spec.epsilon))
    root = spec.inverse == "div" and (spec.scale != "inverse" or reduce_l2)
    return rounded_factor_refusal(spec.stats_dtype, spec.dtype, epsilon, root) is not None


def random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        ttype = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 2 for d in ttype.shape.dim]
        dtype = numpy_dtype(FLOAT_TYPES[ttype.elem_type])
        values = rng.standard_normal(dims) + 0.3 if value.name != "epsilon_input" else np.array(1e-5)
        feeds[value.name] = np.asarray(values).astype(dtype)
    return feeds


def variants(kind: str, dtype: str = "float32", **fixed) -> list[NormSpec]:
    """One spec per structural spelling of `kind` (square x inverse x scale), for table-driven tests."""
    out = []
    for square in SQUARES:
        for inverse in INVERSES:
            for scale in SCALES:
                out.append(replace(NormSpec(kind=kind, dtype=dtype, square=square, inverse=inverse, scale=scale), **fixed))
    return out


# Control-flow bodies: norms inside If branches and Loop / Scan bodies, reading the enclosing graph.

def _body_graph(b: _Builder, name: str, inputs: list, outputs: list) -> onnx.GraphProto:
    return helper.make_graph(b.nodes, name, inputs, outputs, initializer=b.inits)


def if_model(then_spec: NormSpec, else_spec: NormSpec, leading: tuple = (2, 5), outer_gamma: bool = True,
             opset: int = 18) -> onnx.ModelProto:
    """y = If(cond, then: norm(x) by `then_spec`, else: norm(x) by `else_spec`); both branches read
    x from the enclosing graph, and the then branch's gamma is an initializer of the enclosing graph
    (`outer_gamma`). A spec with mutation "eps_input" reads epsilon from the enclosing graph's input."""
    d, hidden = then_spec.dtype, then_spec.hidden
    shape = list(leading) + [hidden]
    rank = len(shape)
    outer = _Builder("outer_")
    weights = {}
    if outer_gamma:
        weights["gamma"] = "outer_gamma"
        # as norm_subgraph's: a scale on the inverse root is in the statistics' dtype
        in_stats = (then_spec.scale == "inverse" and then_spec.casts != "factor") or \
            then_spec.casts not in ("none", "llama", "t5", "factor")
        w_dtype = then_spec.stats_dtype if in_stats else d
        outer.inits.append(numpy_helper.from_array(np.linspace(0.5, 1.5, hidden).astype(numpy_dtype(w_dtype)), "outer_gamma"))
    branches = {}
    for key, spec in (("then_branch", then_spec), ("else_branch", else_spec)):
        b = _Builder(f"{key}_")
        y, _ = norm_subgraph(b, spec, "x", rank, weights if key == "then_branch" else None)
        y = b.op("Identity", y)
        branches[key] = _body_graph(b, key, [], [helper.make_tensor_value_info(y, ONNX_TYPES[d], None)])
    inputs = [helper.make_tensor_value_info("x", ONNX_TYPES[d], shape), helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])]
    if "eps_input" in (then_spec.mutation, else_spec.mutation):  # in the statistics' type of the branch reading it
        reader = then_spec if then_spec.mutation == "eps_input" else else_spec
        inputs.append(helper.make_tensor_value_info("epsilon_input", ONNX_TYPES[reader.stats_dtype], []))
    node = helper.make_node("If", ["cond"], ["y"], name="branch", **branches)
    graph = helper.make_graph([node], "if_norms", inputs, [helper.make_tensor_value_info("y", ONNX_TYPES[d], shape)],
                              initializer=outer.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def loop_model(state_spec: NormSpec, outer_spec: NormSpec, leading: tuple = (2, 5), grow: bool = False) -> onnx.ModelProto:
    """A Loop of `n` iterations: the state starts as x and becomes norm(state) by `state_spec` (the
    body declares the state's shape); each iteration also emits norm(x) by `outer_spec` of the
    enclosing graph's x, plus the iteration's state, as a scan output. With `grow` the body gives
    the state back with one more leading axis (Unsqueeze): its declared shape holds only in the
    first iteration."""
    d, hidden = state_spec.dtype, state_spec.hidden
    shape = list(leading) + [hidden]
    rank = len(shape)
    b = _Builder("body_")
    state, _ = norm_subgraph(b, state_spec, "state_in", rank)
    if grow:
        state = b.op("Unsqueeze", state, b.const(np.array([0]), "int64"))
    else:
        state = b.op("Identity", state)
    emitted, _ = norm_subgraph(b, outer_spec, "x", rank)
    emitted = b.op("Add", emitted, "state_in")
    cond = b.op("Identity", "cond_in")
    body = _body_graph(b, "loop_body", [
        helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
        helper.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
        helper.make_tensor_value_info("state_in", ONNX_TYPES[d], shape),
    ], [helper.make_tensor_value_info(cond, onnx.TensorProto.BOOL, []),
        helper.make_tensor_value_info(state, ONNX_TYPES[d], None),
        helper.make_tensor_value_info(emitted, ONNX_TYPES[d], None)])
    node = helper.make_node("Loop", ["n", "keep_going", "x"], ["state", "per_step"], name="loop", body=body)
    inputs = [helper.make_tensor_value_info("x", ONNX_TYPES[d], shape), helper.make_tensor_value_info("n", onnx.TensorProto.INT64, [])]
    outputs = [helper.make_tensor_value_info("state", ONNX_TYPES[d], None), helper.make_tensor_value_info("per_step", ONNX_TYPES[d], None)]
    keep_going = numpy_helper.from_array(np.array(True), "keep_going")
    graph = helper.make_graph([node], "loop_norms", inputs, outputs, initializer=[keep_going])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", state_spec.opset)], ir_version=9)


def scan_model(spec: NormSpec, leading: tuple = (2,), steps: int = 3, grow: bool = False) -> onnx.ModelProto:
    """A Scan over the first axis of xs [steps, *leading, hidden]: the state starts as s0 and becomes
    norm(state + slice) by `spec`; the scan output is the state. With `grow` the state comes back
    with one more leading axis, so the shape inferred from s0 holds in the first iteration only."""
    d, hidden = spec.dtype, spec.hidden
    shape = list(leading) + [hidden]
    b = _Builder("scan_")
    total = b.op("Add", "s_in", "xs_in")
    state, _ = norm_subgraph(b, spec, total, len(shape))
    if grow:
        state = b.op("Unsqueeze", state, b.const(np.array([0]), "int64"))
    out = b.op("Identity", state)
    body = _body_graph(b, "scan_body", [helper.make_tensor_value_info("s_in", ONNX_TYPES[d], None),
                                        helper.make_tensor_value_info("xs_in", ONNX_TYPES[d], None)],
                       [helper.make_tensor_value_info(state, ONNX_TYPES[d], None),
                        helper.make_tensor_value_info(out, ONNX_TYPES[d], None)])
    node = helper.make_node("Scan", ["s0", "xs"], ["s", "ys"], name="scan", body=body, num_scan_inputs=1)
    inputs = [helper.make_tensor_value_info("s0", ONNX_TYPES[d], shape),
              helper.make_tensor_value_info("xs", ONNX_TYPES[d], [steps] + shape)]
    outputs = [helper.make_tensor_value_info("s", ONNX_TYPES[d], None), helper.make_tensor_value_info("ys", ONNX_TYPES[d], None)]
    graph = helper.make_graph([node], "scan_norms", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", spec.opset)], ir_version=9)


def plain_rms_nodes(x: str, y: str, scale: str | None = "g") -> list[onnx.NodeProto]:
    """`y = x / sqrt(mean(x * x) + eps)`, times `scale` when given, as nodes named after `y` that
    read the initializers of `plain_rms_constants` (for hand-made graphs around one norm)."""
    nodes = [helper.make_node("Mul", [x, x], [f"{y}_sq"]),
             helper.make_node("ReduceMean", [f"{y}_sq", "axes"], [f"{y}_ms"], keepdims=1),
             helper.make_node("Add", [f"{y}_ms", "eps"], [f"{y}_mse"]),
             helper.make_node("Sqrt", [f"{y}_mse"], [f"{y}_root"]),
             helper.make_node("Div", [x, f"{y}_root"], [f"{y}_n" if scale else y])]
    if scale:
        nodes.append(helper.make_node("Mul", [f"{y}_n", scale], [y]))
    return nodes


def plain_rms_constants(hidden: int) -> list[onnx.TensorProto]:
    """`axes` (the last), `eps` (1e-5) and a scale `g` of `hidden` values for `plain_rms_nodes`."""
    return [numpy_helper.from_array(np.array([-1], np.int64), "axes"),
            numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
            numpy_helper.from_array(np.linspace(0.5, 1.5, hidden).astype(np.float32), "g")]
