"""What a reference graph's own norm computes, in float64.

A fused op replaces a few of the reference's nodes. To judge the op itself, the check in
export.norm_check needs what those nodes mean, not what they compute in the model's dtype: a
spelling that is exact in real arithmetic can lose digits in fp32 (E[x^2] - E[x]^2 on rows whose
mean is large beside their spread), and the fused op, which does not, would then read as wrong.
So the nodes between the op's inputs and its outputs are cut out of the reference, every float in
them (inputs, outputs, weights, casts, constants) made float64, and run on onnx's reference
evaluator. That is the float64 reference normops.OP is set against.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

# every float type a cast or a constant may name, made float64
FLOAT_ELEMS = {1, 10, 16, 11}  # FLOAT, FLOAT16, BFLOAT16, DOUBLE


def cut_in_float64(graph, folder: Path, inputs: list[str], outputs: list[str], opset_import, ir_version,
                   kept_types: dict[str, int] | None = None):
    """A model of the reference's nodes that compute `outputs` from `inputs` and constants, in
    float64; None where they read another graph input or hold a control-flow node (nothing to cut).
    `kept_types`: inputs that keep their ONNX element type (integers: a Reshape's shape, say)."""
    import onnx
    from onnx import helper

    producers = {out: node for node in graph.node for out in node.output if out}
    initializers = {t.name: t for t in graph.initializer}
    stop = set(inputs)
    nodes, tensors, seen = [], [], set()

    def visit(name: str) -> bool:
        if not name or name in seen or name in stop:
            return True
        seen.add(name)
        if name in initializers:
            tensors.append(initializers[name])
            return True
        node = producers.get(name)
        if node is None or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return False  # another graph input, or a branch: not a norm's own arithmetic
        if not all(visit(upstream) for upstream in node.input):
            return False
        if node not in nodes:
            nodes.append(node)
        return True

    if not all(visit(name) for name in outputs):
        return None
    double = onnx.TensorProto.DOUBLE
    model = helper.make_model(
        helper.make_graph([_in_float64(n) for n in nodes], "norm_in_float64",
                          [helper.make_tensor_value_info(n, (kept_types or {}).get(n, double), None) for n in inputs],
                          [helper.make_tensor_value_info(n, double, None) for n in outputs],
                          [_tensor_in_float64(t, folder) for t in tensors]),
        opset_imports=list(opset_import))
    model.ir_version = ir_version
    return model


def _in_float64(node):
    """A copy of `node` whose casts and constants name float64 where they named another float."""
    import onnx

    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    for attr in copy.attribute:
        if attr.name == "to" and attr.i in FLOAT_ELEMS:
            attr.i = onnx.TensorProto.DOUBLE
        elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in FLOAT_ELEMS:
            attr.t.CopyFrom(_tensor_in_float64(attr.t, None))
        elif attr.name in ("value_float", "value_floats"):  # a Constant's float32 by its kind: a tensor instead
            values = [attr.f] if attr.name == "value_float" else list(attr.floats)
            shape = [] if attr.name == "value_float" else [len(values)]
            attr.CopyFrom(onnx.helper.make_attribute("value", onnx.numpy_helper.from_array(
                np.array(values, np.float64).reshape(shape))))
    return copy


def _tensor_in_float64(tensor, folder: Path | None):
    import onnx
    from onnx import numpy_helper

    from .onnx_io import read_external_tensor

    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    if copy.data_location == onnx.TensorProto.EXTERNAL and folder is not None:
        read_external_tensor(copy, folder)
    if copy.data_type not in FLOAT_ELEMS:
        return copy
    array = numpy_helper.to_array(copy).astype(np.float64)
    return numpy_helper.from_array(array, copy.name)


def run_in_float64(model, feeds: list[dict]) -> list[dict]:
    """`model` (from `cut_in_float64`) on the onnx reference evaluator, once for each of `feeds`
    (made float64 where the model takes float64; the inputs it keeps in their own type as they are)."""
    import tempfile

    import onnx

    from .backends import make_runner

    with tempfile.TemporaryDirectory(prefix="normfuse-norm-truth-") as tmp:
        path = Path(tmp) / "norm.onnx"
        onnx.save(model, str(path))
        runner = make_runner(path, "onnx-reference")
        double = {i.name for i in model.graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE}
        return [runner.run({name: np.asarray(value).astype(np.float64) if name in double else np.asarray(value)
                            for name, value in one.items()}) for one in feeds]
