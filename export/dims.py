"""Sizes for the dynamic dimensions of a model's inputs: one rule for random inputs, validation,
benchmarks and TensorRT optimisation profiles.

Exporters name dynamic dimensions (`batch_size`, `sequence_length`, `past_sequence_length`), and
a KV-cache decoder's attention mask is `past_sequence_length + sequence_length` long. Inputs
made up for such a model must respect those names, or it fails on its own shapes. A dimension
gets its size from the first of these that applies:

1. its name was given a size (`--dim NAME=SIZE`);
2. its name is arithmetic over other names and integers (`+ - * // %`, parentheses, `min`,
   `max`), as exporters write derived sizes: the value of that expression; so is a name whose
   meaning is fixed by convention (KNOWN_RELATIONS: `total_sequence_length`, as ONNX Runtime
   GenAI names it, is `past_sequence_length + sequence_length`) when the model has those names;
3. its name appeared before: the size it got there, so a name has one size everywhere;
4. its position: a dynamic axis 0 is the batch, any other dynamic axis the sequence. This is
   also the rule for unnamed dynamic axes, and for the names inside an expression that appear
   nowhere on their own (they take the size of the axis the expression sits on).
"""
from __future__ import annotations

import ast
import functools
import operator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from .errors import IndexOutsideTable, MissingKernel, NormfuseError, RunFailure, UsageError


@dataclass(frozen=True)
class Expression:
    """A dim_param that is arithmetic over other names, e.g. 'past_sequence_length + sequence_length'."""

    text: str
    tree: ast.expr
    names: tuple[str, ...]

    def value(self, sizes: dict[str, int]) -> int:
        return _evaluate(self.tree, sizes)


_BINARY: dict[type, Callable[[int, int], int]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_CALLS = {"min": min, "max": max}


def _evaluate(node: ast.expr, sizes: dict[str, int]) -> int:
    if isinstance(node, ast.Constant):
        return int(node.value)
    if isinstance(node, ast.Name):
        return sizes[node.id]
    if isinstance(node, ast.UnaryOp):
        return -_evaluate(node.operand, sizes)
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_evaluate(node.left, sizes), _evaluate(node.right, sizes))
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    return _CALLS[node.func.id.lower()](*(_evaluate(a, sizes) for a in node.args))


def _arithmetic(node: ast.AST) -> bool:
    """Only integers, names, + - * // %, unary minus and min/max calls."""
    if isinstance(node, ast.Constant):
        return type(node.value) is int
    if isinstance(node, ast.Name):
        return True
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, ast.USub) and _arithmetic(node.operand)
    if isinstance(node, ast.BinOp):
        return type(node.op) in _BINARY and _arithmetic(node.left) and _arithmetic(node.right)
    if isinstance(node, ast.Call):
        return (isinstance(node.func, ast.Name) and node.func.id.lower() in _CALLS and bool(node.args)
                and not node.keywords and all(_arithmetic(a) for a in node.args))
    return False


@functools.lru_cache(maxsize=4096)  # a model repeats its few names on every input
def parse(dim_param: str) -> str | Expression:
    """A plain name (any text that is not arithmetic over names, such as 'batch' or
    '/model/Add_output_0_dim_1'), or an Expression."""
    try:
        tree = ast.parse(dim_param.strip(), mode="eval").body
    except (SyntaxError, ValueError):
        return dim_param
    if isinstance(tree, ast.Name) or not _arithmetic(tree):
        return dim_param
    names = tuple(dict.fromkeys(n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
                                and not _is_call_name(tree, n)))
    return Expression(dim_param, tree, names) if names else dim_param


def _is_call_name(tree: ast.AST, name: ast.Name) -> bool:
    return any(isinstance(n, ast.Call) and n.func is name for n in ast.walk(tree))


def named_dims(inputs: Sequence) -> list[str]:
    """Every dimension name of `inputs`, and the names inside their expressions, in order."""
    found: dict[str, None] = {}
    for spec in inputs:
        for param in dim_params(spec):
            if param:
                parsed = parse(param)
                for name in (parsed.names if isinstance(parsed, Expression) else (parsed,)):
                    found[name] = None
    return list(found)


def dim_params(spec) -> tuple[str | None, ...]:
    """Names of `spec`'s dynamic axes (None for a fixed or unnamed one), whatever carries it."""
    params = tuple(getattr(spec, "dim_params", ()) or ())
    return params + (None,) * (len(spec.shape) - len(params))


def sequence_names(inputs: Sequence) -> list[str]:
    """Plain names that first appear on an axis other than 0: each is made up as the sequence length."""
    first_axis: dict[str, int] = {}
    for spec in inputs:
        for axis, (dim, param) in enumerate(zip(spec.shape, dim_params(spec))):
            if dim is None and param and isinstance(parse(param), str):
                first_axis.setdefault(param, axis)
    return [name for name, axis in first_axis.items() if axis != 0]


@contextmanager
def hint_on_failure(inputs: Sequence):
    """A RunFailure inside gets `failure_hint(inputs)` added, unless its cause is named already (a
    missing kernel, an index past its table). Pass the specs of inputs normfuse made up by these
    rules; for inputs the user gave pass none, and only the generic hint (a shape the model cannot
    take) is added, never the --dim one: their shapes are the user's."""
    try:
        yield
    except (MissingKernel, IndexOutsideTable):
        raise  # the model's ops, or a value named already: not the inputs' shapes
    except RunFailure as exc:
        raise RunFailure(f"{exc} {failure_hint(inputs)}") from None


def failure_hint(inputs: Sequence) -> str:
    """What to suspect when a model fails on inputs of these shapes, for the one-line error."""
    names = sequence_names(inputs)
    hint = "a shape the model cannot take, e.g. a sequence past its positions"
    if len(names) > 1:
        listed = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        hint += (f", or sizes it relates: {listed} are separate dimensions, made up alike as the sequence "
                 "length unless --dim NAME=SIZE sizes them")
    return f"({hint}?)"


def _names(inputs: Sequence) -> set[str]:
    """The names a size may be given for: every dimension name, and each written expression itself
    ('past + seq')."""
    return set(named_dims(inputs)) | {param for spec in inputs for param in dim_params(spec) if param}


def sizes_it_has(inputs: Sequence, given: Mapping[str, object] | None) -> dict:
    """The given sizes whose names `inputs` has: one model's share of sizes given for several (an
    encoder's and its decoder's)."""
    names = _names(inputs)
    return {name: size for name, size in (given or {}).items() if name in names}


def check_given(inputs: Sequence, given: Mapping[str, object] | None, where: str) -> None:
    """A size given for a name the model does not have is a mistake worth stopping for."""
    unknown = sorted(set(given or {}) - _names(inputs))
    if unknown:
        names = ", ".join(named_dims(inputs)) or "none"
        raise UsageError(f"{where}: --dim {unknown[0]}: the model has no dimension of that name "
                         f"(its named dimensions: {names})")


def input_shapes(inputs: Sequence, batch: int, seq: int, given: dict[str, int] | None = None,
                 where: str = "model") -> dict[str, list[int]]:
    """{input name: dims} for `inputs` (anything with name, shape of int or None per axis, and
    optionally dim_params), by the rules in this module's docstring. A given name the model does
    not have is a UsageError."""
    check_given(inputs, given, where)
    for spec in inputs:
        if not getattr(spec, "rank_known", True):
            raise NormfuseError(f"{where}: input {spec.name!r} has no shape in the model (not even its rank), so "
                                "inputs for it cannot be made up; give your own (--inputs of export.validate or export.run)")
    sizes: dict[str, int] = dict(given or {})
    related = known_relations(inputs, sizes)

    def parsed_dim(param: str | None) -> str | Expression | None:
        parsed = parse(param) if param else None
        return related.get(parsed, parsed) if isinstance(parsed, str) else parsed

    positional = {}  # (input, axis) -> size by position
    for spec in inputs:
        for axis, (dim, param) in enumerate(zip(spec.shape, dim_params(spec))):
            if dim is not None:
                continue
            by_position = batch if axis == 0 else seq
            positional[spec.name, axis] = by_position
            parsed = parsed_dim(param)
            if isinstance(parsed, str):
                sizes.setdefault(parsed, by_position)
    for spec in inputs:  # names that appear only inside expressions
        for axis, param in enumerate(dim_params(spec)):
            parsed = parsed_dim(param) if spec.shape[axis] is None else None
            if isinstance(parsed, Expression):
                for name in parsed.names:
                    sizes.setdefault(name, positional[spec.name, axis])

    shapes = {}
    for spec in inputs:
        dims = []
        for axis, (dim, param) in enumerate(zip(spec.shape, dim_params(spec))):
            if dim is not None:
                dims.append(int(dim))
                continue
            parsed = parsed_dim(param)
            if parsed is None:
                size = positional[spec.name, axis]
            elif isinstance(parsed, str):
                size = sizes[parsed]
            else:
                size = _expression_size(parsed, sizes, spec.name, axis, where)
            if size < 1:
                raise NormfuseError(f"{where}: input {spec.name!r} axis {axis} ({param}) would be {size} long; "
                                    "give its names sizes with --dim NAME=SIZE")
            dims.append(size)
        shapes[spec.name] = dims
    return shapes


# Names with a meaning fixed by convention: ONNX Runtime GenAI's decoders (and ONNX Runtime's
# transformers tools) name the attention mask's length `total_sequence_length`, which is the
# cache's length plus the new tokens'.
KNOWN_RELATIONS = {"total_sequence_length": "past_sequence_length + sequence_length"}


def known_relations(inputs: Sequence, given: Mapping[str, int]) -> dict[str, Expression]:
    """The KNOWN_RELATIONS a model's names fit (every name present, the derived one not given)."""
    present = set(named_dims(inputs))
    found = {}
    for name, text in KNOWN_RELATIONS.items():
        expression = parse(text)
        if name in present and name not in given and set(expression.names) <= present:
            found[name] = expression
    return found


def _expression_size(expression: Expression, sizes: dict[str, int], name: str, axis: int, where: str) -> int:
    if expression.text in sizes:  # given by its own text
        return sizes[expression.text]
    try:
        return expression.value(sizes)
    except ZeroDivisionError:
        raise NormfuseError(f"{where}: input {name!r} axis {axis} ({expression.text}) divides by zero; "
                            "give its names sizes with --dim NAME=SIZE") from None


def sizes_per_model(models: list, given: list[tuple]) -> dict:
    """Each model's share of --dim flags given for a folder of models ((name, size) pairs): the
    ones whose names it has (an encoder has no past_decoder_sequence_length). A name no model has
    is a UsageError listing the names they do have."""
    from .triton_repo import onnx_signature

    inputs = {model: onnx_signature(model)[0] for model in models}
    names = {model: _names(specs) for model, specs in inputs.items()}
    shares = {model: [(name, size) for name, size in given if name in names[model]] for model in models}
    for name, _ in given:
        if not any(name in known for known in names.values()):
            names = ", ".join(dict.fromkeys(n for specs in inputs.values() for n in named_dims(specs))) or "none"
            raise UsageError(f"--dim {name}: no model in the folder has a dimension of that name (their named "
                             f"dimensions: {names})")
    return shares
