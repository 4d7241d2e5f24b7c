"""Model-local functions that hold norms, inlined before the rewrite.

Exporters may write modules as ONNX local functions (FunctionProto): TorchScript's
`export_modules_as_functions`, for instance, turns every `RMSNorm` module into one function and
every use of it into a call. The norm's nodes then live in the function body, where the rewriter
cannot replace them per call site. A function is inlined, with onnx's own inliner, when its body
(its nested bodies, or a function it calls) holds a norm op: ReduceMean, LayerNormalization,
RMSNormalization, or ONNX Runtime's SimplifiedLayerNormalization and Skip variants. Every other
function is left as it is.

Weights are never read: the inliner works on a copy of the model whose initializers carry names,
types and dims but no bytes (the inliner only needs their names), and the model's own
initializers (in memory or external) are put back afterwards.
"""
from __future__ import annotations

from collections import Counter

import onnx
from onnx import inliner

from ..errors import first_line
from .scopes import all_nodes, walk_nodes

NORM_OPS = frozenset({"ReduceMean", "LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
                      "SkipLayerNormalization", "SkipSimplifiedLayerNormalization"})


def inline_norm_functions(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """(model with the norm-holding local functions inlined, notes). The model itself when nothing
    is inlined; a function that cannot be inlined stays, with the reason in the notes."""
    if not model.functions:
        return model, []
    functions = {(f.domain, f.name): f for f in model.functions}
    selected = _holding_norms(functions)
    if not selected:
        return model, [f"left {len(functions)} local function(s) as they are: none holds a norm op"]
    notes = []
    opset = _opsets(model.opset_import).get("", None)
    for key in sorted(selected):
        theirs = _opsets(functions[key].opset_import).get("", opset)
        if theirs != opset:  # inlining would run its nodes under the model's opset
            notes.append(f"local function {_id(key)} not inlined: it imports opset {theirs}, the model {opset}")
            selected.discard(key)
    if not selected:
        return model, notes
    calls = Counter((n.domain, n.op_type) for n in all_nodes(model) if (n.domain, n.op_type) in selected)
    try:
        inlined = _inline(model, sorted(selected))
    except Exception as exc:  # the inliner's own errors: keep the functions, say why
        notes.append(f"local function(s) {', '.join(_id(k) for k in sorted(selected))} not inlined: onnx's inliner "
                     f"failed ({exc.__class__.__name__}: {first_line(exc, 200)})")
        return model, notes
    names = ", ".join(f"{_id(k)} ({calls[k]} call{'s' if calls[k] != 1 else ''})" for k in sorted(selected))
    notes.insert(0, f"inlined local function(s) {names}: they hold norm ops ({', '.join(_ops_in(functions, selected))}) "
                    f"or call a function that does")
    left = len(functions) - len(selected)
    if left:
        notes.append(f"left {left} local function(s) without norm ops as they are")
    return inlined, notes


def _holding_norms(functions: dict) -> set:
    """Functions whose body holds a norm op, directly, in a nested body, or through a call."""
    direct = {key for key, f in functions.items() if any(n.op_type in NORM_OPS for n in walk_nodes(f.node))}
    calls = {key: {(n.domain, n.op_type) for n in walk_nodes(f.node)} & set(functions) for key, f in functions.items()}
    selected, grew = set(direct), True
    while grew:
        grown = {key for key, called in calls.items() if called & selected} | selected
        grew, selected = grown != selected, grown
    return selected


def _ops_in(functions: dict, selected: set) -> list[str]:
    return sorted({n.op_type for key in selected for n in walk_nodes(functions[key].node) if n.op_type in NORM_OPS})


def _inline(model: onnx.ModelProto, selected: list) -> onnx.ModelProto:
    """onnx's inliner on a weightless copy; the original initializers are put back by name."""
    light = onnx.ModelProto()
    _copy_fields(model, light, skip="graph")
    _copy_fields(model.graph, light.graph, skip="initializer")
    for tensor in model.graph.initializer:
        stub = light.graph.initializer.add()
        stub.name, stub.data_type = tensor.name, tensor.data_type
        stub.dims.extend(tensor.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        stub.external_data.add(key="location", value="weights-not-read")
    out = inliner.inline_selected_functions(light, selected)
    if [t.name for t in out.graph.initializer] != [t.name for t in model.graph.initializer]:
        raise ValueError("the inliner changed the initializers")
    del out.graph.initializer[:]
    out.graph.initializer.extend(model.graph.initializer)  # external tensors: references only
    used = {n.domain for n in all_nodes(out)} | {f.domain for f in out.functions}
    gone = {domain for domain, _ in selected} - used - {"", "ai.onnx"}
    kept = [e for e in out.opset_import if e.domain not in gone]  # the inlined functions' own domains
    del out.opset_import[:]
    out.opset_import.extend(kept)
    return out


def _copy_fields(source, target, skip: str) -> None:
    """Copy every set field of message `source` into `target` but `skip`."""
    for descriptor, value in source.ListFields():
        if descriptor.name == skip:
            continue
        field = getattr(target, descriptor.name)
        if hasattr(field, "extend"):  # a repeated field
            field.extend(value)
        elif descriptor.message_type is not None:
            field.CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)


def _opsets(entries) -> dict:
    return {("" if e.domain == "ai.onnx" else e.domain): e.version for e in entries}


def _id(key) -> str:
    return f"{key[0]}::{key[1]}" if key[0] else key[1]
