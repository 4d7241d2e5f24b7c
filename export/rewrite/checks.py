"""Semantic checks: what makes a structural match exactly a norm over the last axis.

A structural match only says the nodes are wired like a norm. These checks establish the rest
from constants and inferred shapes (axis, keepdims, exponents, epsilon, scale and bias sizes,
private intermediates) and return a reason whenever one of them cannot be established.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from normops import SUPPORTED_DTYPES, numpy_dtype

from .matcher import DEFAULT_DOMAINS, Match, present_inputs, producer
from .patterns import NormPattern

FLOAT_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
               onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.DOUBLE: "float64"}
ONNX_TYPES = {name: elem for elem, name in FLOAT_TYPES.items()}  # "float16" -> TensorProto.FLOAT16
SMALL_CONSTANT = 64  # elements: larger constants are weights and are never read by the checks


class Rejected(Exception):
    """A candidate that is not provably a last-axis norm; the message is the reason."""


@dataclass
class NormCandidate:
    pattern: NormPattern
    match: Match
    x: gs.Tensor  # the fused op's input
    output: gs.Tensor  # the tensor the fused op produces (the match root)
    hidden: int
    epsilon: float
    gamma: gs.Tensor | None
    beta: gs.Tensor | None
    nodes: list  # nodes the fused op replaces
    scale_factor: float = 1.0  # the fused op's scale is gamma (or ones) times this: 1 / sqrt(n) for an L2 norm
    residual: tuple | None = None  # (a, b, add_node) when the Add in front is fused too
    expose_sum: bool = False
    sum_tensor: gs.Tensor | None = None  # the residual sum as the graph has it (x, or a Skip op's 4th output)
    skip_bias: gs.Tensor | None = None  # a Skip op's input bias (sum = x + skip + bias)
    through_reshape: gs.Node | None = None  # a rows-preserving Reshape between the residual Add and x
    notes: list = field(default_factory=list)
    scope: object = None  # the rewriter's Scope: the graph (main or a control-flow body) holding the nodes

    @property
    def centered(self) -> bool:
        return self.pattern.centered

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.nodes]


def dtype_name(tensor: gs.Tensor) -> str | None:
    """numpy-style dtype name of a tensor, from shape inference; None when unknown."""
    dtype = getattr(tensor, "dtype", None)
    if dtype is None:
        return None
    if isinstance(dtype, int):
        return FLOAT_TYPES.get(dtype)
    try:
        return np.dtype(dtype).name
    except TypeError:
        return getattr(dtype, "name", str(dtype))


def is_external(tensor: gs.Tensor) -> bool:
    """A constant whose bytes are in an external file: never read by the rewriter."""
    return getattr(tensor, "data_location", None) == onnx.TensorProto.EXTERNAL


# set on the initializers that are also graph inputs (rewriter.mark_overridable): a caller may feed
# another value, so no pass may read, fold or copy theirs
OVERRIDABLE = "normfuse_overridable"


def is_overridable(tensor: gs.Tensor) -> bool:
    return getattr(tensor, OVERRIDABLE, False)


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """Value of a small constant (initializer, Constant node output, or a Cast/CastLike of one, as
    Flax writes epsilon: CastLike(eps, x)); None otherwise, and for an initializer that is also a
    graph input (its value may be overridden at run time)."""
    if isinstance(tensor, gs.Constant):
        if int(np.prod(tensor.shape)) > SMALL_CONSTANT or is_external(tensor) or is_overridable(tensor):
            return None  # a weight: its bytes are never read here
        return np.asarray(tensor.values)
    node = producer(tensor)
    if node is not None and node.op == "Constant":
        value = node.attrs.get("value")
        if isinstance(value, gs.Constant) and int(np.prod(value.shape)) <= SMALL_CONSTANT:
            return np.asarray(value.values)
        for key in ("value_float", "value_int", "value_floats", "value_ints"):
            if key in node.attrs:
                return np.asarray(node.attrs[key])
    if node is not None and node.op in ("Cast", "CastLike") and (node.domain or "") in ("", "ai.onnx"):
        source = constant_value(node.inputs[0])
        target = _cast_target(node)
        if source is not None and target is not None:
            return source.astype(target)  # the value the graph computes with, rounding included
    if node is not None and (node.domain or "") in DEFAULT_DOMAINS:
        if node.op in SHAPE_OPS:
            return _shape_op(node)
        return _rank_arithmetic(node)
    return None


SHAPE_OPS = ("Identity", "Reshape", "Squeeze", "Unsqueeze", "Concat")


def _shape_op(node: gs.Node) -> np.ndarray | None:
    """A small constant moved about without changing a value, as torch's exporter writes reduction
    axes when its optimiser is off (`Reshape(Constant([-1]), Constant([-1]))`)."""
    values = [constant_value(t) if t.name else None for t in node.inputs]
    if not values or values[0] is None:
        return None
    data = values[0]
    try:
        if node.op == "Identity":
            return data
        if node.op == "Concat":
            if any(v is None for v in values):
                return None
            return np.concatenate([np.atleast_1d(v) for v in values], axis=int(node.attrs.get("axis", 0)))
        if node.op == "Reshape":
            if len(values) < 2 or values[1] is None:
                return None
            shape = [int(d) for d in values[1].reshape(-1)]
            if not int(node.attrs.get("allowzero", 0)):  # 0 copies the input's dim there
                shape = [data.shape[i] if d == 0 else d for i, d in enumerate(shape)]
            return data.reshape(shape)
        # Squeeze / Unsqueeze: axes as an input (opset 13+) or an attribute
        axes = values[1] if len(values) > 1 else node.attrs.get("axes")
        if node.op == "Squeeze":
            return np.squeeze(data, axis=None if axes is None else tuple(int(a) for a in np.reshape(axes, -1)))
        if axes is None:
            return None
        rank = data.ndim + np.size(axes)
        for axis in sorted(int(a) % rank for a in np.reshape(axes, -1)):
            data = np.expand_dims(data, axis)
        return data
    except (ValueError, IndexError):  # not what the op can do (numpy's AxisError is both): no value known
        return None


def _rank_arithmetic(node: gs.Node) -> np.ndarray | None:
    """Integer arithmetic on a tensor's rank, as onnx's function bodies compute reduction axes
    (RMSNormalization's: Range(Size(Shape(X)) + axis, Size(Shape(X)), 1)): Size of a Shape is the
    number of dims it holds when inference knows the rank; Add, Sub, Neg and Range of such integers.
    Two float constants go to _float_arithmetic."""
    if node.op == "Size" and node.inputs:
        shape = producer(node.inputs[0])
        if shape is None or shape.op != "Shape" or (shape.domain or "") not in DEFAULT_DOMAINS or shape.inputs[0].shape is None:
            return None
        rank = len(shape.inputs[0].shape)
        start, end = int(shape.attrs.get("start", 0)), int(shape.attrs.get("end", rank))
        return np.asarray(len(range(*slice(start, end).indices(rank))), np.int64)
    if node.op not in ("Neg", "Range") and node.op not in FLOAT_ARITHMETIC:
        return None
    values = [constant_value(t) for t in node.inputs]
    if any(v is None for v in values):
        return None
    if not all(np.issubdtype(v.dtype, np.integer) for v in values):
        return _float_arithmetic(node.op, values)
    if node.op == "Neg" and len(values) == 1:
        return -values[0]
    if node.op in ("Add", "Sub") and len(values) == 2:
        return values[0] + values[1] if node.op == "Add" else values[0] - values[1]
    if node.op == "Range" and len(values) == 3 and all(v.size == 1 for v in values):
        start, limit, delta = (int(v.reshape(())) for v in values)
        if delta != 0 and len(range(start, limit, delta)) <= SMALL_CONSTANT:
            return np.arange(start, limit, delta, dtype=values[0].dtype)
    return None


FLOAT_ARITHMETIC = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Greater": np.greater,
                    "Less": np.less, "GreaterOrEqual": np.greater_equal, "LessOrEqual": np.less_equal}


def _float_arithmetic(op: str, values: list[np.ndarray]) -> np.ndarray | None:
    """Arithmetic and comparisons of two small float constants of one type, worked out as the graph
    would (numpy rounds each op to the type as ONNX Runtime does): jax2onnx writes jnp.var's divisor
    as `n - Cast(ddof)` and guards it with `n - ddof > 0`."""
    if op not in FLOAT_ARITHMETIC or len(values) != 2 \
            or any(not np.issubdtype(v.dtype, np.floating) or v.dtype != values[0].dtype for v in values):
        return None
    with np.errstate(all="ignore"):
        out = np.asarray(FLOAT_ARITHMETIC[op](values[0], values[1]))
    return out if out.size <= SMALL_CONSTANT else None


def _cast_target(node: gs.Node) -> np.dtype | None:
    """numpy dtype a Cast (its `to`) or CastLike (its second input's type) converts to; None when unknown."""
    if node.op == "Cast":
        to = node.attrs.get("to")
        return onnx.helper.tensor_dtype_to_np_dtype(int(to)) if to is not None else None
    like = node.inputs[1] if len(node.inputs) > 1 else None
    name = dtype_name(like) if like is not None else None
    return numpy_dtype(name) if name is not None else None


def constant_source(tensor: gs.Tensor) -> gs.Tensor:
    """The tensor a constant is read from: itself, or what a Cast/CastLike chain converts."""
    node = producer(tensor)
    while node is not None and node.op in ("Cast", "CastLike") and (node.domain or "") in ("", "ai.onnx"):
        tensor = node.inputs[0]
        node = producer(tensor)
    return tensor


def scalar(match: Match, name: str, what: str) -> float | None:
    """The scalar constant bound to `name`, or None when the pattern did not bind it."""
    tensor = match.get(name)
    if tensor is None:
        return None
    value = constant_value(tensor)
    if value is None:
        raise Rejected(f"{what} is not a constant (tensor '{tensor.name}')")
    if value.size != 1:
        raise Rejected(f"{what} has {value.size} elements, not 1 (tensor '{tensor.name}')")
    return float(value.reshape(()).astype(np.float64))


def build_candidate(pattern: NormPattern, match: Match, root: gs.Tensor, graph_outputs: set) -> NormCandidate:
    """Check a structural match and turn it into a candidate, or raise Rejected with the reason."""
    x = match["x"]
    shape = x.shape
    if shape is None:
        raise Rejected(f"rank of input '{x.name}' is unknown (shape inference gave no shape)")
    rank = len(shape)
    hidden = shape[-1] if rank else None
    if not isinstance(hidden, int) or hidden <= 0:
        hidden = _length_of_native_scale(pattern, match) or hidden
    if not isinstance(hidden, int) or hidden <= 0:
        raise Rejected(f"size of the last axis of '{x.name}' is not static ({hidden!r})")

    _check_not_overridable(match)  # first: such a constant reads as none to the others
    _check_constants(match)
    _check_row_lengths(match, hidden)
    epsilon = _epsilon(pattern, match)
    _check_rounded_factor(match, epsilon)
    scale_factor = 1.0
    if pattern.row_sum:  # x / sqrt(sum + eps) = x / sqrt(mean + eps / n) / sqrt(n)
        epsilon, scale_factor = epsilon / hidden, 1.0 / float(np.sqrt(hidden))
    if pattern.native:
        _check_native(match.roles["native"], rank)
    else:
        for node in match.nodes:
            if node.op in REDUCTIONS:
                _check_reduce(node, rank)
    _check_input_cast(match)
    _check_float_casts(match)
    _check_narrowed_statistics(match)
    gamma = _per_feature(match.get("gamma"), hidden, rank, "scale")
    beta = _per_feature(match.get("beta"), hidden, rank, "bias")
    if not pattern.skip:  # a Skip op's extra outputs are judged by _skip_candidate
        _check_private(match, root, graph_outputs)
    if root.shape is not None and len(root.shape) != rank:
        raise Rejected(f"output '{root.name}' has rank {len(root.shape)}, input has {rank}: a broadcast is not a norm")
    for t in (x, root):
        if dtype_name(t) not in SUPPORTED_DTYPES:
            raise Rejected(f"tensor '{t.name}' has dtype {dtype_name(t)}, not float32/float16/bfloat16")

    if pattern.skip:
        return _skip_candidate(pattern, match, root, graph_outputs, hidden, epsilon, gamma, beta)
    fused_x = x
    cast_in = match.roles.get("cast_in")
    if cast_in is not None and dtype_name(x) != dtype_name(root):
        # y's dtype differs from x's: keep the input cast outside so the fused op maps T -> T.
        fused_x = cast_in.outputs[0]
    nodes = [n for n in match.nodes if not (fused_x is not x and n is cast_in)]
    return NormCandidate(pattern, match, fused_x, root, hidden, epsilon, gamma, beta, nodes, scale_factor=scale_factor)


def _length_of_native_scale(pattern: NormPattern, match: Match) -> int | None:
    """The last axis' size where shape inference lost it (MobileViT folds patches with a Reshape to
    sizes computed at run time) but a native norm's scale tells it: the op takes a scale the
    normalised axis' shape or broadcastable to it, and a [H] scale with H > 1 broadcasts to [H] only."""
    gamma = match.get("gamma") if pattern.native else None
    shape = gamma.shape if gamma is not None else None
    if not shape or not all(isinstance(d, int) for d in shape) or any(d != 1 for d in shape[:-1]) or shape[-1] <= 1:
        return None
    return shape[-1]


def _check_constants(match: Match) -> None:
    expected = {"square_exp": (2.0, "square's exponent"), "rsqrt_exp": (-0.5, "inverse root's exponent"),
                "one": (1.0, "numerator of the inverse root"), "mean_square_exp": (2.0, "the mean's square's exponent"),
                "clamp_zero": (0.0, "the variance's lower clamp"), "finite_zero": (0.0, "the finite-mean test's zero"),
                "guard_zero": (0.0, "the constant-row guard's value")}
    for name in match.tensors:
        if name.split("#")[0] not in expected:  # a name#n variable is bound once per occurrence
            continue
        want, what = expected[name.split("#")[0]]
        value = scalar(match, name, what)
        if value is not None and value != want:
            raise Rejected(f"{what} is {value:g}, not {want:g}")


def _check_row_lengths(match: Match, hidden: int) -> None:
    """A mean written as a sum divided by a constant: the constant must be the row's length; or as a
    sum times a constant: the row length's inverse, rounded to the constant's type (within one unit
    in its last place, whichever way a tool rounded it)."""
    for name in match.tensors:
        if name.startswith("row_length#"):
            value = scalar(match, name, "the divisor of the sum")
            if value != hidden:
                raise Rejected(f"the sum over the last axis is divided by {value:g}, not by the row length {hidden}")
        if name.startswith("row_fraction#"):
            value = scalar(match, name, "the factor of the sum")
            if abs(value - 1.0 / hidden) > _machine_epsilon(constant_value(match.get(name)).dtype) / hidden:
                raise Rejected(f"the sum over the last axis is multiplied by {value:g}, not by 1 / {hidden} (the row length)")


def _machine_epsilon(dtype) -> float:
    """The relative spacing of a float type (bfloat16 and the other ml_dtypes too); 0 for any other."""
    import ml_dtypes

    try:
        return float(ml_dtypes.finfo(dtype).eps)
    except (ValueError, TypeError):
        return 0.0


# Bound tensors that flow through the fused op; every other bound tensor is a constant the checks read.
DATA_VARS = frozenset({"x", "gamma", "beta", "skip", "skip_bias"})


def _check_not_overridable(match: Match) -> None:
    for name, tensor in match.tensors.items():
        if name in DATA_VARS:
            continue
        tensor = constant_source(tensor)
        if is_overridable(tensor):
            raise Rejected(f"'{tensor.name}' is an initializer that is also a graph input: its value can be "
                           f"overridden at run time, so it is not a constant")


def _epsilon(pattern: NormPattern, match: Match) -> float:
    if pattern.native:
        default = 1e-12 if pattern.skip else 1e-5  # ONNX Runtime's defaults for Skip* and the others
        eps = float(match.roles["native"].attrs.get("epsilon", default))
    else:
        eps = scalar(match, "eps", "epsilon")
        if eps is None:
            eps = 0.0  # the graph adds no epsilon (patterns.plus_epsilon)
    if not np.isfinite(eps) or eps < 0:
        raise Rejected(f"epsilon {eps!r} is not a finite non-negative number")
    return eps


def rounded_factor_refusal(source: str, target: str, epsilon: float, root: bool) -> str | None:
    """Why a norm's factor (its inverse root, or with `root` its root) computed in `source` and cast
    to `target` before it meets x is more than a rounding, or None where it is no more. Epsilon bounds
    the factor: the inverse root is at most 1 / sqrt(epsilon), which must not overflow the type; the
    root at least sqrt(epsilon), which must not fall below its smallest normal value (there the
    cast keeps few bits, and at zero x / 0 is inf where the norm is finite). The other end is x's
    own range: an inverse root of a half row's spread is at least 1 / 65504."""
    if target in HOLDS_EVERY_VALUE_OF.get(source, ()):
        return None  # a widening cast rounds nothing
    import ml_dtypes  # (an onnx dependency) its finfo knows bfloat16, numpy's does not

    info = ml_dtypes.finfo(numpy_dtype(target))
    if root:
        bound = float(info.tiny) ** 2
        if epsilon < bound:
            return (f"root cast to {target}: with epsilon {epsilon:g} (below {bound:.3g}) it can fall under {target}'s "
                    f"smallest normal value {float(info.tiny):.3g}, losing more than a rounding")
        return None
    bound = 1.0 / float(info.max) ** 2
    if epsilon < bound:
        return (f"inverse root cast to {target}: with epsilon {epsilon:g} (below {bound:.3g}) it can pass {target}'s "
                f"largest value {float(info.max):.6g} and become inf")
    return None


def _check_rounded_factor(match: Match, epsilon: float) -> None:
    """A factor cast back to x's type before the product (patterns.rounded_factor) must stay a rounding."""
    cast = match.roles.get("cast_factor")
    if cast is None:
        return
    source, target = dtype_name(cast.inputs[0]), FLOAT_TYPES.get(int(cast.attrs.get("to", 0)))
    if target is None:
        return  # not a float type: _check_float_casts names it
    made_by = producer(cast.inputs[0])
    root = made_by is not None and made_by.op in ("Sqrt", "ReduceL2")
    reason = rounded_factor_refusal(source, target, epsilon, root)
    if reason:
        raise Rejected(f"cast '{cast.name}': {reason}")


def near_miss_refusal(pattern: NormPattern, match: Match) -> str:
    """Why a near miss (`pattern.refusal`) is left as written: a reduction of it that is not over the
    last axis is told first (F.normalize over the channels is no norm of the last axis at all)."""
    shape = match["x"].shape
    if shape is not None:
        try:
            for node in match.nodes:
                if node.op in REDUCTIONS:
                    _check_reduce(node, len(shape))
        except Rejected as exc:
            return str(exc)
    return pattern.refusal


def _last_axis(axes, rank: int, where: str) -> None:
    axes = [int(a) for a in np.asarray(axes).ravel()]
    if len(axes) != 1:
        raise Rejected(f"{where} reduces over axes {axes}, not only the last axis")
    if axes[0] not in (-1, rank - 1):
        raise Rejected(f"{where} reduces over axis {axes[0]}, not the last axis of rank {rank}")


# a sum (of squares) is a mean once divided by the row length; an L2 norm's length is its root
AVERAGING = ("ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "GlobalAveragePool")
REDUCTIONS = AVERAGING + ("ReduceMin", "ReduceMax")


def _check_reduce(node: gs.Node, rank: int) -> None:
    where = f"{node.op} '{node.name}'"
    if node.op == "GlobalAveragePool":  # averages every axis after the first two
        if rank != 3:
            raise Rejected(f"{where} on a rank-{rank} input averages axes {list(range(2, rank))}, not only the last axis")
        return
    if int(node.attrs.get("keepdims", 1)) != 1:
        raise Rejected(f"{where} has keepdims=0")
    inputs = present_inputs(node)
    if len(inputs) > 1:
        axes = constant_value(inputs[1])
        if axes is None:
            raise Rejected(f"{where} takes its axes from a non-constant tensor '{inputs[1].name}'")
    else:
        axes = node.attrs.get("axes")
        if axes is None:
            raise Rejected(f"{where} has no axes: it reduces over every axis")
    _last_axis(axes, rank, where)


def is_last_axis_mean(node: gs.Node) -> bool:
    """A ReduceMean over the last axis of an input of known rank: the heart of every spelled-out norm."""
    if node.op != "ReduceMean" or (node.domain or "") not in ("", "ai.onnx") or not node.inputs:
        return False
    shape = node.inputs[0].shape
    if shape is None:
        return False
    try:
        _check_reduce(node, len(shape))
    except Rejected:
        return False
    return True


def _check_native(node: gs.Node, rank: int) -> None:
    _last_axis([node.attrs.get("axis", -1)], rank, f"{node.op} '{node.name}'")


def _check_input_cast(match: Match) -> None:
    """A cast absorbed on the input must widen to float32 (statistics in fp32, as the op does)."""
    cast = match.roles.get("cast_in")
    if cast is not None and int(cast.attrs.get("to", 0)) != onnx.TensorProto.FLOAT:
        raise Rejected(f"input cast '{cast.name}' casts to {_type_name(cast.attrs.get('to'))}, not float32")


def _type_name(code) -> str:
    """ONNX's name for a tensor type code, as a reader knows it (10 -> "float16")."""
    try:
        return onnx.TensorProto.DataType.Name(int(code)).lower()
    except (TypeError, ValueError):
        return f"type {code}"


# the types a cast may go to without losing a value (fp16 and bf16 each lose some of the other's)
HOLDS_EVERY_VALUE_OF = {"float16": ("float16", "float32", "float64"), "bfloat16": ("bfloat16", "float32", "float64"),
                        "float32": ("float32", "float64"), "float64": ("float64",)}


def _check_float_casts(match: Match) -> None:
    """Casts inside a norm change only the float precision (statistics taken in float32 and cast back
    to the half type, say); a cast to an integer or bool type would change the values themselves,
    and one that narrows what a mean or sum reads averages in less precision than the fused op."""
    inside = {id(n) for n in match.nodes}
    for node in match.nodes:
        if node.op == "Cast" and FLOAT_TYPES.get(int(node.attrs.get("to", 0))) is None:
            raise Rejected(f"cast '{node.name}' inside the norm casts to {_type_name(node.attrs.get('to'))}, not a float type")
        if node.op in AVERAGING:
            cast = producer(node.inputs[0])
            if cast is None or cast.op != "Cast" or id(cast) not in inside:
                continue
            source, target = dtype_name(cast.inputs[0]), FLOAT_TYPES.get(int(cast.attrs.get("to", 0)))
            if target not in HOLDS_EVERY_VALUE_OF.get(source, ()):
                raise Rejected(f"cast '{cast.name}' narrows {source} to {target} before {node.op} '{node.name}'")


def _check_narrowed_statistics(match: Match) -> None:
    """A statistic (a mean, variance, root or its inverse: one value per row) cast to a type that
    does not hold every value of x's is rounded, and can overflow, where the fused op, computing in
    x's type or wider, does neither: an fp32 norm whose mean square goes through fp16 gives 0 for
    rows past fp16's range, and bf16 moves it by 0.6%. (Cast back to x's own half type, as
    `_check_rounded_factor` allows, it is x's rounding.)"""
    x_type = dtype_name(match["x"])
    held = HOLDS_EVERY_VALUE_OF.get(x_type)
    if held is None:
        return
    per_row: set[int] = set()  # ids of the tensors holding one value per row
    changed = True
    while changed:  # the nodes need not be in order: until nothing more is found
        changed = False
        for node in match.nodes:
            if not node.outputs or id(node.outputs[0]) in per_row:
                continue
            computed = [t for t in node.inputs if not isinstance(t, gs.Constant) and constant_value(t) is None]
            if node.op in AVERAGING or (computed and all(id(t) in per_row for t in computed)):
                per_row.update(id(t) for t in node.outputs)
                changed = True
    for node in match.nodes:
        if node.op == "Cast" and node.inputs and id(node.inputs[0]) in per_row:
            target = FLOAT_TYPES.get(int(node.attrs.get("to", 0)))
            if target is not None and target not in held:
                raise Rejected(f"cast '{node.name}' narrows a statistic to {target}, which does not hold every "
                               f"{x_type} value of x: the norm rounds it there, and can overflow, where the fused "
                               "op would not")


def _per_feature(tensor: gs.Tensor | None, hidden: int, rank: int, what: str) -> gs.Tensor | None:
    """Scale and bias must hold exactly one value per feature of the last axis."""
    if tensor is None or tensor.name == "":  # an omitted optional input
        return None
    shape = tensor.shape
    if shape is None or any(not isinstance(d, int) for d in shape):
        raise Rejected(f"{what} '{tensor.name}' has unknown shape {shape}")
    if len(shape) == 0 or len(shape) > rank or shape[-1] != hidden or any(d != 1 for d in shape[:-1]):
        raise Rejected(f"{what} '{tensor.name}' has shape {list(shape)}, not one value per feature ({hidden})")
    if dtype_name(tensor) not in SUPPORTED_DTYPES:
        raise Rejected(f"{what} '{tensor.name}' has dtype {dtype_name(tensor)}")
    return tensor


def _check_private(match: Match, root: gs.Tensor, graph_outputs: set) -> None:
    """Every value computed inside the subgraph, but its result, must be used only inside it."""
    inside = {id(n) for n in match.nodes}
    # tensors the fused op reads: a node making one stays in the graph after the fusion
    data = {id(match.get(name)) for name in DATA_VARS if match.get(name) is not None}
    for node in match.nodes:
        for out in node.outputs:
            if out is root:
                continue
            if out.name in graph_outputs:
                raise Rejected(f"intermediate '{out.name}' is a graph output")
            for consumer in out.outputs:
                if id(consumer) not in inside and not _reads_type_for_the_norm(consumer, out, inside, graph_outputs,
                                                                                data):
                    raise Rejected(f"intermediate '{out.name}' is also used by node '{consumer.name}'")


def _reads_type_for_the_norm(consumer: gs.Node, tensor: gs.Tensor, inside: set, graph_outputs: set,
                             data: set = frozenset()) -> bool:
    """CastLike(c, tensor) reads only tensor's type. When its result feeds nothing but the norm (Flax
    writes epsilon as CastLike(eps, x)), it is a constant of the norm and goes with it; not when the
    fused op reads that result (`data`: ids of its inputs), as a scale written CastLike(w, normed):
    that CastLike stays and would read a value the fusion removes."""
    if consumer.op != "CastLike" or len(consumer.inputs) != 2 or consumer.inputs[1] is not tensor:
        return False
    if constant_value(consumer.inputs[0]) is None:
        return False
    result = consumer.outputs[0]
    return result.name not in graph_outputs and id(result) not in data and all(id(c) in inside for c in result.outputs)


def _skip_candidate(pattern, match, root, graph_outputs, hidden, epsilon, gamma, beta) -> NormCandidate:
    """Skip[Simplified]LayerNormalization(x, skip, gamma[, beta]): an AddLayerNorm/AddRMSNorm already."""
    node = match.roles["native"]
    x, skip = match["x"], match["skip"]
    skip_bias = _per_feature(match.get("skip_bias"), hidden, len(x.shape), "input bias")
    if skip.shape is None or list(skip.shape) != list(x.shape) or dtype_name(skip) != dtype_name(x):
        raise Rejected(f"{node.op} '{node.name}' broadcasts its skip input ({skip.shape} vs {x.shape})")
    if any(d is None for d in x.shape):  # unknown on both sides: the sizes may still differ at run time
        raise Rejected(f"{node.op} '{node.name}': input and skip shapes cannot be shown equal ({x.shape})")
    for i in (1, 2):
        if len(node.outputs) > i and node.outputs[i].name and (node.outputs[i].outputs or node.outputs[i].name in graph_outputs):
            raise Rejected(f"{node.op} '{node.name}' output {i} (mean / inverse std) is used")
    total = node.outputs[3] if len(node.outputs) > 3 and node.outputs[3].name else None
    candidate = NormCandidate(pattern, match, x, root, hidden, epsilon, gamma, beta, [node], residual=(x, skip, node))
    candidate.sum_tensor = total
    candidate.skip_bias = skip_bias  # added to x in front of the fused op
    candidate.expose_sum = total is not None and (bool(total.outputs) or total.name in graph_outputs)
    return candidate
