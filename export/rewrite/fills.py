"""A norm's scale or bias written as a fill of its input's shape, made a per-feature constant.

torch's exporter writes nn.RMSNorm(elementwise_affine=False) (F.rms_norm without a weight) at
opset 23 as RMSNormalization(x, ConstantOfShape(Shape(x))), or with static shapes
ConstantOfShape(<x's shape as a constant>): a scale of ones with x's whole shape. It gives every
element the same value, so a constant holding that value once per feature of the last axis is the
same scale, and one the fused ops take. Only a fill that broadcasts to its norm's input without
growing it, read by nothing but native norms over the last axis as their scale or bias, is
replaced; the fill's nodes go with the graph's clean-up once nothing reads them.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .emit import UniqueNames
from .checks import constant_value
from .matcher import DEFAULT_DOMAINS, producer

NATIVE_NORMS = ("LayerNormalization", "RMSNormalization")


def per_feature_fills(graph: gs.Graph, graph_outputs: set, names: UniqueNames, scope: str = "main") -> list[str]:
    """Replace each such fill with a constant of shape [hidden]; returns the notes for the report."""
    replaced = []
    for node in list(graph.nodes):
        if node.op != "ConstantOfShape" or (node.domain or "") not in DEFAULT_DOMAINS or len(node.outputs) != 1 \
                or not node.inputs:
            continue
        fill, value = node.outputs[0], _fill_value(node)
        norms = list(fill.outputs)
        if value is None or fill.name in graph_outputs or not norms \
                or not all(_reads_as_scale_or_bias(norm, fill) and _fits(node.inputs[0], norm.inputs[0]) for norm in norms):
            continue
        hidden = {norm.inputs[0].shape[-1] for norm in norms}
        if len(hidden) != 1:
            continue
        constant = gs.Constant(names(f"{fill.name}_per_feature"), np.full((hidden.pop(),), value, dtype=value.dtype))
        for norm in norms:
            for i, t in enumerate(norm.inputs):
                if t is fill:
                    norm.inputs[i] = constant
        replaced.append(f"'{fill.name}' (value {value.item():g})")
    where = "" if scope == "main" else f" in {scope}"
    return [f"replaced the ConstantOfShape scale/bias fill(s) {', '.join(replaced)} of native norms{where} "
            "with per-feature constants"] if replaced else []


def _fits(shape: gs.Tensor, x: gs.Tensor) -> bool:
    """Whether a fill of `shape` multiplies (or is added to) x's normalised values element by element
    without adding axes or growing any: `shape` is x's whole shape (Shape(x), or the constant
    an exporter folded it into), or a constant that broadcasts to it."""
    if x.shape is None or not x.shape or not isinstance(x.shape[-1], int) or x.shape[-1] <= 0:
        return False
    if _whole_shape_of(producer(shape)) is x:
        return True
    dims = constant_value(shape)
    if dims is None or dims.ndim != 1 or len(dims) > len(x.shape):
        return False
    return all(d == 1 or (isinstance(xd, int) and d == xd) for d, xd in zip(dims[::-1].tolist(), x.shape[::-1]))


def _whole_shape_of(shape_node: gs.Node | None) -> gs.Tensor | None:
    """The tensor whose whole shape `shape_node` gives (Shape without a start or end), else None."""
    if shape_node is None or shape_node.op != "Shape" or (shape_node.domain or "") not in DEFAULT_DOMAINS:
        return None
    if int(shape_node.attrs.get("start", 0)) != 0 or "end" in shape_node.attrs:
        return None
    return shape_node.inputs[0]


def _fill_value(node: gs.Node) -> np.ndarray | None:
    """ConstantOfShape's one value as a 0-d array of its dtype (ONNX's default: float32 zero)."""
    value = node.attrs.get("value")
    array = np.zeros((), np.float32) if value is None else np.asarray(getattr(value, "values", value))
    if array.size != 1 or array.dtype.name not in ("float16", "bfloat16", "float32", "float64"):
        return None
    return array.reshape(())


def _reads_as_scale_or_bias(norm: gs.Node, fill: gs.Tensor) -> bool:
    """A native norm over the last axis of its input that reads `fill` as its scale or bias only."""
    if norm.op not in NATIVE_NORMS or (norm.domain or "") not in DEFAULT_DOMAINS or not norm.inputs:
        return False
    x = norm.inputs[0]
    if x is fill or x.shape is None:
        return False
    axis = int(norm.attrs.get("axis", -1))
    return axis in (-1, len(x.shape) - 1) and any(t is fill for t in norm.inputs[1:3]) and \
        all(t is not fill for t in norm.inputs[3:])
