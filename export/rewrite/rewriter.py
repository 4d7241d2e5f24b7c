"""Find every norm subgraph, prove it, and replace it with one fused op.

    from export.rewrite import rewrite_file
    report = rewrite_file("model.onnx", "fused.onnx", target="onnxruntime")

Candidates are tried at every possible root, latest in the graph first, with each pattern's
alternatives in order; the first structural match that passes the checks and the numerical
proof is fused. A norm whose every match was rejected is reported with the reasons.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR  # its warnings (colour, bfloat16 numpy) are noise here

from ..errors import NormfuseError, UsageError
from ..onnx_io import load_graph_only, relocate_external_data, save_model
from .checks import FLOAT_TYPES, NormCandidate, Rejected, build_candidate, dtype_name
from .emit import MS_DOMAIN, TARGETS, emit, emitted_op, required_opset
from .patterns import NORM_PATTERNS, ROOT_OPS
from .proof import prove
from .residual import residual_add, sum_is_used_elsewhere


@dataclass
class Fusion:
    kind: str  # normfuse op name: RMSNorm, LayerNorm, AddRMSNorm, AddLayerNorm
    emitted: str  # domain::op_type written to the graph
    pattern: str
    residual: bool
    sum_exposed: bool
    epsilon: float
    hidden: int
    nodes_removed: list[str]
    output: str


@dataclass
class Rejection:
    pattern: str
    reason: str
    nodes: list[str]
    output: str


@dataclass
class RewriteReport:
    target: str
    fused: int = 0
    fusions: list[Fusion] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    residual_skipped: list[dict] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    opset: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def counts(self) -> dict:
        out: dict[str, int] = {}
        for f in self.fusions:
            out[f.kind] = out.get(f.kind, 0) + 1
        return out


def rewrite_model(model: onnx.ModelProto, target: str = "tensorrt", residual: bool = True,
                  prove_fusions: bool = True) -> tuple[onnx.ModelProto, RewriteReport]:
    """Rewrite an in-memory model (external weights may stay unloaded)."""
    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    started = time.perf_counter()
    report = RewriteReport(target=target, nodes_before=len(model.graph.node))
    opset = _default_opset(model)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    graph = gs.import_onnx(inferred)
    graph_outputs = {t.name for t in graph.outputs}
    report.notes += _drop_identity_casts(graph, graph_outputs)

    candidates = _find_candidates(graph, graph_outputs, target, residual, prove_fusions, opset, report)
    needed = max([required_opset(c, target) for c in candidates] + [opset])
    if needed > opset:
        report.notes.append(f"the {target} target needs opset {needed} for RMSNormalization; the model has {opset}")
        raise NormfuseError(
            f"target 'onnx' needs opset {needed} (RMSNormalization) but the model is opset {opset}; "
            "re-export at opset 23 or use --target onnxruntime")
    for candidate in candidates:
        emit(graph, candidate, target)
        report.fusions.append(_fusion_record(candidate, target))
    report.fused = len(report.fusions)

    graph.cleanup().toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    _set_opsets(out, model, target, report)
    _restore_metadata(out, model)
    report.nodes_after = len(out.graph.node)
    report.opset = opset
    report.seconds = round(time.perf_counter() - started, 3)
    return out, report


def _drop_identity_casts(graph: gs.Graph, graph_outputs: set) -> list[str]:
    """Bypass Casts to the dtype their input already has (TorchScript writes `x.float()` on fp32
    x as one, and then reuses its output for the residual, hiding the Add in front of the norm)."""
    dropped = 0
    for node in graph.nodes:
        if node.op != "Cast" or not node.outputs or node.outputs[0].name in graph_outputs:
            continue
        source, out = node.inputs[0], node.outputs[0]
        if source.dtype is None or dtype_name(source) != onnx_dtype_name(node.attrs.get("to")):
            continue
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = source
        node.outputs.clear()
        dropped += 1
    return [f"bypassed {dropped} identity Cast node(s)"] if dropped else []


def _find_candidates(graph, graph_outputs, target, residual, prove_fusions, opset, report) -> list[NormCandidate]:
    chosen: list[NormCandidate] = []
    claimed: set[int] = set()  # ids of nodes already taken by a chosen candidate
    rejected: dict[str, Rejection] = {}
    roots = [out for node in reversed(graph.nodes) if node.op in ROOT_OPS for out in node.outputs[:1]]
    for root in roots:
        if _already_target_op(root, target):
            continue
        candidate = _first_passing(root, graph_outputs, claimed, prove_fusions, opset, rejected)
        if candidate is None:
            continue
        if residual and target != "onnx":
            found, why = residual_add(candidate, graph_outputs)
            if found is not None and id(found[2]) not in claimed:
                candidate.residual = found
                candidate.expose_sum = sum_is_used_elsewhere(candidate, graph_outputs)
            elif why:
                report.residual_skipped.append({"output": root.name, "reason": why})
        if _is_noop(candidate, target):
            continue
        claimed.update(id(n) for n in candidate.nodes)
        if candidate.residual is not None:
            claimed.add(id(candidate.residual[2]))
        chosen.append(candidate)
    fused_nodes = {name for c in chosen for name in c.node_names}
    report.rejected = [r for r in rejected.values() if not (set(r.nodes) & fused_nodes)]
    return chosen


def _first_passing(root, graph_outputs, claimed, prove_fusions, opset, rejected) -> NormCandidate | None:
    for norm in NORM_PATTERNS:
        for match in norm.pattern.matches(root):
            if any(id(n) in claimed for n in match.nodes):
                continue
            try:
                candidate = build_candidate(norm, match, root, graph_outputs)
                if prove_fusions:
                    prove(candidate, opset)
                return candidate
            except Rejected as why:
                key = _anchor(match)
                if key not in rejected:
                    rejected[key] = Rejection(norm.name, str(why), [n.name for n in match.nodes], root.name)
    return None


def _anchor(match) -> str:
    """A norm is identified by its statistics node, whichever root it was tried from."""
    stats = [n for n in match.nodes if n.op in ("ReduceMean", "LayerNormalization", "RMSNormalization",
                                                "SimplifiedLayerNormalization")]
    return (stats[-1] if stats else match.nodes[-1]).name


def _already_target_op(root, target) -> bool:
    """Outputs of ops this target emits need no rewriting (rewriting twice changes nothing)."""
    node = root.inputs[0] if len(root.inputs) == 1 else None
    return node is not None and target == "tensorrt" and node.domain == "normfuse"


def _is_noop(candidate: NormCandidate, target: str) -> bool:
    """A lone native op that the target would emit again, with no residual to absorb."""
    if candidate.residual is not None or len(candidate.nodes) != 1:
        return False
    node = candidate.nodes[0]
    domain, op_type = emitted_op(candidate, target)
    return node.op == op_type and (node.domain or "") == domain and candidate.x is node.inputs[0]


def _fusion_record(candidate: NormCandidate, target: str) -> Fusion:
    from normops import op_for

    domain, op_type = emitted_op(candidate, target)
    removed = candidate.node_names + ([candidate.residual[2].name] if candidate.residual else [])
    return Fusion(
        kind=op_for(candidate.centered, candidate.residual is not None).name,
        emitted=f"{domain or 'ai.onnx'}::{op_type}", pattern=candidate.pattern.name,
        residual=candidate.residual is not None, sum_exposed=candidate.expose_sum,
        epsilon=candidate.epsilon, hidden=candidate.hidden, nodes_removed=removed, output=candidate.output.name,
    )


def onnx_dtype_name(to) -> str | None:
    return FLOAT_TYPES.get(int(to)) if to is not None else None


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def _set_opsets(out: onnx.ModelProto, original: onnx.ModelProto, target: str, report: RewriteReport) -> None:
    versions = {e.domain: e.version for e in original.opset_import}
    if report.fusions:
        if target == "tensorrt":
            versions.setdefault("normfuse", 1)
        if target == "onnxruntime" and any(f.residual for f in report.fusions):
            versions.setdefault(MS_DOMAIN, 1)
    del out.opset_import[:]
    out.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in versions.items())


def _restore_metadata(out: onnx.ModelProto, original: onnx.ModelProto) -> None:
    out.producer_name, out.producer_version = "normfuse", "0.1.0"
    del out.metadata_props[:]
    out.metadata_props.extend(original.metadata_props)


def rewrite_file(source: str | Path, destination: str | Path, target: str = "tensorrt", residual: bool = True,
                 prove_fusions: bool = True) -> RewriteReport:
    """Rewrite `source` into `destination`; external weights are referenced, never copied."""
    source, destination = Path(source), Path(destination)
    model = load_graph_only(source)
    out, report = rewrite_model(model, target=target, residual=residual, prove_fusions=prove_fusions)
    relocate_external_data(out, source.parent, destination.parent)
    try:
        save_model(out, destination, external_data=False)
    except OSError as exc:
        raise NormfuseError(f"{destination}: cannot write ({exc.strerror or exc})") from None
    return report
