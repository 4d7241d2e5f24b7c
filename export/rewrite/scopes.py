"""The graphs of a model the rewriter works in: the main graph and the If/Loop/Scan bodies nested
in it, with why a body's norms may not be fused, and the protobuf walks over them (node counts,
every node, shapes inference found inside bodies, initializers kept in the main graph)."""
from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs


def node_bodies(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs held in a node's attributes (If branches, Loop and Scan bodies, ...)."""
    bodies: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            bodies.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            bodies.extend(attr.graphs)
    return bodies


def walk_graphs(graph: gs.Graph):
    """`graph` and every graph nested in its nodes' attributes (If branches, Loop and Scan bodies), depth first."""
    yield graph
    for node in graph.nodes:
        for value in node.attrs.values():
            for sub in (value if isinstance(value, (list, tuple)) else [value]):
                if isinstance(sub, gs.Graph):
                    yield from walk_graphs(sub)


def graph_and_bodies(graph: onnx.GraphProto):
    """The graph and every If/Loop/Scan body in it, to any depth (protobuf; `walk_graphs` walks
    onnx-graphsurgeon's)."""
    yield graph
    for node in graph.node:
        for body in node_bodies(node):
            yield from graph_and_bodies(body)


def count_nodes(graph: onnx.GraphProto) -> int:
    """Nodes of a graph and of the If/Loop/Scan bodies nested in it (a local function's call counts once)."""
    return len(graph.node) + sum(count_nodes(body) for node in graph.node for body in node_bodies(node))


def walk_nodes(nodes):
    """The nodes and, after each, the nodes of the bodies nested in it, depth first."""
    for node in nodes:
        yield node
        for body in node_bodies(node):
            yield from walk_nodes(body.node)


def all_nodes(model: onnx.ModelProto):
    """Every node of the model: the main graph, nested bodies and local functions."""
    yield from walk_nodes(model.graph.node)
    for function in model.functions:
        yield from walk_nodes(function.node)


BODY_SUFFIX = re.compile(r"__normfuse_body\d+$")


def separate_body_names(graph: onnx.GraphProto) -> bool:
    """Names that more than one graph of the model defines get a suffix of their body's own, in
    place (on the copy shape inference runs on); whether any did. Optimum's merged decoders hold
    two versions of the decoder in the branches of one If under the same names, and onnx's data
    propagation keeps the values it works out by name: the else branch read the then branch's (the
    shape of a 3-D tensor for that of a 1-D one), and the shapes it gave ONNX Runtime refused."""
    defined: Counter = Counter()

    def count(g: onnx.GraphProto) -> None:
        defined.update(v.name for v in g.input)
        defined.update(t.name for t in g.initializer)
        defined.update(name for node in g.node for name in node.output if name)
        for node in g.node:
            for body in node_bodies(node):
                count(body)

    count(graph)
    shared = {name for name, times in defined.items() if times > 1}
    if not shared:
        return False
    numbers = itertools.count()

    def rename(g: onnx.GraphProto, outer: dict, is_body: bool) -> None:
        mapping = dict(outer)
        if is_body:
            suffix = f"__normfuse_body{next(numbers)}"
            local = [v.name for v in g.input] + [t.name for t in g.initializer] + [o for n in g.node for o in n.output]
            mapping.update({name: name + suffix for name in local if name in shared})
        for value in [*g.input, *g.output, *g.value_info, *g.initializer]:
            value.name = mapping.get(value.name, value.name)
        for node in g.node:
            node.input[:] = [mapping.get(name, name) for name in node.input]
            node.output[:] = [mapping.get(name, name) for name in node.output]
            for body in node_bodies(node):
                rename(body, mapping, True)

    rename(graph, {}, False)
    return True


def restore_body_names(graph: onnx.GraphProto) -> None:
    """Undo `separate_body_names` on the names of the bodies' inputs, outputs and value_info."""
    for node in graph.node:
        for body in node_bodies(node):
            for value in [*body.input, *body.output, *body.value_info]:
                value.name = BODY_SUFFIX.sub("", value.name)
            restore_body_names(body)


def keep_initializers_home(out: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """onnx-graphsurgeon writes a constant of the enclosing graph that only a body reads into that
    body's initializers (one copy per body). The main graph's initializers go back where they were:
    weights are not copied, and an initializer that is also a graph input stays overridable."""
    main = {t.name for t in model.graph.initializer}
    present = {t.name for t in out.graph.initializer}
    moved = set()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            for body in node_bodies(node):
                if any(t.name in main for t in body.initializer):
                    own = [onnx.TensorProto() for t in body.initializer if t.name not in main]
                    for copy, t in zip(own, [t for t in body.initializer if t.name not in main]):
                        copy.CopyFrom(t)
                    moved.update(t.name for t in body.initializer if t.name in main)
                    del body.initializer[:]
                    body.initializer.extend(own)
                visit(body)

    visit(out.graph)
    out.graph.initializer.extend(t for t in model.graph.initializer if t.name in moved - present)


PLACEHOLDER_DIM = re.compile(r"unk__\d+")  # the name onnx's inference gives a dim it cannot work out


def unknown_dim(dim) -> bool:
    """A dim with no size and no name but a placeholder's."""
    return not dim.HasField("dim_value") and (not dim.dim_param or bool(PLACEHOLDER_DIM.fullmatch(dim.dim_param)))


def without_placeholder_dims(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    """A copy of `value` whose placeholder dims (`unk__57`) are blank: they name nothing."""
    blank = onnx.ValueInfoProto()
    blank.CopyFrom(value)
    for dim in blank.type.tensor_type.shape.dim:
        if PLACEHOLDER_DIM.fullmatch(dim.dim_param):
            dim.Clear()
    return blank


def unknown_dims(value: onnx.ValueInfoProto) -> int:
    """Unknown dims of a value (`unknown_dim`), or -1 when it has no shape at all."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return -1
    return sum(map(unknown_dim, tensor.shape.dim))


def _replace_placeholder_shapes(body: onnx.GraphProto, seen_body: onnx.GraphProto, restore: list) -> None:
    """Shapes a tool saved into a body with placeholder dims (ONNX Runtime's quantisers save them
    into a merged decoder's branches) give way to what this inference knows better, as in the main
    graph: `unk__97` can never be shown equal to `batch_size`."""
    seen = {v.name: v for v in seen_body.value_info}
    for mine in body.value_info:
        better = seen.get(mine.name)
        if (better is None or unknown_dims(mine) <= 0 or better.type.tensor_type.elem_type != mine.type.tensor_type.elem_type
                or not 0 <= unknown_dims(better) < unknown_dims(mine)):
            continue
        saved = onnx.ValueInfoProto()
        saved.CopyFrom(mine)
        mine.CopyFrom(better)
        restore.append(lambda mine=mine, saved=saved: mine.CopyFrom(saved))


def lend_body_shapes(graph: onnx.GraphProto, inferred: onnx.GraphProto, restore: list) -> None:
    """What inference found inside If/Loop/Scan bodies (value_info, and body inputs and outputs
    declared without a shape), lent to the model's bodies like the main graph's; `restore` gets
    the undo steps. Bodies are paired node by node; a graph whose nodes do not pair is skipped."""
    if len(graph.node) != len(inferred.node):
        return
    for node, seen in zip(graph.node, inferred.node):
        if node.op_type != seen.op_type or len(node.attribute) != len(seen.attribute):
            continue
        for attr, seen_attr in zip(node.attribute, seen.attribute):
            if attr.type == onnx.AttributeProto.GRAPH and seen_attr.type == attr.type:
                pairs = [(attr.g, seen_attr.g)]
            elif attr.type == onnx.AttributeProto.GRAPHS and len(attr.graphs) == len(seen_attr.graphs):
                pairs = list(zip(attr.graphs, seen_attr.graphs))
            else:
                continue
            for body, seen_body in pairs:
                _replace_placeholder_shapes(body, seen_body, restore)
                known = {v.name for v in body.value_info}
                before = len(body.value_info)
                body.value_info.extend(v for v in seen_body.value_info if v.name not in known)
                restore.append(lambda body=body, before=before: body.value_info.__delitem__(slice(before, None)))
                for mine, theirs in list(zip(body.input, seen_body.input)) + list(zip(body.output, seen_body.output)):
                    if (mine.name == theirs.name and not mine.type.tensor_type.HasField("shape")
                            and theirs.type.tensor_type.HasField("shape")):
                        saved = onnx.ValueInfoProto()
                        saved.CopyFrom(mine)
                        mine.CopyFrom(theirs)
                        restore.append(lambda mine=mine, saved=saved: mine.CopyFrom(saved))
                lend_body_shapes(body, seen_body, restore)


@dataclass(eq=False)
class Scope:
    """One graph of the model: the main graph, or a body nested in a node attribute (If branch,
    Loop or Scan body), with what matching in it needs to know."""

    graph: gs.Graph
    name: str  # "main", or the path of node attributes leading to it
    outputs: set  # names of its outputs (a body's outputs are what the enclosing node reads)
    members: set  # ids of its own nodes: a match must not reach into an enclosing graph
    blocked: str | None = None  # why nothing in it may be fused (its shapes cannot be trusted)


# Control-flow ops whose graph attributes run as bodies with the enclosing graph's values in scope.
BODIES = {"If": ("then_branch", "else_branch"), "Loop": ("body",), "Scan": ("body",)}


def scopes_of(graph: gs.Graph) -> list[Scope]:
    """The main graph and every graph nested in it (depth first), each with its blocking reason."""
    found: list[Scope] = []

    def visit(g: gs.Graph, name: str, blocked: str | None) -> None:
        found.append(Scope(g, name, {t.name for t in g.outputs}, {id(n) for n in g.nodes}, blocked))
        for node in g.nodes:
            for key, value in node.attrs.items():
                subs = [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, gs.Graph)]
                for i, sub in enumerate(subs):
                    where = f"{name}/{node.op} '{node.name}'.{key}" + (f"[{i}]" if isinstance(value, (list, tuple)) else "")
                    visit(sub, where, blocked or body_blocked(node, key, sub))

    visit(graph, "main", None)
    return found


def body_blocked(node: gs.Node, key: str, body: gs.Graph) -> str | None:
    """Why the norms of `body` may not be fused, or None when its inferred shapes hold every time it runs.

    If branches see the enclosing graph's values as they are. Loop and Scan bodies run once per
    iteration with state carried from one iteration to the next: a shape inferred from the initial
    state (Scan) or declared on the body (Loop) holds in every iteration only when the body gives
    the state back with that same shape, fully known."""
    where = f"{node.op} '{node.name}'"
    if (node.domain or "") not in ("", "ai.onnx") or key not in BODIES.get(node.op, ()):
        return f"graph attribute '{key}' of {node.domain or 'ai.onnx'}::{node.op} '{node.name}' is not an If, Loop or Scan body"
    if node.op == "If":
        return None
    if node.op == "Loop":
        carried = len(node.inputs) - 2
        pairs = [(node.inputs[2 + k], body.inputs[2 + k] if len(body.inputs) > 2 + k else None,
                  body.outputs[1 + k] if len(body.outputs) > 1 + k else None) for k in range(max(carried, 0))]
    else:
        states = len(node.inputs) - int(node.attrs.get("num_scan_inputs", 0))
        pairs = [(node.inputs[k], body.inputs[k] if len(body.inputs) > k else None,
                  body.outputs[k] if len(body.outputs) > k else None) for k in range(max(states, 0))]
    for initial, state_in, state_out in pairs:
        if state_in is None or state_out is None:
            return f"{where}: its body does not declare every carried state"
        if state_in.shape is None:
            continue  # nothing in the body was inferred from this state's shape
        shapes = [initial.shape, state_in.shape, state_out.shape]
        known = all(s is not None and all(isinstance(d, int) or (isinstance(d, str) and d) for d in s) for s in shapes)
        if not known or not (list(shapes[0]) == list(shapes[1]) == list(shapes[2])):
            return (f"{where}: carried state '{state_in.name}' has shape {_shape(state_in.shape)} in the body, but starts as "
                    f"{_shape(initial.shape)} and comes back as {_shape(state_out.shape)}: its shape is not shown to be the "
                    f"same in every iteration, so no shape inferred in the body can be trusted")
    return None


def _shape(shape) -> str:
    return "unknown" if shape is None else str(list(shape))
