"""ONNX Runtime's symbolic shape inference, made sound for proving residual Adds, and the fill of
what onnx's own inference leaves unknown from it.

It knows ONNX Runtime's contrib ops (a graph its optimizer has seen: SkipLayerNormalization,
Attention...), where onnx's inference stops, and works sizes out as expressions of the inputs'
(a Reshape to -1 of [batch, seq] by seq is batch), where onnx's leaves them unknown. As shipped it
is not sound for that use, and it gives up early; `SoundSymbolicInference` changes five things:
- no equality from a broadcast: two dims an Add broadcasts against each other are not known to be
  equal (one of them may be 1), yet it noted them as equal even without `auto_merge`, and later
  broadcasts and computed dims read those notes;
- no stop at a broadcast it cannot size (BERT's `[1, Min(512, seq), H] + [batch, seq, H]`): that
  output dim gets a name of its own, which equals nothing else, and inference goes on;
- `auto_merge` is never used: it declares broadcast dims equal on purpose;
- a Concat whose other axes it cannot show equal (a Conv's [batch, 32, 8, 8] and a folded
  [n, 32, h, w]) takes one of them: the op runs only where they are equal;
- a rule that fails on a form of an op it does not take no longer ends the inference: that node
  keeps onnx's shapes, its unknown dims named afresh.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
from pathlib import Path

import onnx

from .scopes import PLACEHOLDER_DIM, graph_and_bodies, node_bodies, unknown_dim, without_placeholder_dims

# ops whose output is the broadcast of their inputs, and those that broadcast some of their axes
ELEMENTWISE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Mod", "Where", "Sum", "Mean", "Max", "Min",
                             "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor",
                             "BitShift", "PRelu"})
BROADCASTING_OPS = ELEMENTWISE_OPS | {"Expand", "MatMul", "MatMulInteger"}


def symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """The model with the value_info `SoundSymbolicInference` finds, as far as it gets (each entry is
    written as its node is inferred), or None. Its public `infer_shapes` throws the partial result
    away when it stops early (after saving it into the working directory), so the loop is run here."""
    try:
        inference = _sound_inference()(int_max=2**31 - 1, auto_merge=False, guess_output_rank=False, verbose=0)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            inference._preprocess(_weights_as_inputs(model))
    except Exception:  # not installed, or another version's internals: onnx's shapes stay
        return None
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            while inference.run_:
                inference._infer_impl()
    except Exception:  # it failed past the rules (ConvNeXt-V2's GRN): what it found before that node stands
        pass
    return inference.out_mp_


def _weights_as_inputs(skeleton: onnx.ModelProto) -> onnx.ModelProto:
    """The skeleton with its byte-less weight stubs (`rewriter._copy_without_weights`) declared as
    graph inputs of their dtype and dims. The inference reads the value of every initializer an
    Add, Mul or Sub takes, for shape arithmetic, and a stub's read fails: it stopped at the first
    Add of a large constant (Swin's attention bias, any bias Add of a model wider than 256)."""
    stubs = [t for t in skeleton.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if not stubs:
        return skeleton
    out = onnx.ModelProto()
    out.CopyFrom(skeleton)
    kept = [t for t in out.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    declared = {i.name for i in out.graph.input}
    out.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                           for t in stubs if t.name not in declared)
    return out


def fill_from_symbolic_inference(inferred: onnx.GraphProto, symbolic: onnx.GraphProto | None) -> None:
    """Dims onnx's inference left unknown take the symbolic inference's, and tensors it gave no
    shape take the symbolic one, in the graph and its bodies (paired by the nodes holding them).

    Both name a dim only by an input's dim, an expression of those, or a name of their own for one
    op's output (onnx's `unk__5`, the symbolic `Add_12_o0__d1`), used again wherever that size
    is carried on; so a name the two share means the same size in both. onnx's own names are
    therefore renamed, never replaced one place at a time: where the symbolic inference sizes
    every place onnx calls `unk__5` the same, `unk__5` becomes that name everywhere; where it
    sizes them differently (it knows less there, say past a broadcast), `unk__5` stays, and so does
    what onnx proved equal by it."""
    if symbolic is None:
        return
    pairs, only_symbolic = [], []
    _pair_values(inferred, symbolic, pairs, only_symbolic)
    sizes_of: dict[str, set[bytes]] = {}
    for mine, theirs in pairs:
        for dim, better in _paired_dims(mine, theirs):
            if PLACEHOLDER_DIM.fullmatch(dim.dim_param) and not unknown_dim(better):
                sizes_of.setdefault(dim.dim_param, set()).add(better.SerializeToString())
    renamed = {name: onnx.TensorShapeProto.Dimension.FromString(next(iter(sizes)))
               for name, sizes in sizes_of.items() if len(sizes) == 1}
    for graph in graph_and_bodies(inferred):
        for value in graph.value_info:
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param in renamed:
                    dim.CopyFrom(renamed[dim.dim_param])
    for mine, theirs in pairs:
        if not mine.type.tensor_type.HasField("shape"):
            mine.type.tensor_type.shape.CopyFrom(without_placeholder_dims(theirs).type.tensor_type.shape)
            continue
        for dim, better in _paired_dims(mine, theirs):
            if not dim.HasField("dim_value") and not dim.dim_param and not unknown_dim(better):
                dim.CopyFrom(better)
    for graph, value in only_symbolic:  # past ops onnx's inference does not know
        graph.value_info.append(without_placeholder_dims(value))


def _paired_dims(mine: onnx.ValueInfoProto, theirs: onnx.ValueInfoProto):
    dims, known = mine.type.tensor_type.shape.dim, theirs.type.tensor_type.shape.dim
    return zip(dims, known) if len(dims) == len(known) else ()


def _pair_values(inferred: onnx.GraphProto, symbolic: onnx.GraphProto, pairs: list, only_symbolic: list) -> None:
    """(onnx's value, the symbolic one) for each tensor both typed alike, and (graph, symbolic value)
    for those only the symbolic inference has, in the graph and its bodies."""
    found = {v.name: v for v in symbolic.value_info if v.type.tensor_type.HasField("shape")}
    for value in inferred.value_info:
        other = found.pop(value.name, None)
        if other is not None and other.type.tensor_type.elem_type == value.type.tensor_type.elem_type:
            pairs.append((value, other))
    only_symbolic.extend((inferred, v) for v in found.values())
    # the symbolic inference sorts the nodes: bodies pair through the node's first output
    holders = {n.output[0]: n for n in symbolic.node if n.output and node_bodies(n)}
    for node in inferred.node:
        twin = holders.get(node.output[0]) if node.output else None
        if twin is None:
            continue
        twin_attrs = {a.name: a for a in twin.attribute}
        for attr in node.attribute:
            theirs = twin_attrs.get(attr.name)
            if theirs is None:
                continue
            if attr.type == onnx.AttributeProto.GRAPH:
                _pair_values(attr.g, theirs.g, pairs, only_symbolic)
            elif attr.type == onnx.AttributeProto.GRAPHS and len(attr.graphs) == len(theirs.graphs):
                for body, their_body in zip(attr.graphs, theirs.graphs):
                    _pair_values(body, their_body, pairs, only_symbolic)


@functools.lru_cache(maxsize=1)
def _sound_inference():
    """`SoundSymbolicInference`, a subclass of ONNX Runtime's SymbolicShapeInference, in a private
    copy of its module (If/Loop/Scan bodies are inferred by the class that module names, which is
    set to the subclass there and nowhere else)."""
    import sympy  # (its import takes a while: only where the inference runs)

    module = _private_copy_of_ort_module()
    base = module.SymbolicShapeInference

    class SoundSymbolicInference(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._node_now = None
            # after each broadcasting op's own rule, dims it left unknown get fresh names
            for op in BROADCASTING_OPS & self.dispatcher_.keys():
                self.dispatcher_[op] = self._then_name_unknown_dims(self.dispatcher_[op])
            self._dims_must_be_equal = False
            if "Concat" in self.dispatcher_:
                self.dispatcher_["Concat"] = self._with_equal_dims(self.dispatcher_["Concat"])
            for op, rule in list(self.dispatcher_.items()):
                self.dispatcher_[op] = self._guarded(rule)

        def _guarded(self, rule):
            def run(node):
                try:
                    rule(node)
                except Exception:
                    # A form of the op its rule does not take (an assertion: a Concat of known values
                    # along axis 1, an Expand to a shape of unknown length) stopped the whole
                    # inference. The node keeps what onnx's inference of it found, its unknown dims
                    # named afresh, and no value: the rest of the graph is still inferred.
                    for name in node.output:
                        self.sympy_data_.pop(name, None)
                    self._name_unknown_dims(node)
            return run

        def _then_name_unknown_dims(self, rule):
            def run(node):
                rule(node)
                self._name_unknown_dims(node)
            return run

        def _with_equal_dims(self, rule):
            def run(node):
                self._dims_must_be_equal = True
                try:
                    rule(node)
                finally:
                    self._dims_must_be_equal = False
            return run

        def _merge_symbols(self, dims):
            merged = super()._merge_symbols(dims)
            if merged is None and self._dims_must_be_equal:
                # A Concat's other axes are equal in every run it accepts: any one of them is the
                # size, best a number, then an input's dim, then one the inference named.
                numbers = [d for d in dims if not isinstance(d, str)]
                names = sorted((d for d in dims if isinstance(d, str) and d in self.symbolic_dims_),
                               key=lambda d: d not in self.input_symbols_)
                merged = int(numbers[0]) if numbers else (names[0] if names else None)
            return merged

        def _onnx_infer_single_node(self, node):
            self._node_now = node  # runs first for every node: the node a broadcast below belongs to
            super()._onnx_infer_single_node(node)

        def _check_merged_dims(self, dims, allow_broadcast=True):
            # Equal only where the op fails otherwise (a MatMul's inner dims, a Concat's other axes).
            if not allow_broadcast:
                super()._check_merged_dims(dims, allow_broadcast)

        def _broadcast_shapes(self, shape1, shape2):
            shape = super()._broadcast_shapes(shape1, shape2)
            if self._node_now is None:
                return shape
            rank = len(shape)
            aligned = [[1] * (rank - len(s)) + list(s) for s in (shape1, shape2)]
            # as the shapes it gets: a str per named dim (each in symbolic_dims_), an int per size
            return [dim if dim is not None else _as_shape_dim(self._broadcast_dim(self._node_now, 0, axis,
                                                                                [s[axis] for s in aligned]))
                    for axis, dim in enumerate(shape)]

        def _name_unknown_dims(self, node):
            shapes = [self._try_get_shape(node, i) for i in range(len(node.input)) if node.input[i]]
            for index, name in enumerate(node.output):
                value = self.known_vi_.get(name)
                if value is None or not value.type.tensor_type.HasField("shape"):
                    continue
                dims = value.type.tensor_type.shape.dim
                for axis, dim in enumerate(dims):
                    if dim.HasField("dim_value") or (dim.dim_param and not self._is_none_dim(dim.dim_param)):
                        continue
                    operands = None
                    if index == 0 and node.op_type in ELEMENTWISE_OPS and all(s is not None for s in shapes):
                        at = axis - len(dims)  # broadcasting aligns the last axes
                        operands = [s[at] if len(s) >= -at else 1 for s in shapes]
                    size = _as_shape_dim(self._broadcast_dim(node, index, axis, operands))
                    if isinstance(size, int):
                        dim.dim_value = size
                    else:
                        dim.dim_param = size

        def _broadcast_dim(self, node, index, axis, operands):
            """The size of a broadcast of `operands` (dims of one axis) where it is one of them for
            every run the op accepts, else a fresh name."""
            sizes = None
            if operands is not None and not any(d is None or self._is_none_dim(d) for d in operands):
                sizes = [self.symbolic_dims_.get(d, sympy.Symbol(d, integer=True, nonnegative=True))
                         if isinstance(d, str) else sympy.sympify(d) for d in operands]
            largest = _largest_of_a_broadcast(sizes) if sizes else None
            if largest is None:
                return self._new_symbolic_dim_from_output(node, index, axis)
            if not largest.is_Integer:
                self.symbolic_dims_.setdefault(str(largest), largest)
            return largest

    module.SymbolicShapeInference = SoundSymbolicInference
    return SoundSymbolicInference


def _as_shape_dim(size):
    """A sympy size as the inference writes dims into shapes: an int, or the str it is named by."""
    return int(size) if size.is_Integer else str(size)


def _largest_of_a_broadcast(sizes: list):
    """The size a broadcast of these sizes has whenever it is valid, or None where that is not
    known. Valid means every size is 1 or equal to the others, and the result is the largest. So
    if one size is provably at least every other, and those others are provably at least 1 (a 0
    broadcast against a 1 gives 0), the result is that size: BERT's position embeddings
    `[1, Min(512, seq), H]` added to `[batch, seq, H]` give `[batch, seq, H]`."""
    import sympy

    others = [s for s in sizes if s != 1]
    if not others:
        return sympy.Integer(1)
    for candidate in others:
        if all(sympy.Max(s, candidate) == candidate and sympy.Min(s, 1) == 1 for s in others if s != candidate):
            return candidate
    return None


def _private_copy_of_ort_module():
    """ONNX Runtime's symbolic_shape_infer module, loaded from its file as a module of our own, so
    that changing it changes nothing for anyone else. Imported as onnxruntime.tools.symbolic_shape_infer
    it would also first run onnxruntime/tools/__init__.py, which imports torch where torch is
    installed (1-2 s, for a helper not used here); the module itself needs only onnx, numpy, sympy
    and packaging."""
    package = importlib.util.find_spec("onnxruntime")  # finds the package without importing it
    where = Path(package.submodule_search_locations[0]) / "tools" / "symbolic_shape_infer.py" if package else None
    if where is None or not where.is_file():  # another layout: ask the import system where it is
        from onnxruntime.tools import symbolic_shape_infer

        where = Path(symbolic_shape_infer.__file__)
    spec = importlib.util.spec_from_file_location("normfuse_ort_symbolic_shape_infer", where)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
