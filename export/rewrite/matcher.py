"""A small declarative matcher for onnx-graphsurgeon graphs.

A pattern is built from three pieces and reads like the expression it matches:

    Op("Mul", x, Op("Reciprocal", Op("Sqrt", v)))

- `Var(name)` matches any tensor and binds it; a name used twice must be the same tensor.
- `Op(types, *inputs, commutative=...)` matches a tensor produced (as first output) by a node of
  one of `types` in the default domain whose inputs match `inputs` in order (either order when
  commutative).
- `Or(*alternatives)` tries each alternative in turn.

Matching is a generator over every way the pattern fits, so the caller can apply semantic checks
and take the first match that passes them. Values (epsilon, exponents, axes) are bound as plain
tensors and judged by the checks, which is how a near-miss gets a reason instead of silence.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import onnx_graphsurgeon as gs

DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class Match:
    tensors: dict = field(default_factory=dict)  # Var name -> gs.Tensor
    nodes: tuple = ()  # matched nodes, each once, in the order found (root first)
    roles: dict = field(default_factory=dict)  # Op role -> gs.Node (first one found)

    def bind(self, name: str, tensor: gs.Tensor) -> "Match":
        return Match({**self.tensors, name: tensor}, self.nodes, self.roles)

    def add_node(self, node: gs.Node, role: str | None) -> "Match":
        nodes = self.nodes if any(n is node for n in self.nodes) else self.nodes + (node,)
        roles = self.roles if role is None or role in self.roles else {**self.roles, role: node}
        return Match(self.tensors, nodes, roles)

    def __getitem__(self, name: str) -> gs.Tensor:
        return self.tensors[name]

    def get(self, name: str):
        return self.tensors.get(name)


class Pattern:
    def match(self, tensor: gs.Tensor, m: Match) -> Iterator[Match]:
        raise NotImplementedError

    def matches(self, tensor: gs.Tensor) -> Iterator[Match]:
        return self.match(tensor, Match())


class Var(Pattern):
    def __init__(self, name: str):
        self.name = name

    def match(self, tensor, m):
        bound = m.get(self.name)
        if bound is None:
            yield m.bind(self.name, tensor)
        elif bound is tensor:
            yield m


class Op(Pattern):
    def __init__(self, op_types: str | tuple[str, ...], *inputs: Pattern, role: str | None = None,
                 commutative: bool = False, domains: tuple[str, ...] = DEFAULT_DOMAINS):
        self.op_types = (op_types,) if isinstance(op_types, str) else tuple(op_types)
        self.inputs = inputs
        self.role = role
        self.commutative = commutative and len(inputs) == 2
        self.domains = domains

    def match(self, tensor, m):
        node = producer(tensor)
        if node is None or node.op not in self.op_types or (node.domain or "") not in self.domains:
            return
        inputs = present_inputs(node)
        if node.outputs[0] is not tensor or len(inputs) != len(self.inputs):
            return
        m = m.add_node(node, self.role)
        orders = [self.inputs, self.inputs[::-1]] if self.commutative else [self.inputs]
        for order in orders:
            yield from _match_all(order, inputs, m)


class Or(Pattern):
    def __init__(self, *alternatives: Pattern):
        self.alternatives = alternatives

    def match(self, tensor, m):
        for alternative in self.alternatives:
            yield from alternative.match(tensor, m)


def _match_all(patterns, tensors, m: Match) -> Iterator[Match]:
    if not patterns:
        yield m
        return
    for partial in patterns[0].match(tensors[0], m):
        yield from _match_all(patterns[1:], tensors[1:], partial)


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Every node reading `old` reads `new` instead (the node writing `old` goes with clean-up)."""
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new


def present_inputs(node: gs.Node) -> list:
    """Node inputs without trailing omitted optionals (ONNX writes those as empty names)."""
    inputs = list(node.inputs)
    while inputs and inputs[-1].name == "":
        inputs.pop()
    return inputs
