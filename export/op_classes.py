"""Where time and FLOPs go, per op class, from ONNX Runtime's profiler.

Classes: `matmul` (matrix products), `norm` (normalisation: the fused ops, and in the reference
graph the nodes the rewriter fused away, residual Adds included) and `elementwise` (everything
else: activations, attention's softmax, rotary, reshapes). FLOPs are counted from the shapes the
profiler records: 2*M*N*K for a matrix product (ONNX Runtime's FusedGemm, FusedMatMul and
FusedConv too; a convolution's K: input channels per group times the kernel; fused attention:
Q K^T and the weighted sum of V, `attention_flops`), one per output element for element-wise
nodes, and per element of a norm: 4 (RMS) or 7 (LayerNorm) plus 1 for a residual Add. They are an
estimate of arithmetic, not of the hardware's work.
"""
from __future__ import annotations

import json
from math import prod

# products of an [..., K] input with a K x N matrix, the quantised ones included (ONNX Runtime's
# MatMulNBits: int4 weights, as onnxruntime-genai writes them): 2*M*N*K
PRODUCTS = {"MatMul", "Gemm", "FusedGemm", "FusedMatMul", "MatMulInteger", "QLinearMatMul", "MatMulNBits",
            "MatMulBnb4", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
# ONNX Runtime's fusions of a product or a convolution with its activation keep their shapes
GEMMS = {"Gemm", "FusedGemm"}
CONVS = {"Conv", "FusedConv"}
MATMUL_OPS = PRODUCTS | CONVS | {"Attention", "MultiHeadAttention", "GroupQueryAttention"}
NORM_OPS = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
            "SkipSimplifiedLayerNormalization", "RMSNorm", "LayerNorm", "AddRMSNorm", "AddLayerNorm"}
NORM_FLOPS_PER_ELEMENT = {"RMSNormalization": 4, "SimplifiedLayerNormalization": 4, "RMSNorm": 4,
                          "SkipSimplifiedLayerNormalization": 5, "AddRMSNorm": 5, "LayerNormalization": 7,
                          "LayerNorm": 7, "SkipLayerNormalization": 8, "AddLayerNorm": 8}
CLASSES = ("matmul", "norm", "elementwise")


def classify(op_type: str, node_name: str, norm_nodes: set[str]) -> str:
    if op_type in MATMUL_OPS:
        return "matmul"
    if op_type in NORM_OPS or node_name in norm_nodes:
        return "norm"
    return "elementwise"


ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}


def node_flops(op_type: str, inputs: list[list[int]], outputs: list[list[int]]) -> float:
    out = outputs[0] if outputs else []
    elements = prod(out) if out else 0
    if op_type in GEMMS and len(inputs) > 1 and inputs[0] and out and out[0]:
        # A is [M, K] or, transposed, [K, M]: K is its size over the output's M either way
        return 2.0 * elements * (prod(inputs[0]) // out[0])
    if op_type == "FusedMatMul" and len(inputs[0] if inputs else []) > 1 and len(out) > 1 and out[-2]:
        # its transA may hold A as [..., K, M]: K is A's last two axes over the output's M either way
        return 2.0 * elements * (inputs[0][-1] * inputs[0][-2] // out[-2])
    if op_type in PRODUCTS and inputs and inputs[0]:
        return 2.0 * elements * inputs[0][-1]
    if op_type in CONVS and len(inputs) > 1 and len(inputs[1]) > 2:
        # each output element sums C_in / group x kernel products: the weight [C_out, C_in / group, k...]
        return 2.0 * elements * prod(inputs[1][1:])
    if op_type in ATTENTION_OPS and out:
        return attention_flops(op_type, inputs, outputs)
    if op_type in NORM_FLOPS_PER_ELEMENT:
        return float(NORM_FLOPS_PER_ELEMENT[op_type] * elements)
    if op_type.startswith("Reduce") and inputs and inputs[0]:
        return float(prod(inputs[0]))
    return float(elements)


def attention_flops(op_type: str, inputs: list[list[int]], outputs: list[list[int]]) -> float:
    """Q K^T and the weighted sum of V: 2 x 2 x (every output element) x (keys attended), with
    heads x head size = the output's last axis (ONNX's rank-4 output is per head already). The keys
    attended are the present cache's length where the op returns one (it holds the past too), else
    the key input's sequence axis, else the query's (packed QKV). com.microsoft's Attention also
    projects its input to Q, K and V: 2 x input x its [hidden, 3 x hidden] weight."""
    out = outputs[0]
    present = outputs[1] if len(outputs) > 1 and outputs[1] else []
    key = inputs[1] if len(inputs) > 1 and inputs[1] else []
    if op_type == "Attention" and len(out) == 3 and len(key) == 2:  # com.microsoft's: [B, S, D] x [D, 3H]
        attended = present[3] if len(present) == 5 else out[1]  # present [2, B, heads, T, head size]
        return 2.0 * prod(inputs[0]) * key[1] + 4.0 * prod(out) * attended
    if len(present) == 4:  # [B, heads, T, head size]
        attended = present[2]
    elif len(key) == 4:  # ONNX's [B, heads, L, head size], or MultiHeadAttention's past-shaped key
        attended = key[2]
    elif len(key) in (3, 5):  # [B, L, hidden], or packed [B, L, heads, 2, head size]
        attended = key[1]
    else:  # packed QKV: the query's own sequence
        attended = out[-2]
    return 4.0 * prod(out) * attended


def summarise_profile(profile_path: str, norm_nodes: set[str], runs: int, skip_runs: int = 0) -> dict:
    """Per class: time_ms per run, flops per run, node count, and each as a share of the total, over
    the last `runs` runs of the profile after its first `skip_runs` (a session's first run allocates
    its memory and takes about twice as long: it would skew the shares)."""
    with open(profile_path) as f:
        events = json.load(f)
    if skip_runs:
        starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
        if len(starts) != skip_runs + runs:
            raise ValueError(f"{profile_path}: {len(starts)} runs profiled, expected {skip_runs} + {runs}")
        events = [e for e in events if e.get("ts", 0) >= starts[skip_runs]]
    totals = {c: {"time_ms": 0.0, "flops": 0.0, "kernels": 0} for c in CLASSES}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        args = event.get("args", {})
        op_type = args.get("op_name", "")
        node_name = event["name"][: -len("_kernel_time")]
        cls = classify(op_type, node_name, norm_nodes)
        shapes_in = [_first_shape(s) for s in args.get("input_type_shape", [])]
        shapes_out = [_first_shape(s) for s in args.get("output_type_shape", [])]
        totals[cls]["time_ms"] += event.get("dur", 0) / 1000.0 / runs
        totals[cls]["flops"] += node_flops(op_type, shapes_in, shapes_out) / runs
        totals[cls]["kernels"] += 1
    time_total = sum(t["time_ms"] for t in totals.values()) or 1.0
    flops_total = sum(t["flops"] for t in totals.values()) or 1.0
    for t in totals.values():
        t["kernels"] = round(t["kernels"] / runs)
        t["time_share"] = t["time_ms"] / time_total
        t["flop_share"] = t["flops"] / flops_total
    return totals


def _first_shape(entry) -> list[int]:
    """Profiler shape entries look like {"float": [1, 128, 512]}."""
    if isinstance(entry, dict) and entry:
        return list(next(iter(entry.values())))
    return []
