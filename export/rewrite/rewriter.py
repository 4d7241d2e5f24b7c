"""Find every norm subgraph, prove it, and replace it with one fused op.

    from export.rewrite import rewrite_file
    report = rewrite_file("model.onnx", "fused.onnx", target="onnxruntime")

Candidates are tried at every possible root, latest in the graph first, with each pattern's
alternatives in order; the first structural match that passes the checks and the numerical
proof is fused. A norm whose every match was rejected is reported with the reasons.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR  # its warnings (colour, bfloat16 numpy) are noise here

from normops import op_for

from ..errors import NormfuseError, UsageError, first_line
from ..onnx_io import (SMALL_EXTERNAL_ELEMENTS, default_opset, inline_small_external_data, load_graph_only, save_model,
                       share_external_data)
from .checks import (FLOAT_TYPES, OVERRIDABLE, NormCandidate, Rejected, build_candidate, constant_value, dtype_name,
                     is_last_axis_mean, near_miss_refusal)
from .fills import per_feature_fills
from .keepdims import restore_keepdims
from .gamma import fold_gamma
from .emit import MS_DOMAIN, TARGETS, UniqueNames, emit, emitted_op, required_opset
from .functions import inline_norm_functions
from .matcher import replace_uses
from .patterns import NORM_PATTERNS, ROOT_OPS
from .proof import prove
from .residual import residual_add, row_preserving_reshape, sum_is_used_elsewhere
from .scopes import (PLACEHOLDER_DIM, Scope, all_nodes, count_nodes, graph_and_bodies, keep_initializers_home,
                     lend_body_shapes, restore_body_names, scopes_of, separate_body_names, unknown_dim,
                     unknown_dims, walk_graphs, without_placeholder_dims)
from .shape_values import ShapeReader, declared_names
from .symbolic import fill_from_symbolic_inference, symbolic_shapes
from .zeros import decided_where, minus_zeros


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
    scope: str = "main"  # the graph holding it: "main", or the path to an If branch / Loop or Scan body
    scale_factor: float = 1.0  # the fused op's scale is the graph's (or ones) times this: 1 / sqrt(hidden) for an L2 norm


@dataclass
class Rejection:
    pattern: str
    reason: str
    nodes: list[str]
    output: str
    scope: str = "main"
    no_norm: bool = False  # a spelling one step from a norm (epsilon outside the root), not a norm left unfused


@dataclass
class RewriteReport:
    target: str
    fused: int = 0
    fusions: list[Fusion] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    residual_skipped: list[dict] = field(default_factory=list)
    unmatched_means: list[str] = field(default_factory=list)  # last-axis ReduceMean nodes no fusion or rejection took
    without_epsilon: list[str] = field(default_factory=list)  # outputs of fused norms the graph adds no epsilon in
    excluded: list[dict] = field(default_factory=list)  # norms left as written on request: {"output", "nodes"}
    nodes_before: int = 0
    nodes_after: int = 0
    opset: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "counts": self.counts}

    @property
    def counts(self) -> dict:
        out: dict[str, int] = {}
        for f in self.fusions:
            out[f.kind] = out.get(f.kind, 0) + 1
        return out


def describe_counts(counts: dict[str, int]) -> str:
    """{"AddRMSNorm": 4, "RMSNorm": 1} as "4 AddRMSNorm, 1 RMSNorm"; "nothing" when empty."""
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "nothing"


def rewrite_model(model: onnx.ModelProto, target: str = "tensorrt", residual: bool = True,
                  prove_fusions: bool = True, exclude: frozenset[str] = frozenset()) -> tuple[onnx.ModelProto, RewriteReport]:
    """Rewrite an in-memory model (external weights may stay unloaded). `exclude`: output tensors of
    norms to leave as written (the fused op's first output keeps the norm's output name); the
    report's `excluded` lists those found (`check_excluded` refuses the others)."""
    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    started = time.perf_counter()
    report = RewriteReport(target=target, nodes_before=count_nodes(model.graph))
    model, inlined = inline_norm_functions(model)
    report.notes += inlined
    opset = default_opset(model)
    # Initializers listed as graph inputs are defaults a caller may override (onnx-graphsurgeon
    # imports them as constants and drops them from the inputs; they are put back below).
    overridable = {i.name for i in model.graph.input} & {t.name for t in model.graph.initializer}
    graph = _import_with_shapes(model)
    mark_overridable(graph, overridable)
    names = UniqueNames.of(graph)  # fresh names for the fills' constants and the fused ops alike
    for scope in scopes_of(graph):
        _type_empty_constants(scope.graph, names)
        report.notes += _drop_identities(scope.graph, scope.outputs, scope.name)
        report.notes += per_feature_fills(scope.graph, scope.outputs, names, scope.name)
        report.notes += restore_keepdims(scope.graph, scope.outputs, names, scope.name)
    # nodes nothing reads (the model's own, or left by the passes above) would make the values they
    # read look shared with them; the scopes are listed again for the nodes the passes added
    graph.cleanup()
    scopes = scopes_of(graph)

    claimed: set[int] = set()  # ids of nodes already taken by a chosen candidate, in any graph
    candidates = []
    for scope in scopes:
        candidates += _find_candidates(scope, target, residual, prove_fusions, opset, report, claimed,
                                       frozenset(exclude))
    needed = max([required_opset(c, target) for c in candidates] + [opset])
    if needed > opset:
        try:
            converted, how = raise_opset(model, needed)
        except NormfuseError as why:  # refuse those fusions, with the reason; the others go ahead
            kept = [c for c in candidates if required_opset(c, target) <= opset]
            report.rejected += [Rejection(c.pattern.name, str(why), c.node_names, c.output.name, c.scope.name)
                                for c in candidates if required_opset(c, target) > opset]
            candidates = kept
        else:
            note = (f"raised the model's opset from {opset} to {needed} for "
                    f"{'RMSNormalization' if needed >= 23 else 'LayerNormalization'} ({how})")
            if converted is not None:  # the converter rewrote nodes: find the norms again in its output
                return _rewrite_converted(converted, [note] + inlined, target, residual, prove_fusions, report, started,
                                          exclude)
            report.notes.insert(0, note)  # renumbering changes no node: the candidates stand as proven
            opset = needed
    for candidate in candidates:
        note = fold_gamma(candidate)
        if note:
            report.notes.append(note)
        emit(candidate.scope.graph, candidate, target, names)
        report.fusions.append(_fusion_record(candidate, target))
    report.fused = len(report.fusions)
    # a vector's length, ReduceL2, has no epsilon to lose: its norms are noted as L2 norms below
    report.without_epsilon = [c.output.name for c in candidates if not c.pattern.native and "eps" not in c.match.tensors
                              and not any(n.op == "ReduceL2" for n in c.nodes)]
    if report.without_epsilon:
        report.notes.append(describe_without_epsilon(report.without_epsilon))
    l2_norms = [c.output.name for c in candidates if c.pattern.row_sum]
    if l2_norms:
        report.notes.append(describe_l2_norms(l2_norms))

    graph.cleanup().toposort()
    report.unmatched_means = _means_in_no_norm(graph, report)
    if report.unmatched_means:
        report.notes.append(describe_unmatched_means(report.unmatched_means))
    unnamed = [attr.t for node in all_nodes(model) for attr in node.attribute
               if attr.type == onnx.AttributeProto.TENSOR and not attr.t.HasField("name")]
    out = gs.export_onnx(graph, do_type_check=False)
    for tensor in unnamed:  # onnx-graphsurgeon writes the name "" into the caller's Constant values
        tensor.ClearField("name")
    out.ir_version = model.ir_version
    keep_initializers_home(out, model)
    kept = {t.name for t in out.graph.initializer} - {i.name for i in out.graph.input}
    out.graph.input.extend(i for i in model.graph.input if i.name in overridable & kept)
    _set_opsets(out, model, opset, target, report)
    _restore_metadata(out, model)
    report.nodes_after = count_nodes(out.graph)
    report.opset = opset
    report.seconds = round(time.perf_counter() - started, 3)
    return out, report


def check_excluded(exclude, reports: list[RewriteReport], where: str) -> None:
    """A UsageError for a name given to exclude that ends no norm the rewrite found in `reports`."""
    unknown = sorted(set(exclude) - {e["output"] for r in reports for e in r.excluded})
    if unknown:
        names = list(dict.fromkeys(f.output for r in reports for f in r.fusions))  # an If's branches share names
        ends = ", ".join(f"'{n}'" for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        raise UsageError(f"--exclude {unknown[0]}: no norm that would be fused ends at a tensor of that name in "
                         f"{where} (the norms fused end at: {ends or 'none'})")


def check_excluded_before_writing(models: list[Path], exclude, where: str, **options) -> None:
    """`check_excluded` over a folder's `models` before any is written: each rewritten as
    `rewrite_file(model, None, **options)` would, writing nothing (another model may hold the name
    one lacks, so only the folder as a whole can refuse it)."""
    if exclude:
        check_excluded(exclude, [rewrite_file(model, None, exclude=frozenset(exclude), check_exclude=False, **options)
                                 for model in models], where)


def _means_in_no_norm(graph: gs.Graph, report: RewriteReport) -> list[str]:
    """The last-axis means left in the graph that no fusion took and no rejection names: a norm
    spelled in a way not recognised (or quantised between its steps, which makes it no exact norm),
    worth a look when a model's count of fused norms is short."""
    rejected = {name for r in report.rejected for name in r.nodes} | {n for e in report.excluded for n in e["nodes"]}
    return [node.name or node.outputs[0].name for sub in walk_graphs(graph) for node in sub.nodes
            if is_last_axis_mean(node) and node.name not in rejected]


def describe_unmatched_means(names: list[str]) -> str:
    shown = _first_names(names)
    return (f"{len(names)} ReduceMean node(s) over the last axis are in no norm found and no rejection ({shown}): "
            "a norm spelled in a way not recognised or quantised between its steps, or a mean that is part of no "
            "norm (ConvNeXt-V2's response normalization averages its channels' L2 norms)")


def _first_names(names: list[str]) -> str:
    """Up to three names, quoted, and how many more there are."""
    return ", ".join(f"'{name}'" for name in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def describe_without_epsilon(outputs: list[str]) -> str:
    shown = _first_names(outputs)
    return (f"{len(outputs)} norm(s) add no epsilon ({shown}), so they are fused with epsilon 0, as written: a row of "
            "zeros gives NaN. torch's exporter removes an epsilon of 1e-8 or less as an Add of zero; export with "
            "optimize=False to keep it")


def describe_l2_norms(outputs: list[str]) -> str:
    shown = _first_names(outputs)
    return (f"{len(outputs)} L2 norm(s) ({shown}), x / sqrt(sum(x^2) + eps) over the last axis, fused as the RMSNorm "
            "they equal: epsilon eps / n and the scale times 1 / sqrt(n), n the row length (x / ReduceL2(x) has "
            "epsilon 0: a row of zeros gives NaN, as in the graph, and a row whose mean square underflows fp32, "
            "its root mean square below about 3e-23, gives inf where the graph's sum of squares may stay finite)")


def _rewrite_converted(converted, notes, target, residual, prove_fusions, report, started, exclude):
    out, raised_report = rewrite_model(converted, target=target, residual=residual, prove_fusions=prove_fusions,
                                       exclude=exclude)
    raised_report.notes[0:0] = notes  # the opset raised, and the functions inlined before
    raised_report.nodes_before = report.nodes_before
    raised_report.seconds = round(time.perf_counter() - started, 3)
    return out, raised_report


# Ops whose schema changed between opset 18 and 23 in a way that alters the meaning of an existing
# model: DFT's axis became an input whose default is -2, not 1 (20), GridSample's modes were renamed
# ('bilinear' is 'linear', 20), GroupNormalization's scale and bias went from per group to per
# channel (21). Every other change in that range only adds types, or attributes whose default keeps
# the old behaviour (compared schema by schema in onnx 1.23). A model using one of these is raised by
# onnx's version converter, which rewrites those nodes, not by renumbering.
CHANGED_MEANING_AFTER_18 = frozenset({"DFT", "GridSample", "GroupNormalization"})


def raise_opset(model: onnx.ModelProto, target_opset: int) -> tuple[onnx.ModelProto | None, str]:
    """How `model` reaches `target_opset`: (None, how) when renumbering its opset is enough (opset >= 18,
    no op whose meaning changes), else (onnx's version converter's output, how). NormfuseError when
    neither can."""
    opset = default_opset(model)
    blocked = []
    if opset >= 18:
        used = {n.op_type for n in all_nodes(model) if n.domain in ("", "ai.onnx")}
        blocked = sorted(used & CHANGED_MEANING_AFTER_18)
        if not blocked:
            return None, "no op in the graph changes meaning between the two"
    changed = f"{', '.join(blocked)} change(s) meaning after opset 18" if blocked else ""
    try:
        from onnx import version_converter

        converted = version_converter.convert_version(model, target_opset)
        if blocked:  # the converter can write nodes it has no adapter for as they were: checked
            onnx.checker.check_model(converted)
        return converted, "onnx's version converter" + (f", as {changed}" if changed else "")
    except Exception as exc:  # the converter raises RuntimeError or its own types
        raise NormfuseError(f"target 'onnx' needs opset {target_opset}, but onnx's version converter cannot raise "
                            f"opset {opset}" + (f" (and renumbering would not do: {changed})" if changed else "")
                            + f": {first_line(exc, 200)}; use --target onnxruntime or tensorrt") from None


def _import_with_shapes(model: onnx.ModelProto) -> gs.Graph:
    """The graph with inferred shapes, without copying or reading weights.

    Shape inference runs on a copy of the graph whose large initializers carry dims but no bytes, so
    a model of any size (weights external, or loaded in memory past protobuf's 2 GiB) is inferred;
    the inferred value_info is lent to the model for the import and removed again after it.
    """
    # Shapes a tool saved with placeholder dims (onnx's inference names each unknown dim afresh,
    # `unk__57`; onnxsim and onnxslim save them) can never be proven equal to the model's own dims
    # (batch, seq). Inference gets them with those dims blank (the rank still helps it) and may
    # name them now; a dim it leaves unknown keeps its saved placeholder (`_keep_saved_placeholders`).
    # Entries saved with a type but no shape (onnx's version converter writes 128 of them for
    # PP-OCRv4's recogniser) would stand in for what inference finds: they are left out too.
    saved_value_info = list(model.graph.value_info)
    placeholders = [v for v in saved_value_info if _has_placeholder_dims(v)]
    shapeless = [v for v in saved_value_info if _shapeless_tensor(v)]
    declared = [onnx.ValueInfoProto() for _ in model.graph.output]
    for saved, output in zip(declared, model.graph.output):
        saved.CopyFrom(output)
    restore: list = []
    try:  # whatever happens, the model leaves as it came
        if placeholders or shapeless:
            del model.graph.value_info[:]
            model.graph.value_info.extend(v for v in saved_value_info if not _has_placeholder_dims(v)
                                          and not _shapeless_tensor(v))
        skeleton = onnx.ModelProto()
        _copy_without_weights(model, skeleton)
        skeleton.graph.value_info.extend(without_placeholder_dims(v) for v in placeholders)
        for body in list(graph_and_bodies(skeleton.graph))[1:]:  # placeholders saved in bodies are no names either
            for value in body.value_info:
                value.CopyFrom(without_placeholder_dims(value))
        inferred = _inferred_shapes(skeleton)
        # The model's declared inputs and outputs are its interface: an inferred entry under such a
        # name (ONNX Runtime's symbolic inference names an If's outputs afresh) would replace the
        # declared dims (batch_size, ...) in the rewritten model, and everything sized by name with them
        known = {v.name for v in model.graph.value_info} | {v.name for v in model.graph.input}
        known |= {v.name for v in model.graph.output if v.type.tensor_type.HasField("shape")}
        lent = [v for v in inferred.graph.value_info if v.name not in known]
        _keep_saved_placeholders(lent, placeholders)
        model.graph.value_info.extend(lent)
        inferred_outputs = {o.name: o for o in inferred.graph.output}
        for output in model.graph.output:  # graph outputs declared without a shape get the inferred one
            found = inferred_outputs.get(output.name)
            if found is not None and not output.type.tensor_type.HasField("shape"):
                output.CopyFrom(found)
        lend_body_shapes(model.graph, inferred.graph, restore)
        graph = gs.import_onnx(model)
        # onnx-graphsurgeon keeps the model's own opset list, and adds the fused ops' domain to it
        graph.import_domains = [onnx.helper.make_opsetid(o.domain, o.version) for o in model.opset_import]
        return graph
    finally:
        del model.graph.value_info[:]
        model.graph.value_info.extend(saved_value_info)
        for saved, output in zip(declared, model.graph.output):
            output.CopyFrom(saved)
        for undo in reversed(restore):
            undo()


_LAST_INFERRED: dict[bytes, bytes] = {}  # the last skeleton's digest -> its inferred copy, serialized


def _inferred_shapes(skeleton: onnx.ModelProto) -> onnx.ModelProto:
    """The skeleton with the shapes onnx's inference finds, completed by ONNX Runtime's symbolic
    inference where it needs to be. The last result is kept: a build rewrites one model for three
    targets, and the symbolic inference of a 10,000-node graph takes about 2 s."""
    key = hashlib.sha256(skeleton.SerializeToString(deterministic=True)).digest()
    if key in _LAST_INFERRED:
        return onnx.load_from_string(_LAST_INFERRED[key])
    renamed = separate_body_names(skeleton.graph)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    except Exception:  # inference is best effort: a candidate without shapes is rejected with its reason
        inferred = skeleton
    if any(n.domain not in ("", "ai.onnx") for n in skeleton.graph.node) or _dims_left_unknown(inferred):
        symbolic = symbolic_shapes(skeleton)
        fill_from_symbolic_inference(inferred.graph, symbolic.graph if symbolic is not None else None)
    if renamed:
        restore_body_names(inferred.graph)
    _LAST_INFERRED.clear()
    _LAST_INFERRED[key] = inferred.SerializeToString()
    return inferred


def _shapeless_tensor(value: onnx.ValueInfoProto) -> bool:
    return value.type.HasField("tensor_type") and not value.type.tensor_type.HasField("shape")


def _has_placeholder_dims(value: onnx.ValueInfoProto) -> bool:
    return any(PLACEHOLDER_DIM.fullmatch(d.dim_param) for d in value.type.tensor_type.shape.dim)


def _keep_saved_placeholders(inferred: list, saved: list) -> None:
    """Where inference left a dim unknown that the saved shape named by a placeholder, the saved
    name stays, prefixed so it never meets a fresh placeholder of this inference: the saved
    inference found those dims equal, and that still holds."""
    saved_by_name = {v.name: v.type.tensor_type.shape.dim for v in saved}
    for value in inferred:
        old = saved_by_name.get(value.name)
        new = value.type.tensor_type.shape.dim
        if old is None or len(old) != len(new):
            continue
        for now, before in zip(new, old):
            if unknown_dim(now) and PLACEHOLDER_DIM.fullmatch(before.dim_param):
                now.dim_param = f"saved_{before.dim_param}"


EMPTY_LIST_CONSTANTS = {"value_ints": np.int64, "value_floats": np.float32}


def _type_empty_constants(graph: gs.Graph, names: UniqueNames) -> None:
    """A Constant of an empty list (torch writes `value_ints=[]`) as the same empty tensor:
    onnx-graphsurgeon keeps a list attribute as a Python list, and an empty one has no type to
    write back."""
    for node in graph.nodes:
        if node.op != "Constant" or len(node.attrs) != 1:
            continue
        (key, value), = node.attrs.items()
        if key in EMPTY_LIST_CONSTANTS and len(value) == 0:
            node.attrs = {"value": gs.Constant(names(f"{node.name or 'constant'}_value"),
                                               np.zeros((0,), EMPTY_LIST_CONSTANTS[key]))}


def _dims_left_unknown(model: onnx.ModelProto) -> bool:
    """Whether onnx's inference left a dim unnamed (a Reshape to -1 of a dynamic shape, as
    TorchScript exports write `x.view(-1, seq)`), or a tensor without a shape, in any graph."""
    return any(unknown_dims(value) != 0 for graph in graph_and_bodies(model.graph) for value in graph.value_info)


SKELETON_CONSTANT = 256  # elements: initializers up to this size keep their values for shape inference


def _copy_without_weights(model: onnx.ModelProto, out: onnx.ModelProto) -> None:
    out.CopyFrom(onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import))
    out.graph.CopyFrom(onnx.GraphProto(node=model.graph.node, input=model.graph.input, output=model.graph.output,
                                       value_info=model.graph.value_info, name=model.graph.name))
    for tensor in model.graph.initializer:
        stub = out.graph.initializer.add()
        stub.name, stub.data_type = tensor.name, tensor.data_type
        stub.dims.extend(tensor.dims)
        # Sized from its dims: reading raw_data to measure it would copy every weight's bytes.
        if tensor.data_location != onnx.TensorProto.EXTERNAL and math.prod(tensor.dims) <= SKELETON_CONSTANT:
            if tensor.HasField("raw_data"):  # set even empty, raw_data would hide int64_data and the like
                stub.raw_data = tensor.raw_data  # small constants (axes, epsilon, shapes) matter to inference
            stub.float_data.extend(tensor.float_data)
            stub.double_data.extend(tensor.double_data)
            stub.uint64_data.extend(tensor.uint64_data)
            stub.int64_data.extend(tensor.int64_data)
            stub.int32_data.extend(tensor.int32_data)
        else:
            stub.data_location = onnx.TensorProto.EXTERNAL
            stub.external_data.add(key="location", value="weights-not-read")


def mark_overridable(graph: gs.Graph, overridable: set) -> None:
    """Mark the constants a caller may override (checks.OVERRIDABLE): no pass reads their value
    (checks.constant_value gives none), and the fused op reads them as they are, never a copy. A
    body reading one has a tensor of its own under that name (ONNX names are unique across scopes)."""
    for sub in walk_graphs(graph):
        for tensor in sub.tensors().values():
            if isinstance(tensor, gs.Constant) and tensor.name in overridable:
                setattr(tensor, OVERRIDABLE, True)


def _drop_identities(graph: gs.Graph, graph_outputs: set, scope: str = "main") -> list[str]:
    """Bypass nodes that give their input back unchanged: Identity (paddle2onnx writes one after
    each residual Add), a Cast to the dtype its input already has (TorchScript's `x.float()` on
    fp32 x, whose output it then reuses for the residual), a Mul by a constant 1 that broadcasts
    nothing (paddle2onnx writes `var + eps` as Mul(var, 1) + eps) and a Sub of zeros broadcast to the
    rows that cannot grow x (Flax's RMSNorm through jax2tf, `zeros.py`) and a Where whose condition
    is a constant (jax2onnx's guard on jnp.var's divisor, `zeros.py`). Each would hide a norm's parts."""
    reader = ShapeReader(declared_names(graph))
    dropped = {"Identity": 0, "Cast": 0, "Mul": 0, "Sub": 0, "Where": 0}
    for node in graph.nodes:
        if node.op not in dropped or (node.domain or "") not in ("", "ai.onnx") or not node.outputs \
                or node.outputs[0].name in graph_outputs:
            continue
        source, out = node.inputs[0], node.outputs[0]
        if node.op == "Cast" and (source.dtype is None or dtype_name(source) != FLOAT_TYPES.get(int(node.attrs.get("to", -1)))):
            continue
        if node.op in ("Mul", "Sub", "Where"):
            source = {"Mul": _times_one, "Sub": minus_zeros, "Where": decided_where}[node.op](node, reader)
            if source is None:
                continue
        replace_uses(out, source)
        # inputs too: a dead node still listed among its source's consumers would make that
        # tensor look used outside a norm (a Cast before gamma's Mul kept gamma out of the fusion)
        node.inputs.clear()
        node.outputs.clear()
        dropped[node.op] += 1
    where = "" if scope == "main" else f" in {scope}"
    what = {"Identity": "Identity node(s)", "Cast": "identity Cast node(s)", "Mul": "Mul(s) by 1",
            "Sub": "subtraction(s) of zeros broadcast to the rows", "Where": "Where(s) with a constant condition"}
    said = [f"{n} {what[op]}" for op, n in dropped.items() if n]
    return [f"bypassed {', '.join(said)}{where}"] if said else []


def _times_one(node: gs.Node, reader=None) -> gs.Tensor | None:
    """The operand of Mul(t, 1) when the product is t itself: the other operand a constant 1 with
    one element and no more axes than t (so it broadcasts nothing), of t's dtype."""
    inputs = list(node.inputs)
    if len(inputs) != 2:
        return None
    for t, c in (inputs, inputs[::-1]):
        if c.shape is None or any(not isinstance(d, int) for d in c.shape) or math.prod(c.shape) != 1:
            continue
        one = constant_value(c)
        if one is None or float(one.reshape(())) != 1.0 or t.shape is None:
            continue
        if len(c.shape) <= len(t.shape) and dtype_name(t) is not None and dtype_name(t) == dtype_name(c):
            return t
    return None


def _find_candidates(scope: Scope, target, residual, prove_fusions, opset, report, claimed,
                     exclude: frozenset[str] = frozenset()) -> list[NormCandidate]:
    graph = scope.graph
    norms: list[NormCandidate] = []
    chosen: list[NormCandidate] = []
    rejected: dict[str, Rejection] = {}
    settled: set[str] = set()  # nodes of norms read one way that passed: another reading's rejection is moot
    roots = [out for node in reversed(graph.nodes) if node.op in ROOT_OPS for out in node.outputs[:1]]
    for root in roots:
        if _already_target_op(root, target):
            continue
        candidate = _first_passing(root, scope, claimed, prove_fusions and not scope.blocked, opset, rejected)
        if candidate is None:
            continue
        if root.name in exclude:  # left as written on request; its nodes claimed, so no part of it fuses either
            claimed.update(id(n) for n in candidate.nodes)
            settled.update(candidate.node_names)
            report.excluded.append({"output": root.name, "nodes": list(candidate.node_names)})
            report.notes.append(f"left the norm ending at '{root.name}' as written (excluded)")
            continue
        if scope.blocked:  # a norm by its structure and constants, but its shapes cannot be trusted here
            rejected.setdefault(_anchor(candidate.match), Rejection(candidate.pattern.name, scope.blocked,
                                                                    candidate.node_names, root.name, scope.name))
            continue
        candidate.scope = scope
        if candidate.pattern.skip and target != "tensorrt":
            # already ONNX Runtime's fused form; the onnx target has no residual op
            report.notes.append(f"left {candidate.pattern.name.split('-')[0]} '{candidate.nodes[0].name}' as it is "
                                f"for the {target} target")
            settled.update(candidate.node_names)
            continue
        claimed.update(id(n) for n in candidate.nodes)
        norms.append(candidate)
    # Residual Adds only once every norm is found: an Add that ends another norm (Keras' LayerNorm
    # ends in one) is that norm's, not a residual of the norm reading its output.
    for candidate in norms:
        if not candidate.pattern.skip and residual and target != "onnx":
            _attach_residual(candidate, scope, claimed, report)
        if _is_noop(candidate, target):  # already the target's op, e.g. a LayerNormalization after a cast to fp16
            claimed.difference_update(id(n) for n in candidate.nodes)
            settled.update(candidate.node_names)
            continue
        if candidate.residual is not None:
            claimed.add(id(candidate.residual[2]))
        chosen.append(candidate)
    settled.update(name for c in chosen for name in c.node_names)
    report.rejected += [r for r in rejected.values() if not (set(r.nodes) & settled)]
    return chosen


def _attach_residual(candidate: NormCandidate, scope: Scope, claimed: set, report) -> None:
    """Fuse the residual Add in front of the norm when it is this scope's and no other fusion's."""
    root = candidate.output
    found, why = residual_add(candidate, scope.outputs)
    if found is not None and id(found[2]) not in scope.members:
        report.residual_skipped.append({"output": root.name, "reason": f"Add '{found[2].name}' is in the "
                                        f"enclosing graph, not in {scope.name}"})
    elif found is not None and id(found[2]) not in claimed:
        candidate.residual = found
        candidate.through_reshape = row_preserving_reshape(candidate)  # None: the Add feeds x
        if candidate.through_reshape is not None:
            candidate.sum_tensor = found[2].outputs[0]
        candidate.expose_sum = sum_is_used_elsewhere(candidate, scope.outputs)
    elif why:
        report.residual_skipped.append({"output": root.name, "reason": why})


def _first_passing(root, scope: Scope, claimed, prove_fusions, opset, rejected) -> NormCandidate | None:
    for norm in NORM_PATTERNS:
        for match in norm.pattern.matches(root):
            if any(id(n) in claimed for n in match.nodes):
                continue
            try:
                outside = [n.name for n in match.nodes if id(n) not in scope.members]
                if outside:  # the fused op would move nodes of the enclosing graph into this body
                    raise Rejected(f"the match reaches into the enclosing graph (node '{outside[0]}')")
                if norm.refusal:  # the near misses come last: one refusal a root is the whole story
                    rejected.setdefault(_anchor(match), Rejection(norm.name, near_miss_refusal(norm, match),
                                                                  [n.name for n in match.nodes], root.name, scope.name,
                                                                  no_norm=True))
                    return None
                candidate = build_candidate(norm, match, root, scope.outputs)
                if prove_fusions:
                    prove(candidate, opset)
                return candidate
            except Exception as exc:  # Rejected, or a graph this code did not foresee: never fused, never fatal
                why = str(exc) if isinstance(exc, Rejected) else f"could not be checked ({exc.__class__.__name__}: {exc})"
                key = _anchor(match)
                if key not in rejected:
                    rejected[key] = Rejection(norm.name, why, [n.name for n in match.nodes], root.name, scope.name)
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
    domain, op_type = emitted_op(candidate, target)
    removed = list(candidate.node_names)
    if candidate.residual is not None and candidate.residual[2].name not in removed:
        removed.append(candidate.residual[2].name)
    return Fusion(
        kind=op_for(candidate.centered, candidate.residual is not None).name,
        emitted=f"{domain or 'ai.onnx'}::{op_type}", pattern=candidate.pattern.name,
        residual=candidate.residual is not None, sum_exposed=candidate.expose_sum,
        epsilon=candidate.epsilon, hidden=candidate.hidden, nodes_removed=removed, output=candidate.output.name,
        scope=candidate.scope.name if candidate.scope is not None else "main", scale_factor=candidate.scale_factor,
    )


def _set_opsets(out: onnx.ModelProto, original: onnx.ModelProto, opset: int, target: str, report: RewriteReport) -> None:
    """The original's opsets, the default domain at `opset`, and the domains of the emitted ops."""
    versions = {e.domain: opset if e.domain in ("", "ai.onnx") else e.version for e in original.opset_import}
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


def rewrite_file(source: str | Path, destination: str | Path | None, target: str = "tensorrt", residual: bool = True,
                 prove_fusions: bool = True, exclude: frozenset[str] = frozenset(),
                 check_exclude: bool = True, before_writing=None) -> RewriteReport:
    """Rewrite `source` into `destination` (None: write nothing, report what would be done). The
    rewrite never reads external weights. Written beside the source, the output references the same
    weight files; in another directory it gets copies of them, since ONNX Runtime and onnx load
    external data only from the model's own directory (`onnx_io.share_external_data`). A name in
    `exclude` that ends no norm here is a UsageError before anything is written, unless
    `check_exclude` is off (a folder's models, where another model may have it). `before_writing`
    gets the report once the rewrite is done and before the model is written (the CLI's --report,
    which should not fail after it)."""
    source = Path(source)
    model = load_graph_only(source)
    inlined = inline_small_external_data(model, source.parent)
    out, report = rewrite_model(model, target=target, residual=residual, prove_fusions=prove_fusions, exclude=exclude)
    if inlined:
        report.notes.append(f"read {inlined} external tensor(s) of at most {SMALL_EXTERNAL_ELEMENTS} values "
                            "(constants such as axes and epsilon) into the model; the weights stay external")
    if check_exclude:
        check_excluded(exclude, [report], str(source))
    if destination is None:
        return report
    destination = Path(destination)
    report.notes += share_external_data(out, source.parent, destination.parent)
    if before_writing is not None:
        before_writing(report)
    try:
        save_model(out, destination, external_data=False)
    except OSError as exc:
        raise NormfuseError(f"{destination}: cannot write ({exc.strerror or exc})") from None
    return report
