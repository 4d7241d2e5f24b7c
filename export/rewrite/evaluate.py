"""Run a rewritten graph on onnx's reference evaluator, fused ops included.

The fused ops of every target (normfuse's, ONNX Runtime's contrib ops) are evaluated with the
normops float64 references, so a rewritten graph can be compared with its original on any dtype
without TensorRT, a GPU or an ONNX Runtime build that has the op.

On fp16/bf16 tensors, onnx's evaluator accumulates reductions and products in the half type
itself (a bf16 ReduceMean over 1600 values is off by 15%). No runtime does that: ONNX Runtime
and TensorRT accumulate in fp32. So the ops that accumulate (ACCUMULATING_OPS) run here on
float32 copies of half inputs, their results rounded back to the half type, as on a GPU.
Convolutions, pools and GridSample (BY_ONNX_RUNTIME_IN_FLOAT32), whose onnx kernels also loop in
Python over output positions, are computed so by ONNX Runtime's float32 kernels, on float32 inputs
too.
"""
from __future__ import annotations

import heapq

import ml_dtypes
import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops import load_op

from normops import DOMAIN, run_reference

from .scopes import node_bodies, walk_nodes


def _like(value: np.ndarray, dtype) -> np.ndarray:
    return np.asarray(value).astype(dtype)


def reference_norm(centered: bool, x, residual=None, gamma=None, beta=None, bias=None,
                   epsilon: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """float64 (y, sum) of LayerNorm (centered) or RMSNorm of x [+ residual] [+ bias], by the normops
    references; gamma, beta and bias may carry leading 1s, and a missing gamma is ones."""
    total = np.asarray(x, np.float64)
    if residual is not None:
        total = total + np.asarray(residual, np.float64)
    if bias is not None:  # ONNX Runtime's Skip ops add an input bias into the sum
        total = total + np.asarray(bias, np.float64).reshape(-1)
    flat = {name: None if v is None else np.asarray(v).reshape(-1) for name, v in (("gamma", gamma), ("beta", beta))}
    if flat["gamma"] is None:
        flat["gamma"] = np.ones(total.shape[-1])
    y = run_reference("LayerNorm" if centered else "RMSNorm", {"x": total, **flat}, epsilon)[0]
    return y, total


class _Norm(OpRun):
    centered = False
    skip = False
    ort_outputs = False  # Skip*LayerNormalization: (y, mean, inv_std, sum)
    params = ("gamma", "beta")  # inputs after x (and the residual), in order

    def _run(self, x, *args, epsilon=1e-5, **_):
        residual = None
        if self.skip:
            residual, args = args[0], args[1:]
        given = {name: value for name, value in zip(self.params, args) if value is not None}
        y, total = reference_norm(self.centered, x, residual, given["gamma"], given.get("beta"), given.get("bias"),
                                  epsilon)
        outs = [_like(y, x.dtype)]
        if self.skip:
            if self.ort_outputs:
                outs += [np.zeros((0,), np.float32)] * 2  # mean and inv_std: unused by rewritten graphs
            outs.append(_like(total, x.dtype))
        return tuple(outs)


def _op(name, domain, centered, skip=False, ort_outputs=False, params=("gamma", "beta")):
    return type(name, (_Norm,), {"op_domain": domain, "centered": centered, "skip": skip,
                                 "ort_outputs": ort_outputs, "params": params})


FUSED_OPS = [
    _op("RMSNorm", DOMAIN, False), _op("LayerNorm", DOMAIN, True),
    _op("AddRMSNorm", DOMAIN, False, skip=True), _op("AddLayerNorm", DOMAIN, True, skip=True),
    _op("SimplifiedLayerNormalization", "", False),
    _op("SkipSimplifiedLayerNormalization", "com.microsoft", False, skip=True, ort_outputs=True, params=("gamma", "bias")),
    _op("SkipLayerNormalization", "com.microsoft", True, skip=True, ort_outputs=True, params=("gamma", "beta", "bias")),
]


# ops whose result sums many products or values: on half inputs they run in float32
ACCUMULATING_OPS = ("ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "LayerNormalization",
                    "RMSNormalization", "Softmax", "LogSoftmax", "MatMul", "Gemm", "Einsum")
HALF_DTYPES = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


def _with_run(op_type: str, version: int, run, **members) -> type | None:
    """onnx's implementation of op_type at this opset with `run` as its `_run`: named like the op
    (how the evaluator finds new ops) but with this opset's schema, whose attributes the evaluator
    fills in (ReduceMean before 18 has no noop_with_empty_axes); None where the opset has no such op
    (RMSNormalization before 23). `run` gets onnx's class as `base`."""
    try:
        base = load_op("", op_type, version)
        schema = onnx.defs.get_schema(op_type, version, "")
    except Exception:
        return None

    def _run(self, *inputs, **attributes):
        return run(base, self, *inputs, **attributes)

    return type(op_type, (base,), {"op_domain": "", "op_schema": schema, "_run": _run, **members})


def _widened_inputs(inputs) -> list:
    return [x.astype(np.float32) if isinstance(x, np.ndarray) and x.dtype in HALF_DTYPES else x for x in inputs]


def _accumulating_in_float32(op_type: str, version: int) -> type | None:
    """onnx's implementation of op_type at this opset, run on float32 copies of half inputs."""

    def run(base, self, *inputs, **attributes):
        # these ops give their first input's type: only a half first input is computed widened
        # (a mixed graph, e.g. an fp32 X with fp16 scale, stays as onnx evaluates it)
        half = inputs[0].dtype if inputs and isinstance(inputs[0], np.ndarray) and inputs[0].dtype in HALF_DTYPES else None
        if half is None:
            return base._run(self, *inputs, **attributes)
        first, *rest = base._run(self, *_widened_inputs(inputs), **attributes)
        return (np.asarray(first).astype(half), *rest)  # LayerNormalization's mean and inv_std stay fp32

    return _with_run(op_type, version, run)


def in_order(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with each node after the nodes it reads, as onnx's evaluator needs them. ONNX
    Runtime puts them in order itself, so tools write some graphs out of order: its fp16
    converter (keep_io_types) appends the input casts after the nodes that read them, also when
    only an If branch reads them."""
    known = {""} | {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} \
        | {t.values.name for t in model.graph.sparse_initializer}
    reads = [_reads(node) for node in model.graph.node]
    for node, needed in zip(model.graph.node, reads):
        if not known.issuperset(needed):
            break
        known.update(node.output)
    else:
        return model
    # Kahn's algorithm, taking the earliest ready node first so that an ordered stretch stays as it is
    producer = {name: index for index, node in enumerate(model.graph.node) for name in node.output if name}
    after = [[] for _ in reads]
    waits_on = [0] * len(reads)
    for index, needed in enumerate(reads):
        for source in {producer[name] for name in needed if name in producer and producer[name] != index}:
            after[source].append(index)
            waits_on[index] += 1
    ready = [index for index, count in enumerate(waits_on) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for follower in after[index]:
            waits_on[follower] -= 1
            if waits_on[follower] == 0:
                heapq.heappush(ready, follower)
    taken = set(order)
    order += [index for index in range(len(reads)) if index not in taken]  # a cycle: the evaluator says where
    ordered = [model.graph.node[index] for index in order]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(ordered)
    return out


def _reads(node: onnx.NodeProto) -> set[str]:
    """The names a node reads: its inputs and what its bodies read from the enclosing graphs."""
    names = {name for name in node.input if name}
    for body in node_bodies(node):
        defined = {v.name for v in body.input} | {t.name for t in body.initializer} \
            | {name for inner in body.node for name in inner.output}
        for inner in body.node:
            names |= _reads(inner) - defined
        names |= {o.name for o in body.output} - defined
    return names


class _OnnxRuntimeNode(OpRun):
    """A node of an op the evaluator has no kernel for, run by ONNX Runtime on its own: the contrib
    ops ONNX Runtime's optimizer writes (FusedMatMul, QuickGelu, BiasGelu, ...) beside the norms. One
    single-node model per node and input signature, made at its first run; ONNX Runtime's own
    graph optimisations stay off, so the node runs as written."""
    opsets: list = []

    def _run(self, *inputs, **_):
        from onnx import helper

        from ..backends import import_onnxruntime

        ort = import_onnxruntime()  # a one-line error naming the extra to install, where it is missing

        node = self.onnx_node
        given = [(name, value) for name, value in zip(node.input, inputs) if name and value is not None]
        key = tuple((name, np.asarray(value).dtype.str, np.ndim(value)) for name, value in given)
        sessions = self.__dict__.setdefault("_sessions", {})
        if key not in sessions:
            graph_inputs = {name: helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype),
                                                                [None] * np.ndim(v)) for name, v in given}
            outputs = [helper.make_value_info(name, onnx.TypeProto()) for name in node.output if name]
            model = helper.make_model(helper.make_graph([node], node.op_type, list(graph_inputs.values()), outputs),
                                      opset_imports=self.opsets)
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            # one node is too small to share out, and a thread pool per node (a QDQ model has
            # hundreds) kept spinning past each run and starved the process for seconds
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            try:
                sessions[key] = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # an op neither knows: no inputs would help, so not a RunFailure
                from ..errors import NormfuseError, first_line, missing_kernel

                where = f" (node '{node.name}')" if node.name else ""
                if missing_kernel(str(exc)):  # ONNX Runtime knows the op, not on the CPU
                    raise NormfuseError(f"{node.domain}::{node.op_type}{where} has no kernel on ONNX Runtime's CPU "
                                        "provider, nor in onnx's reference evaluator, so the model cannot run on "
                                        "this machine (ONNX Runtime's transformers optimizer writes some ops, such as "
                                        "T5's RelativePositionBias, that only its CUDA provider runs): use a machine "
                                        "with a GPU, or the model as exported") from None
                raise NormfuseError(f"{node.domain}::{node.op_type}{where} is an op neither onnx's "
                                    f"reference evaluator nor ONNX Runtime has: {first_line(exc, 200)}") from None
        results = sessions[key].run(None, dict(given))
        named = dict(zip([name for name in node.output if name], results))
        return tuple(named.get(name) for name in node.output)


STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")


def _run_by_onnx_runtime(model: onnx.ModelProto) -> list[type]:
    """Classes for the ops of `model` in other domains than onnx's, that are neither fused ops nor
    the model's own functions, and for onnx's own ops that the evaluator implements only from a
    later opset than the model's (DequantizeLinear from 19, in a QDQ model of opset 18): ONNX
    Runtime runs them (`_OnnxRuntimeNode`)."""
    known = {(op.op_domain, op.__name__) for op in FUSED_OPS} | {(f.domain, f.name) for f in model.functions}
    nodes = list(walk_nodes(model.graph.node))
    wanted = {(n.domain, n.op_type) for n in nodes if n.domain not in STANDARD_DOMAINS} - known
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    wanted |= {("", op_type) for op_type in {n.op_type for n in nodes if n.domain in ("", "ai.onnx")}
               if version is not None and _not_implemented_at(op_type, version)}
    opsets = list(model.opset_import)
    return [type(op_type, (_OnnxRuntimeNode,), {"op_domain": domain, "opsets": opsets}) for domain, op_type in sorted(wanted)]


def _not_implemented_at(op_type: str, version: int) -> bool:
    """Whether onnx's evaluator has kernels for `op_type` only from opsets later than `version`."""
    from onnx.reference.ops import load_op

    try:
        load_op("", op_type, version)
    except RuntimeError as exc:
        return str(exc).startswith("No implementation for operator")
    except Exception:  # a function op, or one it does not know: the evaluator's own handling stands
        return False
    return False


class GlobalMaxPool(OpRun):
    """The max over every axis after the first two, as the operator's definition says. onnx's own
    (up to 1.23) reduces the last two axes, the channels too on a rank-3 input (onnx issue 7682;
    TensorFlow's 1-D global max pooling, as tf2onnx writes it, is one)."""
    op_domain = ""

    def _run(self, x):
        return (np.max(x, axis=tuple(range(2, x.ndim)), keepdims=True),)


class GatherElements(OpRun):
    """Along `axis`, each index picks data's value at it; on the other axes the index may be shorter
    than data (torch.gather allows it: BERT's token-type buffer, read up to the sequence's length).
    onnx's own (up to 1.23) refuses such indices, and picks through numpy.choose, which takes 32
    values along the axis at most (64 in numpy 2); past that it falls back to a path that reads one
    value a row, so BERT's embeddings failed it."""
    op_domain = ""

    def _run(self, data, indices, axis=0):
        data, indices = np.asarray(data), np.asarray(indices).astype(np.int64)
        if data.ndim != indices.ndim:
            raise ValueError(f"GatherElements: indices of rank {indices.ndim} for data of rank {data.ndim}")
        axis %= max(data.ndim, 1)
        indices = np.where(indices < 0, indices + data.shape[axis], indices)
        window = tuple(slice(None) if d == axis else slice(0, indices.shape[d]) for d in range(data.ndim))
        return (np.take_along_axis(data[window], indices, axis=axis),)


class Pad(OpRun):
    """Pad from opset 11 (pads an input), where a negative pad removes that many values from its end
    of the axis, as the operator allows: RWKV's time shift (ZeroPad2d((0, 0, 1, -1))) is one.
    onnx's own (up to 1.23) hands the pads to numpy.pad, which refuses negative ones. Here the
    negative pads crop first, and the others then pad what is left."""
    op_domain = ""

    def _run(self, data, pads, constant_value=None, axes=None, mode=None):
        data = np.asarray(data)
        rank = data.ndim
        axes = list(range(rank)) if axes is None else [int(a) % rank for a in np.asarray(axes).ravel()]
        pads = np.asarray(pads).astype(np.int64).ravel()
        if len(pads) != 2 * len(axes):
            raise ValueError(f"Pad: {len(pads)} pads for {len(axes)} axes")
        kept, widths = [slice(None)] * rank, [(0, 0)] * rank
        for axis, begin, end in zip(axes, pads[:len(axes)], pads[len(axes):]):
            kept[axis] = slice(max(-begin, 0), data.shape[axis] - max(-end, 0))
            widths[axis] = (max(begin, 0), max(end, 0))
        cropped = data[tuple(kept)]
        mode = mode.decode() if isinstance(mode, bytes) else (mode or "constant")
        if mode == "constant":
            value = 0 if constant_value is None else np.asarray(constant_value).ravel()[0]
            return (np.pad(cropped, widths, mode="constant", constant_values=value).astype(data.dtype),)
        return (np.pad(cropped, widths, mode=mode).astype(data.dtype),)


# ops whose onnx kernels loop in Python over output positions (AveragePool took 11.8 of a bf16
# PoolFormer's 12.5 s, GridSample 60.1 of a bf16 RT-DETR's 60.6 s) and, on half inputs, sum in the
# half type: ONNX Runtime's float32 kernels run them, on float32 copies of half inputs, the result
# rounded back to the half type, as a GPU accumulates in fp32. Other dtypes (float64) keep onnx's own.
BY_ONNX_RUNTIME_IN_FLOAT32 = ("Conv", "ConvTranspose", "AveragePool", "MaxPool", "GlobalAveragePool", "LpPool",
                              "GridSample")
FLOAT32 = np.dtype(np.float32)


def _in_float32_by_onnx_runtime(op_type: str, version: int, opsets: list) -> type | None:
    """onnx's op_type at this opset, whose float32 and half inputs ONNX Runtime computes in float32."""

    def run(base, self, *inputs, **attributes):
        first = inputs[0].dtype if inputs and isinstance(inputs[0], np.ndarray) else None
        if first not in HALF_DTYPES and first != FLOAT32:
            return base._run(self, *inputs, **attributes)
        results = _OnnxRuntimeNode._run(self, *_widened_inputs(inputs))
        # MaxPool's indices stay int64; the values go back to the input's type
        return tuple(r.astype(first) if isinstance(r, np.ndarray) and r.dtype == FLOAT32 else r for r in results)

    return _with_run(op_type, version, run, opsets=opsets)


def evaluator(model: onnx.ModelProto) -> ReferenceEvaluator:
    """onnx's reference evaluator for `model`, with the fused ops, fp32 accumulation on half
    inputs, ONNX Runtime running the ops of its own domains that onnx has no kernel for, and the
    operators onnx's own kernels get wrong (GlobalMaxPool, GatherElements, Pad) as defined."""
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    widened = [op for op in (_accumulating_in_float32(t, version) for t in ACCUMULATING_OPS) if op is not None]
    widened += [op for op in (_in_float32_by_onnx_runtime(t, version, list(model.opset_import))
                              for t in BY_ONNX_RUNTIME_IN_FLOAT32) if op is not None]
    return ReferenceEvaluator(in_order(model), new_ops=FUSED_OPS + widened + [GlobalMaxPool, GatherElements] +
                             ([Pad] if version >= 11 else []) + _run_by_onnx_runtime(model))


def run_model(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """Outputs of `model` on `feeds`, in graph-output order."""
    return evaluator(model).run(None, feeds)
