"""Numerical proof of a candidate: the matched subgraph, run on random inputs, equals the op.

The subgraph is copied into a tiny model whose inputs are x (or the residual Add's operands),
gamma and beta; scale and bias get random values, so no weight is ever read. It is evaluated by
onnx's reference evaluator (every dtype, no session set-up) and held to the normops reference.
Two input scales are used: ordinary values, and values so small that epsilon dominates, so that
an epsilon in the wrong place cannot pass.

A half-precision subgraph is proven in float32: its inputs, constants and casts to fp16/bf16 are
widened, and the inputs hold values the half type represents. What is proven is the arithmetic
(axis, exponents, epsilon's place, scale and bias), which widening keeps; the half type's rounding
is not part of it, and the fused op computes its statistics in fp32 anyway. Evaluated in the half
type itself, onnx's reference evaluator accumulates the mean in that type (bf16 LayerNormalization
at hidden 1600 is off by more than 1.0), which would reject real norms of wide rows.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper
from onnx.reference import ReferenceEvaluator

from normops import GRAPH, numpy_dtype

from .checks import ONNX_TYPES, NormCandidate, Rejected, constant_value, dtype_name
from .evaluate import FUSED_OPS, reference_norm

SMALLEST_NORMAL = {"float32": float(np.finfo(np.float32).tiny), "float16": float(np.finfo(np.float16).tiny),
                   "bfloat16": float(np.finfo(np.float32).tiny)}  # bfloat16 has float32's exponent range


def prove(candidate: NormCandidate, opset: int, seed: int = 0) -> None:
    """Raise Rejected when the subgraph differs from the fused op it would become."""
    model, feeds_spec = _subgraph_model(candidate, opset)
    widened = _widen_half_types(model)
    if widened:
        _exact_row_fractions(model, candidate)
    _statistics_in_float32(model)
    tolerance = GRAPH["float32" if widened else dtype_name(candidate.output)]
    evaluator = ReferenceEvaluator(model, new_ops=FUSED_OPS)  # native ORT ops are proven too
    rng = np.random.default_rng(seed)
    shape = _proof_shape(candidate)
    for scale in (1.0, _small_scale(candidate)):
        feeds = {}
        for role, tensor in feeds_spec:
            dtype = numpy_dtype(dtype_name(tensor))
            if role in ("x", "a", "b"):
                values = (rng.standard_normal(shape) * scale + 0.5 * scale)
            else:
                values = rng.uniform(0.5, 1.5, tensor.shape) if role == "gamma" else rng.uniform(-0.5, 0.5, tensor.shape)
            values = values.astype(dtype)  # values the graph's own type holds
            feeds[tensor.name] = values.astype(np.float32) if dtype_name(tensor) in HALF_TYPES else values
        actual = evaluator.run(None, feeds)[0]
        expected = _reference(candidate, feeds, feeds_spec)
        if not tolerance.passes(actual, expected):  # y is O(1) at any input scale
            err = np.abs(actual.astype(np.float64) - expected)
            worst = float(np.nanmax(err / np.maximum(np.abs(expected), 1e-12)))
            raise Rejected(f"numerical proof failed at input scale {scale:.3g}: max relative error {worst:.3g}")


HALF_TYPES = ("float16", "bfloat16")
_HALF_ELEMS = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def _widen_half_types(model: onnx.ModelProto) -> bool:
    """Turn every fp16/bf16 of the proof model into float32, in place: inputs, output, constants
    and the dtype attributes of its nodes (Cast's `to`, Constant's value, ...). True if any was."""
    widened = False

    def widen_tensor(tensor: onnx.TensorProto) -> None:
        nonlocal widened
        if tensor.data_type in _HALF_ELEMS:
            tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor).astype(np.float32), tensor.name))
            widened = True

    for value in list(model.graph.input) + list(model.graph.output):
        if value.type.tensor_type.elem_type in _HALF_ELEMS:
            value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
            widened = True
    for tensor in model.graph.initializer:
        widen_tensor(tensor)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.INT and attr.name in ("to", "dtype") and attr.i in _HALF_ELEMS:
                attr.i = onnx.TensorProto.FLOAT
                widened = True
            elif attr.type == onnx.AttributeProto.TENSOR:
                widen_tensor(attr.t)
    return widened


def _statistics_in_float32(model: onnx.ModelProto) -> None:
    """A native norm's stash_type 0 (statistics in x's type) as 1 (in float32), in place: the proof
    model is in float32 by now, where the two are one computation, and onnx's reference evaluator
    has no kernel for 0. (In fp16 or bf16, 0 is the half type's rounding, which widening leaves out.)"""
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "RMSNormalization") and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "stash_type" and attr.i == 0:
                    attr.i = 1


def _exact_row_fractions(model: onnx.ModelProto, candidate: NormCandidate) -> None:
    """A mean written as sum * (1 / n) in a half type: the checks accept the factor as 1 / n rounded to
    that type, so widened it becomes 1 / n as float32 holds it (a factor in float32 or float64 is 1 / n
    in its own type). Kept at its half-type rounding (1/3 is
    0.33325 in fp16), the proof measured that rounding, which E[x^2] - E[x]^2 amplifies on short rows,
    instead of the arithmetic."""
    fractions = {t.name for name, t in candidate.match.tensors.items() if name.startswith("row_fraction#")}
    for tensor in model.graph.initializer:
        if tensor.name in fractions:
            # in the type it has now: float32 for a widened half type, float64 (a variance taken in
            # float64, say) as it was, so the Mul still reads one type
            value = onnx.numpy_helper.to_array(tensor)
            tensor.CopyFrom(onnx.numpy_helper.from_array(np.full(value.shape, 1.0 / candidate.hidden, value.dtype),
                                                         tensor.name))


def _small_scale(candidate: NormCandidate) -> float:
    """Inputs this small make epsilon a large part of the variance, so a misplaced epsilon shows;
    but not so small that their squares underflow in the dtype the statistics are computed in
    (an fp16 square of 3e-6 is 0, and then the graph itself divides by zero)."""
    dtypes = {dtype_name(t) for n in candidate.nodes for t in n.outputs} | {dtype_name(candidate.x)}
    tiny = max(SMALLEST_NORMAL[d] for d in dtypes if d in SMALLEST_NORMAL)
    return max(3.0 * np.sqrt(max(candidate.epsilon, 1e-12)), float(np.sqrt(tiny)))


def _proof_shape(candidate: NormCandidate) -> tuple[int, ...]:
    rank = len(candidate.x.shape)
    leading = (2, 3, 2, 2, 2)[: max(rank - 1, 0)]
    return tuple(leading) + (candidate.hidden,)


def _reference(candidate: NormCandidate, feeds: dict, feeds_spec) -> np.ndarray:
    by_role = {role: feeds[t.name] for role, t in feeds_spec}
    x, residual = (by_role["a"], by_role["b"]) if "a" in by_role else (by_role["x"], None)
    gamma = by_role.get("gamma")
    if candidate.scale_factor != 1.0:  # an L2 norm: the RMSNorm whose scale is gamma / sqrt(n)
        gamma = (np.ones(candidate.hidden) if gamma is None else gamma.astype(np.float64)) * candidate.scale_factor
    return reference_norm(candidate.centered, x, residual, gamma, by_role.get("beta"),
                          by_role.get("skip_bias"), candidate.epsilon)[0]


def _subgraph_model(candidate: NormCandidate, opset: int):
    fed = [("gamma", candidate.gamma), ("beta", candidate.beta), ("skip_bias", candidate.skip_bias)]
    nodes = list(candidate.nodes)
    if candidate.residual is not None:
        a, b, add = candidate.residual
        fed = [("a", a), ("b", b)] + fed
        nodes = nodes if any(n is add for n in nodes) else [add] + nodes
    else:
        fed = [("x", candidate.x)] + fed
    fed = [(role, t) for role, t in fed if t is not None]
    fed_names = {t.name for _, t in fed}
    produced = {out.name for n in nodes for out in n.outputs}

    inputs, initializers = [], []
    shape = _proof_shape(candidate)
    for role, tensor in fed:
        dims = shape if role in ("x", "a", "b") else list(tensor.shape)
        inputs.append(helper.make_tensor_value_info(tensor.name, ONNX_TYPES[dtype_name(tensor)], dims))
    seen = set()
    for node in nodes:
        for t in node.inputs:
            if t.name in fed_names or t.name in produced or t.name in seen or t.name == "":
                continue
            value = constant_value(t)
            if value is None:
                raise Rejected(f"subgraph reads '{t.name}', which is neither an input of the norm nor a small constant")
            initializers.append(onnx.numpy_helper.from_array(np.asarray(value), t.name))
            seen.add(t.name)
    onnx_nodes = [
        helper.make_node(n.op, [t.name for t in n.inputs], [t.name for t in n.outputs], name=n.name,
                         domain=n.domain or "", **{k: _attr(v) for k, v in n.attrs.items()})
        for n in _toposorted(nodes)
    ]
    if candidate.residual is not None:  # a Skip op's unused optional outputs need not be produced
        for n in onnx_nodes:
            if n.domain == "com.microsoft":
                del n.output[1:]
    output = helper.make_tensor_value_info(candidate.output.name, ONNX_TYPES[dtype_name(candidate.output)], None)
    graph = helper.make_graph(onnx_nodes, "proof", inputs, [output], initializer=initializers)
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets), fed


def _attr(value):
    if hasattr(value, "values"):  # a gs.Constant attribute
        return onnx.numpy_helper.from_array(np.asarray(value.values))
    return value


def _toposorted(nodes):
    produced_by = {id(out): n for n in nodes for out in n.outputs}
    order, done = [], set()

    def visit(node):
        if id(node) in done:
            return
        done.add(id(node))
        for t in node.inputs:
            parent = produced_by.get(id(t))
            if parent is not None:
                visit(parent)
        order.append(node)

    for n in nodes:
        visit(n)
    return order
