"""Both sides of a failing half-precision pair, judged against the reference run in float32.

A fp16 or bf16 reference is not the truth a fused graph should meet: it rounds every intermediate
value to 11 or 8 significant bits, and through a deep graph (or an op that amplifies, a near-tie a
router decides) that rounding alone can carry an output past the graph tolerance, while the fused
graph, which rounds less, is nearer the truth. So when a half-precision pair fails though every
fused op is within tolerance on the reference's own values (export.norm_check), the reference graph
is widened (every fp16/bf16 tensor, constant, cast and declared type made float32) and run on ONNX
Runtime's CPU provider, on the same inputs. Each side's distance from that float32 run says which
of the two is nearer to what the model computes without half-precision rounding, and the pair is
judged again against it, with the same tolerance: a fused graph within the dtype's tolerance of the
float32 run passes, and the pair keeps its outputs against the half reference as well.
"""
from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import numpy as np
from onnx import TensorProto

HALF = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
# attributes that name an output element type
DTYPE_ATTRIBUTES = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
                    "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Bernoulli": "dtype"}
# attributes that hold a tensor
TENSOR_ATTRIBUTES = {"Constant": "value", "ConstantOfShape": "value"}


def _widened_tensor(tensor):
    """`tensor` as float32 under its own name (external data read already)."""
    from onnx import numpy_helper

    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)


def _widen_type(type_proto) -> None:
    which = type_proto.WhichOneof("value")
    if which == "tensor_type":
        if type_proto.tensor_type.elem_type in HALF:
            type_proto.tensor_type.elem_type = TensorProto.FLOAT
    elif which == "sequence_type":
        _widen_type(type_proto.sequence_type.elem_type)
    elif which == "optional_type":
        _widen_type(type_proto.optional_type.elem_type)


def widen_graph(graph) -> None:
    """`graph` and its subgraphs with every fp16/bf16 type made float32, in place."""
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type in HALF:
            graph.initializer[index].CopyFrom(_widened_tensor(tensor))
    if len(graph.sparse_initializer):
        raise ValueError("sparse initializers are not widened")
    for value in [*graph.input, *graph.output, *graph.value_info]:
        _widen_type(value.type)
    _widen_nodes(graph.node)


def widen_model(model) -> None:
    """`model`'s graph and its local functions with every fp16/bf16 type made float32, in place."""
    widen_graph(model.graph)
    for function in model.functions:
        _widen_nodes(function.node)
        for value in function.value_info:
            _widen_type(value.type)


def _widen_nodes(nodes) -> None:
    """The types, tensors and bodies the nodes' attributes hold, widened in place."""
    from onnx import AttributeProto

    for node in nodes:
        for attribute in node.attribute:
            if attribute.name == DTYPE_ATTRIBUTES.get(node.op_type) and attribute.i in HALF:
                attribute.i = TensorProto.FLOAT
            elif attribute.name == TENSOR_ATTRIBUTES.get(node.op_type) and attribute.t.data_type in HALF:
                attribute.t.CopyFrom(_widened_tensor(attribute.t))
            elif attribute.type == AttributeProto.GRAPH:
                widen_graph(attribute.g)
            elif attribute.type == AttributeProto.GRAPHS:
                for body in attribute.graphs:
                    widen_graph(body)
            elif attribute.type == AttributeProto.TENSOR and attribute.t.data_type in HALF:
                raise ValueError(f"{node.op_type} '{node.name}': its {attribute.name} tensor is not widened")


class Float32Reference:
    """The reference run in float32: widened (`widen_model`) on first use, saved with its weights to a
    temporary folder and run as written on ONNX Runtime's CPU provider, the half-precision feeds cast
    to float32. `close` lets the session and the folder go."""

    def __init__(self, reference: str | Path):
        self.reference = Path(reference)
        self._folder = None
        self._runner = None

    def run(self, feeds: dict) -> dict:
        if self._runner is None:
            import onnx

            from .backends import make_runner

            model = onnx.load(str(self.reference))  # weights too: the half ones are rewritten
            widen_model(model)
            self._folder = tempfile.TemporaryDirectory(prefix="normfuse-float32-reference-")
            path = Path(self._folder.name) / "widened.onnx"
            onnx.save(model, str(path), save_as_external_data=model.ByteSize() > 1 << 30,
                      location="widened.onnx.data")
            del model
            self._runner = make_runner(path, "ort-cpu", optimization="none")
        return self._runner.run({name: np.asarray(value).astype(np.float32) if _is_half(value) else value
                                 for name, value in feeds.items()})

    def close(self) -> None:
        self._runner = None
        gc.collect()  # ONNX Runtime sessions sit in reference cycles
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


def _is_half(value) -> bool:
    from .rewrite.evaluate import HALF_DTYPES

    return np.asarray(value).dtype in HALF_DTYPES


def distance(stats: dict) -> dict:
    """How far one side is from the float32 run, from validate.output_stats against it: max and mean
    absolute difference over the values finite in both, and `unlike`, the values NaN or Inf on one
    side only or unlike on both (NaN against Inf, Inf against -Inf), which no distance measures."""
    return {"max_abs": stats["max_abs"], "mean_abs": stats["mean_abs"], "unlike": stats["nonfinite_mismatch"]}


def check_against_float32(wide: dict, expected: dict, actual: dict, tolerance) -> dict:
    """{"outputs": {name: {"reference": distance, "candidate": distance}}, "candidate_nearer", "passed",
    "stats"}: each side's outputs against the float32 run's `wide`. The candidate is nearer when, for
    every output, neither its max nor its mean distance, nor its count of unlike NaN or Inf values,
    exceeds the reference's; it passes when every output is within `tolerance` of the float32 run
    (`stats`, validate.output_stats against it)."""
    from .validate import output_stats

    names = [n for n in expected if n in wide and n in actual and np.issubdtype(np.asarray(wide[n]).dtype, np.floating)]
    stats = {n: output_stats(actual[n], wide[n], tolerance) for n in names}
    outputs = {n: {"reference": distance(output_stats(expected[n], wide[n], tolerance)), "candidate": distance(stats[n])}
               for n in names}
    nearer = bool(outputs) and all(o["candidate"][k] <= o["reference"][k] for o in outputs.values()
                                   for k in ("unlike", "max_abs", "mean_abs"))
    # every floating output, none missing: a pair is never passed on part of its outputs
    passed = bool(names) and len(names) == len(expected) and all(s["passed"] for s in stats.values())
    return {"outputs": outputs, "candidate_nearer": nearer, "passed": passed, "stats": stats}


def describe(result: dict, dtype: str) -> str:
    """One line for a report: where each side stands against the reference run in float32."""
    if result.get("error"):
        return f"the reference could not be run in float32 to judge both sides against ({result['error']})"
    if not result["outputs"]:
        return "no floating-point output to judge against the reference run in float32"
    name, worst = max(result["outputs"].items(), key=lambda item: (
        max(side.get("unlike", 0) for side in item[1].values()), item[1]["reference"]["max_abs"]))

    def off(side: dict) -> str:  # "max 0.19 (mean 0.02)", and the NaN or Inf values no distance measures
        unlike = f", and {side['unlike']} value(s) NaN or Inf where it has another" if side.get("unlike") else ""
        return f"max {side['max_abs']:.3g} (mean {side['mean_abs']:.3g}{unlike})"

    where = (f"against the reference run in float32 (every {dtype} value, weight and cast widened), at {name} the "
             f"reference is off by {off(worst['reference'])} and the fused graph by {off(worst['candidate'])}")
    if result["passed"]:
        return (f"{where}: the fused graph is within {dtype}'s tolerance of the float32 run, so the pair is judged "
                f"against it; the difference from the {dtype} reference is that reference's own rounding")
    nearer = ("no further from it than the reference" if result["candidate_nearer"]
              else "further from it than the reference")
    return f"{where}: the fused graph is {nearer}, and outside {dtype}'s tolerance of it"
