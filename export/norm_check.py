"""Each fused norm, checked on the reference's own values.

When a fused graph's outputs differ from the reference's by more than the tolerance, the question
is where the difference comes from: a fused op that computes something else, or a difference the
rest of the graph grows (a quantised model rounds a norm output that differs in its last bit to the
neighbouring int8 step, and every later layer carries that on). So the reference runs once more
with the values around every fused op as extra outputs, and each fused op then runs alone, in a
model of its own on the candidate's backend, on exactly the values the reference computed at its
inputs; its outputs are compared with the reference's at the same names.

Where every fused op is within tolerance, the choices the graph makes by value (a router's TopK)
are compared as well (export.selection_check), and the result holds them under "selections".

Fused ops are the main graph's nodes the rewriter named `normfuse_*`. An If whose condition is an
input of the model (Optimum's merged decoders choose their branch by `use_cache_branch`) is
replaced, in both models, by the branch the feeds take, so the fused ops in that branch are checked
too. An op the rewrite wrapped in nodes of its own (the Reshapes to rows an ONNX Runtime Skip op
takes at rank 4 and back, a Cast to the norm's dtype) runs with them, from and to values the
reference holds (`replacement_unit`). One inside another control-flow body, or that cannot be so
cut out, is listed as not checked, with the reason.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

FUSED_PREFIX = "normfuse_"
# ops that round to an integer grid: in a model holding them, a last-bit difference can become a whole step
QUANTISING_OPS = {"QuantizeLinear", "DynamicQuantizeLinear", "QLinearMatMul", "QLinearConv", "MatMulInteger",
                  "ConvInteger", "DynamicQuantizeMatMul", "MatMulNBits", "QAttention", "QLinearAdd"}


def _condition(graph, name: str, feeds: dict):
    """The value of an If's condition when it is a model input, reshaped or negated on the way
    (validate.CONDITION_PASSES); None when the feeds do not decide it."""
    from .validate import CONDITION_PASSES

    producers = {out: node for node in graph.node for out in node.output}
    negate = False
    while name in producers and producers[name].op_type in CONDITION_PASSES and producers[name].input:
        negate ^= producers[name].op_type == "Not"
        name = producers[name].input[0]
    if name not in feeds or np.size(feeds[name]) != 1:
        return None
    return bool(np.asarray(feeds[name]).ravel()[0]) ^ negate


def take_branches(model, feeds: dict):
    """`model` with each main-graph If whose condition the feeds decide replaced by the branch it
    takes: the branch's nodes and initializers move to the main graph (ONNX names are unique across
    scopes, so nothing clashes) and Identity nodes give its outputs the If's output names."""
    from onnx import helper

    graph = model.graph
    nodes = []
    for node in graph.node:
        taken = _condition(graph, node.input[0], feeds) if node.op_type == "If" and node.input else None
        if taken is None:
            nodes.append(node)
            continue
        branch = next(a.g for a in node.attribute if a.name == ("then_branch" if taken else "else_branch"))
        nodes.extend(branch.node)
        graph.initializer.extend(branch.initializer)
        nodes.extend(helper.make_node("Identity", [inner.name], [outer], name=f"{node.name}_taken_{i}")
                     for i, (inner, outer) in enumerate(zip(branch.output, node.output)) if outer and outer != inner.name)
    nodes = [_copy(node) for node in nodes]  # what graph.node held is cleared next
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def _copy(node):
    import onnx

    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def constant_closure(graph) -> tuple[set[str], dict[str, object]]:
    """(names of the values computed from constants alone, producing node of each such value that a
    node makes): initializers, Constant outputs, and outputs of nodes that read only those."""
    constant = {t.name for t in graph.initializer}
    producers = {}
    for node in graph.node:  # nodes are in topological order
        if any(attr.g.node or attr.graphs for attr in node.attribute):
            continue
        if all(not name or name in constant for name in node.input):
            for name in node.output:
                constant.add(name)
                producers[name] = node
    return constant, producers


def _needed_constants(names, producers, graph) -> tuple[list, list]:
    """(initializers, nodes in order) that compute the constant values `names`."""
    initializers = {t.name: t for t in graph.initializer}
    nodes, tensors, seen = [], [], set()

    def visit(name):
        if not name or name in seen:
            return
        seen.add(name)
        if name in initializers:
            tensors.append(initializers[name])
            return
        node = producers[name]
        for upstream in node.input:
            visit(upstream)
        if node not in nodes:
            nodes.append(node)

    for name in names:
        visit(name)
    return tensors, nodes


def _with_data(tensor, folder: Path):
    """A copy of an initializer with its bytes in it (loaded from the model's folder if external)."""
    import onnx

    from .onnx_io import read_external_tensor

    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    if copy.data_location == onnx.TensorProto.EXTERNAL:
        read_external_tensor(copy, folder)
    return copy


def _value_info(name: str, value: np.ndarray):
    from onnx import helper

    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype),
                                         list(np.shape(value)))


def check_fused_norms(reference: str | Path, reference_backend: str, candidate: str | Path, backend: str,
                      feeds: dict, tolerance, fallback_tolerance=None) -> dict:
    """{"norms": [{node, op, inputs, outputs: {name: output_stats}, against, passed}],
    "not_checked": [{node, reason}], "passed": every checked norm within tolerance}, for the fused
    ops of `candidate` (see the module doc). `feeds`: the inputs the pair ran on. Each op is held
    to `tolerance` against the reference's own nodes run in float64 (export.norm_truth; `against`
    "float64"), or, where those cannot be cut out or run so, to `fallback_tolerance` (None: the
    same) against the reference's values in its dtype (`against` "reference")."""
    import onnx

    from .backends import make_runner
    from .onnx_io import load_graph_only
    from .rewrite.scopes import walk_nodes
    from .validate import output_stats

    reference, candidate = Path(reference), Path(candidate)
    cand = take_branches(load_graph_only(candidate), feeds)
    ref = take_branches(load_graph_only(reference), feeds)
    constant, constant_producers = constant_closure(cand.graph)
    in_reference = {i.name for i in ref.graph.input} | {o for n in ref.graph.node for o in n.output if o}
    not_checked, plans = [], []
    fused = [n for n in cand.graph.node if n.name.startswith(FUSED_PREFIX)]
    in_bodies = sum(n.name.startswith(FUSED_PREFIX) for n in walk_nodes(cand.graph.node)) - len(fused)
    if in_bodies:
        not_checked.append({"node": f"{in_bodies} fused op(s)", "reason": "inside control-flow bodies the inputs "
                                                                          "do not choose"})
    producers = {out: n for n in cand.graph.node for out in n.output if out}
    consumers: dict[str, list] = {}
    for n in cand.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    order = {id(n): k for k, n in enumerate(cand.graph.node)}
    for node in fused:
        unit, why = replacement_unit(node, producers, consumers, in_reference, constant)
        if unit is None:
            not_checked.append({"node": node.name, "reason": why})
            continue
        unit.sort(key=lambda n: order[id(n)])
        made = {out for n in unit for out in n.output}
        # once each: an op may read one value twice (x as its own residual), and a model input is defined once
        dynamic = list(dict.fromkeys(name for n in unit for name in n.input
                                     if name and name not in constant and name not in made))
        compared = [name for n in unit for name in n.output if name and name in in_reference]
        if not compared:
            not_checked.append({"node": node.name, "reason": "its outputs are values the rewrite made, which the "
                                                             "reference does not hold"})
            continue
        plans.append((node, unit, dynamic, compared))
    result = {"norms": [], "not_checked": not_checked, "passed": True,
              "quantised": any(n.op_type in QUANTISING_OPS for n in walk_nodes(ref.graph.node))}
    if not plans:
        return result
    wanted = list(dict.fromkeys(name for _, _, dynamic, compared in plans for name in dynamic + compared))
    values = values_at(reference, reference_backend, ref, wanted, feeds, make_runner)
    with tempfile.TemporaryDirectory(prefix="normfuse-norm-check-") as tmp:
        for index, (node, unit, dynamic, compared) in enumerate(plans):
            tensors, nodes = _needed_constants([n for u in unit for n in u.input if n and n in constant],
                                               constant_producers, cand.graph)
            graph = onnx.helper.make_graph(
                nodes + unit, f"norm_{index}", [_value_info(n, values[n]) for n in dynamic],
                [_value_info(n, values[n]) for n in compared], [_with_data(t, candidate.parent) for t in tensors])
            model = onnx.helper.make_model(graph, opset_imports=list(cand.opset_import))
            model.ir_version = cand.ir_version
            path = Path(tmp) / f"norm_{index}.onnx"
            onnx.save(model, str(path))
            runner = make_runner(path, backend)
            as_run = {n: values[n] for n in dynamic}
            # the same inputs scaled to where epsilon counts: on unit-scale rows it moves a norm by less
            # than one op's rounding (0 for 1e-5 does), at a mean square near it by half
            small = at_epsilon_scale(as_run, _epsilon(node))
            truths = _in_float64(ref, reference.parent, dynamic, compared, [as_run, small])
            got = runner.run(as_run)
            if truths is None:
                record = {"outputs": {n: output_stats(got[n], values[n], fallback_tolerance or tolerance)
                                      for n in compared}, "against": "reference"}
            else:
                got_small = runner.run(small)
                record = {"outputs": {n: output_stats(got[n], truths[0][n], tolerance) for n in compared},
                          "against": "float64",
                          "at_epsilon_scale": {n: output_stats(got_small[n], truths[1][n], tolerance) for n in compared}}
            record = {"node": node.name, "op": node.op_type, "inputs": dynamic, **record}
            record["passed"] = all(s["passed"] for s in (*record["outputs"].values(),
                                                          *record.get("at_epsilon_scale", {}).values()))
            result["norms"].append(record)
            result["passed"] &= record["passed"]
    return result


UNIT_LIMIT = 12  # nodes: the rewrite puts at most a few Reshapes, a Shape and a Cast around an op


def replacement_unit(node, producers: dict, consumers: dict, in_reference: set, constant: set) -> tuple[list | None, str]:
    """(the nodes the rewrite put in place of one norm: the fused `node` and what it wrapped it in,
    the Reshapes to rows an ONNX Runtime Skip op takes at rank 4 and back, the Shape they read, a
    Cast to the norm's own dtype; or None, why not). The unit grows from the op through values the
    reference does not hold, back to values it holds and forward to them, so it reads and writes
    only values the reference computed."""
    unit, seen = [node], {id(node)}
    grew = True
    while grew:
        grew = False
        for member in list(unit):
            around = [producers.get(name) for name in member.input
                      if name and name not in constant and name not in in_reference]
            if None in around:
                return None, "it reads a value that neither the reference nor the rewrite computes"
            for name in member.output:
                if name and name not in in_reference:
                    around += consumers.get(name, [])
            for other in around:
                if id(other) in seen:
                    continue
                if other.name.startswith(FUSED_PREFIX):
                    return None, f"it exchanges values with {other.name} that the reference does not hold"
                unit.append(other)
                seen.add(id(other))
                grew = True
        if len(unit) > UNIT_LIMIT:
            return None, (f"the values around it that the reference does not hold reach past {UNIT_LIMIT} nodes "
                          "of the rewrite")
    return unit, ""


DEFAULT_EPSILON = 1e-5  # ONNX's LayerNormalization's, where an op carries none


def _epsilon(node) -> float:
    return next((a.f for a in node.attribute if a.name == "epsilon"), DEFAULT_EPSILON)


def at_epsilon_scale(values: dict, epsilon: float) -> dict:
    """The op's floating inputs scaled together so that the first one's mean square is about
    `epsilon` (at least 1e-6): there the epsilon moves the norm by a large fraction, so an op that
    drops it or takes another is plain to see. The scale is a power of two, exact in every dtype."""
    floats = {n: v for n, v in values.items() if np.asarray(v).dtype.kind not in "biu"}
    if not floats:
        return dict(values)
    first = np.asarray(next(iter(floats.values())), dtype=np.float64)
    mean_square = float(np.mean(first ** 2)) if first.size else 0.0
    if not (np.isfinite(mean_square) and mean_square > 0):  # zeros, or a NaN or Inf in the row: as they are
        return dict(values)
    scale = 2.0 ** round(0.5 * np.log2(max(epsilon, 1e-6) / mean_square))
    return {n: (np.asarray(v) * np.asarray(scale, dtype=np.float32)).astype(np.asarray(v).dtype) if n in floats else v
            for n, v in values.items()}


def _in_float64(ref, folder: Path, inputs: list[str], outputs: list[str], feeds: list[dict]) -> list[dict] | None:
    """What the reference's own nodes from `inputs` to `outputs` compute in float64 on each of
    `feeds`, or None where they cannot be cut out or run so (export.norm_truth)."""
    from onnx import helper

    from .norm_truth import cut_in_float64, run_in_float64

    kept = {name: helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype) for name, value in feeds[0].items()
            if np.asarray(value).dtype.kind in "biu"}  # a Reshape's shape between the residual Add and the norm
    try:
        model = cut_in_float64(ref.graph, folder, inputs, outputs, ref.opset_import, ref.ir_version, kept)
        return None if model is None else run_in_float64(model, feeds)
    except Exception:  # an op the evaluator has no float64 kernel for: the reference's values instead
        return None


def values_at(path: Path, backend: str, graph_only, names: list[str], feeds: dict, make_runner,
              optimization: str = "none") -> dict:
    """A model's values at `names` on `feeds`: the model (`graph_only`, read from `path`) with
    those names added to its outputs runs, as written unless `optimization` says otherwise, from a
    temporary file: beside the model when its weights are external (they are found relative to it),
    else in a temporary folder."""
    import onnx

    from .onnx_io import external_locations

    model = graph_only
    outputs = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in outputs)
    with tempfile.TemporaryDirectory(prefix="normfuse-norm-check-") as tmp:
        folder = path.parent if external_locations(model) else Path(tmp)
        handle, name = tempfile.mkstemp(prefix=f".{path.stem}.norm-check-", suffix=".onnx", dir=folder)
        os.close(handle)
        try:
            onnx.save(model, name)
            return make_runner(name, backend, optimization=optimization).run(feeds)
        finally:
            os.unlink(name)


def could_not_check(exc: Exception) -> dict:
    """The result when the check itself fails (a read-only folder beside external weights, a
    reference past protobuf's 2 GiB): said, never raised, since the pair's verdict stands without it."""
    from .errors import first_line

    return {"norms": [], "not_checked": [{"node": "every fused op", "reason": f"the check could not run "
                                          f"({exc.__class__.__name__}: {first_line(exc, 160)})"}], "passed": True}


def describe(result: dict) -> str:
    """One line for a report: which fused norms were off on the reference's own values, if any."""
    norms = result["norms"]
    skipped = "".join(f"; {n['node']} not checked: {n['reason']}" for n in result["not_checked"])
    if not norms:
        return f"no fused norm could be checked on the reference's own values{skipped}"
    worst = max(s["max_abs"] for n in norms for s in n["outputs"].values())
    off = [n for n in norms if not n["passed"]]
    if not off:
        grows = ("(int8 rounding of last-bit differences, in this quantised model)" if result.get("quantised")
                 else "(the rest of the graph carries last-bit differences on)")
        line = (f"each fused norm on the reference's own values: {len(norms)} of {len(norms)} within one op's "
                f"tolerance (max abs {worst:.3g}), so the difference grows outside the fused ops {grows}{skipped}")
        if result.get("selections"):
            from .selection_check import describe as describe_selections

            line += f"; {describe_selections(result['selections'])}"
        return line
    first = off[0]
    # the unit-scale outputs where they fail, else those at epsilon's scale (export.norm_check.at_epsilon_scale)
    failing = [(name, s, "") for name, s in first["outputs"].items() if not s["passed"]] or \
        [(name, s, " with its inputs scaled to where epsilon counts") for name, s in
         first.get("at_epsilon_scale", {}).items() if not s["passed"]]
    name, stats, where = max(failing, key=lambda item: (item[1].get("nonfinite_mismatch", 0), item[1]["max_abs"]))
    y = next(iter(first["outputs"]))  # the norm's own output name, which --exclude takes
    # max abs is taken over the values finite on both sides: a NaN or Inf on one side only is said as such
    how = (f"with {stats['nonfinite_mismatch']} value(s) NaN or Inf on one side only" if stats.get("nonfinite_mismatch")
           else f"by max abs {stats['max_abs']:.3g}") + where
    return (f"{len(off)} of {len(norms)} fused norms are off on the reference's own values, beyond one op's "
            f"tolerance (normops.OP): {first['node']} ({first['op']}) {how} at {name}: the fused op computes "
            f"something else (--exclude {y} leaves that norm as written){skipped}")


def describe_passed(result: dict) -> str:
    """One line for the check every ONNX pair gets (`validate.compare`), where it found nothing off."""
    norms = result["norms"]
    skipped = "".join(f"; {n['node']} not checked: {n['reason']}" for n in result["not_checked"])
    if not norms:
        return f"no fused op checked alone on the reference's own values{skipped}"
    used = max(s["tolerance_used"]["max"] for n in norms
               for s in (*n["outputs"].values(), *n.get("at_epsilon_scale", {}).values()))
    in_float64, scaled = sum(n.get("against") == "float64" for n in norms), sum("at_epsilon_scale" in n for n in norms)
    how = ("all against the reference's nodes in float64, at unit scale and at epsilon's scale"
           if in_float64 == scaled == len(norms) else
           f"{in_float64} against the reference's nodes in float64 ({scaled} also at epsilon's scale), "
           f"{len(norms) - in_float64} against its values")
    return (f"each fused op alone on the reference's own values: {len(norms)} of {len(norms)} within one op's "
            f"tolerance (normops.OP; at most {used * 100:.2g}% of it), {how}{skipped}")
