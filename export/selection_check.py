"""The choices a graph makes from its values, compared between reference and candidate.

A graph that picks by value (a mixture of experts' router takes the TopK of its scores, a decoder
the ArgMax of its logits) turns a difference in the last bits into a different path: where two
scores are all but tied, the candidate can pick another expert, and its output for that row is
then that expert's, far outside any tolerance, though every fused op is exact to its rounding.
So when the norm check (export.norm_check) finds each fused op within tolerance, both models run
once more with the indices of every main-graph TopK, ArgMax and ArgMin as extra outputs, and the
rows where they differ are counted. A TopK row counts as differing when it holds other indices,
not the same ones in another order (a router weighs the experts it picked, whatever their order).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

# op type -> which output holds the indices it picked
SELECTIONS = {"TopK": 1, "ArgMax": 0, "ArgMin": 0}


def selection_outputs(graph) -> list[tuple[str, str, str]]:
    """(node name, op type, index output name) of each selection in the main graph."""
    return [(node.name, node.op_type, node.output[SELECTIONS[node.op_type]]) for node in graph.node
            if node.op_type in SELECTIONS and (node.domain or "") in ("", "ai.onnx")
            and len(node.output) > SELECTIONS[node.op_type] and node.output[SELECTIONS[node.op_type]]]


def rows_that_differ(op: str, reference: np.ndarray, candidate: np.ndarray) -> tuple[int, int]:
    """(rows that picked differently, rows): TopK's rows along its last axis as sets, an ArgMax's
    or ArgMin's each index on its own."""
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    if reference.shape != candidate.shape:
        rows = max(1, int(np.prod(reference.shape[:-1])) if op == "TopK" else reference.size)
        return rows, rows
    if op == "TopK" and reference.ndim:
        rows = reference.reshape(-1, reference.shape[-1]) if reference.size else reference.reshape(0, 1)
        other = candidate.reshape(rows.shape)
        differ = (np.sort(rows, axis=-1) != np.sort(other, axis=-1)).any(axis=-1)
        return int(differ.sum()), int(differ.size)
    differ = reference != candidate
    return int(differ.sum()), int(differ.size)


def check_selections(reference: str | Path, reference_backend: str, candidate: str | Path, backend: str,
                     feeds: dict, candidate_optimization: str = "all") -> dict | None:
    """{"selections": [{node, op, output, differ, rows}], "differ": rows that differ in all} for the
    selections both graphs hold under one index name, each model run on `feeds` (the reference as
    written, the candidate at `candidate_optimization`, as the pair ran them); None when there is none."""
    from .backends import make_runner
    from .norm_check import take_branches, values_at
    from .onnx_io import load_graph_only

    reference, candidate = Path(reference), Path(candidate)
    ref = take_branches(load_graph_only(reference), feeds)
    cand = take_branches(load_graph_only(candidate), feeds)
    in_candidate = {name for _, _, name in selection_outputs(cand.graph)}
    selections = [s for s in selection_outputs(ref.graph) if s[2] in in_candidate]
    if not selections:
        return None
    names = [name for _, _, name in selections]
    expected = values_at(reference, reference_backend, ref, names, feeds, make_runner)
    actual = values_at(candidate, backend, cand, names, feeds, make_runner, optimization=candidate_optimization)
    result = {"selections": [], "differ": 0}
    for node, op, name in selections:
        differ, rows = rows_that_differ(op, expected[name], actual[name])
        result["selections"].append({"node": node, "op": op, "output": name, "differ": differ, "rows": rows})
        result["differ"] += differ
    return result


def describe(result: dict) -> str:
    """One clause for the norm check's line: which choices went another way, if any."""
    picks = result["selections"]
    changed = [s for s in picks if s["differ"]]
    if not changed:
        return (f"the {len(picks)} TopK/ArgMax/ArgMin choice(s) in the graph pick the same indices in both, so they do not "
                f"explain it")
    first = changed[0]
    more = f" and {len(changed) - 1} other choice(s)" if len(changed) > 1 else ""
    return (f"{first['op']} '{first['node']}' picks other indices in {first['differ']} of {first['rows']} rows"
            f"{more}: there the candidate's scores chose another path (a router, another expert; between "
            f"all but tied scores a last-bit difference suffices), and those rows' outputs follow it")
