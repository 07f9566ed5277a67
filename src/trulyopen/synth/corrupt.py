"""Corrupting a function so that it still parses but no longer does what its docstring says.

Preference pairs need a rejected answer that is plausibly close to the chosen one: a model that
learns to prefer the real body must learn what the code does, not how it is formatted. So each
corruption is one small edit of the syntax tree (a flipped comparison, `and` for `or`, an
off-by-one constant, swapped branches, a dropped statement, a `return None`, swapped arguments),
and both sides of the pair are printed by `ast.unparse`, so they differ only by that edit.

The docstring is never touched: the corrupted function must still claim to do the same thing.
"""

from __future__ import annotations

import ast
import copy
import random
from collections.abc import Callable, Iterator

FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef
Edit = Callable[[random.Random], None]  # applies one edit in place

NEGATED_COMPARISON: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Lt: ast.GtE,
    ast.GtE: ast.Lt,
    ast.Gt: ast.LtE,
    ast.LtE: ast.Gt,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}


def _body_nodes(fn: FunctionNode) -> Iterator[ast.AST]:
    """Every node of the function's body after its docstring, in a fixed order."""
    for stmt in fn.body[1:]:
        yield from ast.walk(stmt)


def _flip_comparison(fn: FunctionNode) -> list[Edit]:
    def edit(node: ast.Compare, i: int) -> Edit:
        def apply(rng: random.Random) -> None:
            node.ops[i] = NEGATED_COMPARISON[type(node.ops[i])]()

        return apply

    return [
        edit(node, i)
        for node in _body_nodes(fn)
        if isinstance(node, ast.Compare)
        for i in range(len(node.ops))
    ]


def _swap_and_or(fn: FunctionNode) -> list[Edit]:
    def edit(node: ast.BoolOp) -> Edit:
        def apply(rng: random.Random) -> None:
            node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()

        return apply

    return [edit(node) for node in _body_nodes(fn) if isinstance(node, ast.BoolOp)]


def _off_by_one(fn: FunctionNode) -> list[Edit]:
    def edit(node: ast.Constant) -> Edit:
        def apply(rng: random.Random) -> None:
            node.value += rng.choice((-1, 1))

        return apply

    return [
        edit(node) for node in _body_nodes(fn) if isinstance(node, ast.Constant) and type(node.value) is int
    ]


def _swap_branches(fn: FunctionNode) -> list[Edit]:
    def edit(node: ast.If | ast.IfExp) -> Edit:
        def apply(rng: random.Random) -> None:
            node.body, node.orelse = node.orelse, node.body

        return apply

    return [
        edit(node)
        for node in _body_nodes(fn)
        if isinstance(node, ast.IfExp) or (isinstance(node, ast.If) and node.orelse)
    ]


def _drop_last_statement(fn: FunctionNode) -> list[Edit]:
    if len(fn.body) < 3:  # docstring + at least two statements, so one is left
        return []

    def apply(rng: random.Random) -> None:
        fn.body.pop()

    return [apply]


def _return_none(fn: FunctionNode) -> list[Edit]:
    def edit(node: ast.Return) -> Edit:
        def apply(rng: random.Random) -> None:
            node.value = ast.Constant(None)

        return apply

    return [
        edit(node)
        for node in _body_nodes(fn)
        if isinstance(node, ast.Return)
        and node.value is not None
        and not (isinstance(node.value, ast.Constant) and node.value.value is None)
    ]


def _swap_arguments(fn: FunctionNode) -> list[Edit]:
    def edit(node: ast.Call, i: int) -> Edit:
        def apply(rng: random.Random) -> None:
            node.args[i], node.args[i + 1] = node.args[i + 1], node.args[i]

        return apply

    return [
        edit(node, i)
        for node in _body_nodes(fn)
        if isinstance(node, ast.Call)
        for i in range(len(node.args) - 1)
        if not isinstance(node.args[i], ast.Starred)
        and not isinstance(node.args[i + 1], ast.Starred)
        and ast.dump(node.args[i]) != ast.dump(node.args[i + 1])
    ]


CORRUPTIONS: dict[str, Callable[[FunctionNode], list[Edit]]] = {
    "flip_comparison": _flip_comparison,
    "swap_and_or": _swap_and_or,
    "off_by_one": _off_by_one,
    "swap_branches": _swap_branches,
    "drop_last_statement": _drop_last_statement,
    "return_none": _return_none,
    "swap_arguments": _swap_arguments,
}


def corrupt(fn: FunctionNode, rng: random.Random) -> tuple[str, str] | None:
    """(corruption name, unparsed corrupted function), or None when no edit changes the code.

    The kind is drawn first, uniformly among those with somewhere to apply, then the site; a draw
    that happens to print the same as the original (swapping equal branches) tries the next one.
    """
    original = ast.unparse(fn)
    kinds = list(CORRUPTIONS)
    rng.shuffle(kinds)
    for kind in kinds:
        sites = len(CORRUPTIONS[kind](fn))
        order = list(range(sites))
        rng.shuffle(order)
        for i in order:
            mutant = copy.deepcopy(fn)
            CORRUPTIONS[kind](mutant)[i](rng)
            text = ast.unparse(ast.fix_missing_locations(mutant))
            if text == original:
                continue
            try:
                ast.parse(text)
            except SyntaxError:
                continue
            return kind, text
    return None
