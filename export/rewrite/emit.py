"""Replacement nodes, one emitter per target.

- `tensorrt`: normfuse ops (normops contract) carrying what TensorRT's ONNX parser needs to find
  our plugins: op_type = plugin name, plugin_namespace and plugin_version attributes.
  LayerNorm always gets a beta input (zeros when the model has none): plugins take no optionals.
- `onnxruntime`: ONNX Runtime's contrib ops (SimplifiedLayerNormalization,
  Skip[Simplified]LayerNormalization) and the standard LayerNormalization.
- `onnx`: standard LayerNormalization (opset 17) and RMSNormalization (opset 23); the residual
  Add stays a separate node since standard ONNX has no fused form of it (the rewriter does not
  attach residuals for this target).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from normops import DOMAIN, PLUGIN_NAMESPACE, PLUGIN_VERSION, numpy_dtype, op_for

from .checks import ONNX_TYPES, NormCandidate, dtype_name, is_external, is_overridable
from .scopes import walk_graphs

TARGETS = ("tensorrt", "onnxruntime", "onnx")
MS_DOMAIN = "com.microsoft"


class UniqueNames:
    """Fresh tensor and node names, unique across the whole model (the main graph, every
    control-flow body, and names an earlier rewrite wrote): a fused op inside a Loop body must
    not reuse a name of the enclosing graph."""

    def __init__(self, taken=()):
        self.taken = set(taken)

    def __call__(self, stem: str) -> str:
        name, n = stem, 1
        while name in self.taken:
            n += 1
            name = f"{stem}_{n}"
        self.taken.add(name)
        return name

    @classmethod
    def of(cls, graph: gs.Graph) -> "UniqueNames":
        """Every tensor and node name of `graph` and of the graphs nested in its nodes' attributes."""
        taken: set = set()
        for g in walk_graphs(graph):
            for node in g.nodes:
                taken.add(node.name)
                taken.update(t.name for t in list(node.inputs) + list(node.outputs))
            taken.update(t.name for t in list(g.inputs) + list(g.outputs))
        taken.discard("")
        return cls(taken)


def emitted_op(candidate: NormCandidate, target: str) -> tuple[str, str]:
    """(domain, op_type) the target replaces this candidate with."""
    residual = candidate.residual is not None
    if target == "tensorrt":
        return DOMAIN, op_for(candidate.centered, residual).name
    if target == "onnxruntime":
        if residual:
            return MS_DOMAIN, "SkipLayerNormalization" if candidate.centered else "SkipSimplifiedLayerNormalization"
        return "", "LayerNormalization" if candidate.centered else "SimplifiedLayerNormalization"
    return "", "LayerNormalization" if candidate.centered else "RMSNormalization"


def required_opset(candidate: NormCandidate, target: str) -> int:
    """The default-domain opset the emitted op needs: LayerNormalization came in 17 and
    RMSNormalization in 23; the plugin ops live in their own domain and need none."""
    if target == "tensorrt":
        return 1
    if target == "onnx" and not candidate.centered:
        return 23
    return 17 if candidate.centered else 1


def emit(graph: gs.Graph, candidate: NormCandidate, target: str, names: UniqueNames | None = None) -> gs.Node:
    """Disconnect the matched nodes and wire one fused node in their place (in `graph`, the graph
    that holds them: the main graph or a control-flow body). `names` hands out new names."""
    names = names or UniqueNames.of(graph)
    domain, op_type = emitted_op(candidate, target)
    y = candidate.output
    # The fused op maps x's dtype to itself; when the subgraph ended in another dtype (fp32
    # residual stream, fp16 scale), a Cast after the op gives y its original dtype.
    op_dtype = dtype_name(candidate.x)
    param_dtype = _parameter_dtype(candidate, op_dtype, target)
    gamma = _per_feature_vector(graph, candidate.gamma, candidate.hidden, param_dtype, fill=candidate.scale_factor,
                                name=f"{y.name}_gamma", names=names)
    if candidate.gamma is not None and candidate.scale_factor != 1.0:
        gamma = _times(graph, gamma, candidate.scale_factor, param_dtype, names)
    gamma = _cast(graph, gamma, param_dtype, names)
    beta = candidate.beta
    needs_beta = candidate.centered and target == "tensorrt"
    if beta is not None or needs_beta:
        beta = _per_feature_vector(graph, beta, candidate.hidden, param_dtype, fill=0.0, name=f"{y.name}_beta", names=names)
        beta = _cast(graph, beta, param_dtype, names)

    for node in candidate.nodes:
        node.outputs.clear()
    y.inputs.clear()
    if dtype_name(y) != op_dtype:
        y_original = y
        y = gs.Variable(names(f"{y_original.name}_{op_dtype}"), dtype=numpy_dtype(op_dtype), shape=y_original.shape)
        to = ONNX_TYPES[dtype_name(y_original)]
        graph.nodes.append(gs.Node("Cast", name=names(f"{y.name}_cast"), attrs={"to": to}, inputs=[y], outputs=[y_original]))

    reshape = candidate.through_reshape if candidate.residual is not None else None
    if reshape is not None:
        # the op works in the sum's shape; y takes the norm input's shape through the same Reshape
        y_rows = gs.Variable(names(f"{y.name}_rows"), dtype=y.dtype, shape=candidate.residual[2].outputs[0].shape)
        graph.nodes.append(gs.Node("Reshape", name=names(f"{reshape.name}_after_norm"), attrs=dict(reshape.attrs),
                                   inputs=[y_rows, reshape.inputs[1]], outputs=[y]))
        y = y_rows

    if candidate.residual is not None:
        a, b, add = candidate.residual
        if candidate.skip_bias is not None:  # ORT's Skip op with an input bias: (x + bias) + skip
            biased = gs.Variable(names(f"{a.name}_plus_bias"), dtype=a.dtype, shape=a.shape)
            graph.nodes.append(gs.Node("Add", name=names(f"{add.name}_input_bias"), inputs=[a, candidate.skip_bias], outputs=[biased]))
            a = biased
        add.outputs.clear()
        total = (candidate.sum_tensor or candidate.x) if candidate.expose_sum else gs.Variable(names(f"{y.name}_sum"), dtype=candidate.x.dtype, shape=candidate.x.shape)
        total.inputs.clear()
        if target == "onnxruntime" and len(add.inputs[0].shape or ()) not in SKIP_OP_RANKS:
            a, b, y, total = _rows_for_skip_op(graph, candidate, a, b, y, total, names)
        inputs = [a, b, gamma]
        # ONNX Runtime's Skip ops: (y, mean, inv_std, sum), the statistics left unnamed
        outputs = [y, gs.Variable.empty(), gs.Variable.empty(), total] if target == "onnxruntime" else [y, total]
    else:
        inputs, outputs = [candidate.x, gamma], [y]
    if beta is not None:
        inputs.append(beta)

    attrs = {"epsilon": float(candidate.epsilon)}
    if target == "tensorrt":
        attrs.update(plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION)
    elif not (target == "onnxruntime" and candidate.residual is not None):
        attrs.update(axis=-1, stash_type=1)
    node = gs.Node(op_type, name=names(f"normfuse_{op_type}"), attrs=attrs, inputs=inputs, outputs=outputs, domain=domain)
    graph.nodes.append(node)
    return node


SKIP_OP_RANKS = (2, 3)  # ONNX Runtime's Skip*LayerNormalization refuse other ranks at run time


def _rows_for_skip_op(graph: gs.Graph, candidate: NormCandidate, a, b, y, total, names: UniqueNames):
    """Operands and results of an ONNX Runtime Skip op over tensors of a rank it refuses (timm's
    Swin normalises [batch, height, width, channels]): the operands flattened to [rows, hidden]
    and the results put back in the operands' shape, by Reshapes, which ONNX Runtime runs
    without copying. Returns (a, b, y, total) for the op."""
    hidden = candidate.hidden
    rows = gs.Constant(names(f"{y.name}_rows_shape"), np.array([-1, hidden], dtype=np.int64))
    shape = gs.Variable(names(f"{a.name}_shape"), dtype=np.int64, shape=[len(a.shape)])
    graph.nodes.append(gs.Node("Shape", name=names(f"{a.name}_shape"), inputs=[a], outputs=[shape]))

    def flat(tensor):
        out = gs.Variable(names(f"{tensor.name}_rows"), dtype=tensor.dtype, shape=[None, hidden])
        graph.nodes.append(gs.Node("Reshape", name=names(f"{tensor.name}_rows"), inputs=[tensor, rows], outputs=[out]))
        return out

    def unflat(tensor):
        out = gs.Variable(names(f"{tensor.name}_rows"), dtype=tensor.dtype, shape=[None, hidden])
        graph.nodes.append(gs.Node("Reshape", name=names(f"{tensor.name}_unrows"), inputs=[out, shape], outputs=[tensor]))
        return out

    return flat(a), flat(b), unflat(y), unflat(total) if candidate.expose_sum else \
        gs.Variable(names(f"{total.name}_rows"), dtype=total.dtype, shape=[None, hidden])


def _parameter_dtype(candidate: NormCandidate, op_dtype: str, target: str) -> str:
    """The one dtype of gamma and beta in the fused op. ORT and ONNX ops want x's dtype. The
    plugins take x's dtype or float32, the same for both (their kernels are specialised on one
    parameter dtype): float32 when either parameter already is, since widening is exact."""
    present = [t for t in (candidate.gamma, candidate.beta) if t is not None]
    if target == "tensorrt" and any(dtype_name(t) == "float32" for t in present):
        return "float32"
    return op_dtype


def _per_feature_vector(graph: gs.Graph, tensor, hidden: int, dtype: str, fill: float, name: str, names: UniqueNames):
    """A 1-D [hidden] tensor: the given one (reshaped if it had leading 1s: in memory, or by a Reshape
    node where its bytes are external or a caller may override it) or a constant fill."""
    if tensor is None:
        return gs.Constant(names(name), np.full((hidden,), fill, dtype=numpy_dtype(dtype)))
    if list(tensor.shape) == [hidden]:
        return tensor
    if isinstance(tensor, gs.Constant) and not is_external(tensor) and not is_overridable(tensor):
        # in memory already (a few values per feature): reshaped here rather than by a Reshape node
        return gs.Constant(names(f"{tensor.name}_flat"), np.asarray(tensor.values).reshape(hidden))
    flat = gs.Variable(names(f"{tensor.name}_flat"), dtype=tensor.dtype, shape=[hidden])
    shape = gs.Constant(names(f"{tensor.name}_flat_shape"), np.array([hidden], dtype=np.int64))
    graph.nodes.append(gs.Node("Reshape", inputs=[tensor, shape], outputs=[flat]))
    return flat


def _times(graph: gs.Graph, tensor, factor: float, dtype: str, names: UniqueNames):
    """`tensor` times `factor` in `dtype`: a new constant when its values are in memory (the product
    taken in float64 and rounded once), else a Mul in the graph (TensorRT and ONNX Runtime fold it
    at build time), so external weights stay unread and one a caller may override stays read."""
    if isinstance(tensor, gs.Constant) and not is_external(tensor) and not is_overridable(tensor):
        values = np.asarray(tensor.values).astype(np.float64) * factor
        return gs.Constant(names(f"{tensor.name}_scaled"), values.astype(numpy_dtype(dtype)))
    tensor = _cast(graph, tensor, dtype, names)
    out = gs.Variable(names(f"{tensor.name}_scaled"), dtype=numpy_dtype(dtype), shape=tensor.shape)
    graph.nodes.append(gs.Node("Mul", name=names(f"{tensor.name}_scaled"),
                               inputs=[tensor, gs.Constant(names(f"{tensor.name}_factor"), np.array(factor, numpy_dtype(dtype)))],
                               outputs=[out]))
    return out


def _cast(graph: gs.Graph, tensor, dtype: str, names: UniqueNames):
    if dtype_name(tensor) == dtype:
        return tensor
    out = gs.Variable(names(f"{tensor.name}_as_{dtype}"), dtype=numpy_dtype(dtype), shape=tensor.shape)
    graph.nodes.append(gs.Node("Cast", attrs={"to": ONNX_TYPES[dtype]}, inputs=[tensor], outputs=[out]))
    return out
