"""Instruction and preference pairs made from the functions of a Python corpus, with no outside model.

A documented function is already an instruction pair: its signature and docstring say what to
write, its body is an answer a maintainer reviewed. `find_functions` picks the functions that make
good pairs (a real docstring, a body that is short and not a stub) from module level, from `if`,
`try` and `with` blocks at module level, and from classes; functions nested in functions are left
out because their bodies lean on names the prompt would not show.

The SFT answer is the original source text, decorators and comments included, cut out by line
numbers and dedented. The preference pair prints both sides with `ast.unparse`, so the chosen and
the rejected answer differ only by the corruption (see `corrupt.py`), never by formatting.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import random
import re
import textwrap
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from trulyopen.synth.corrupt import FunctionNode, corrupt

MIN_DOCSTRING_CHARS = 20
_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # what the tokenizer counts as a line end (not \f, \v, \x1c...)


@dataclass
class Function:
    """One documented function of a corpus document, ready to become a pair."""

    doc_id: str
    qualname: str  # Class.method or function; #2, #3... for a name defined again in the same file
    owner: str | None  # the class of a method
    node: FunctionNode
    header: str  # decorators, def line(s) and the docstring, as written, dedented
    source: str  # the whole function as written, dedented
    order: tuple[int, int]  # (document index, position in the document): corpus order


def stable_id(*parts: str) -> str:
    """A short id that depends only on its parts (kind, document, name or expression)."""
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:20]


def rank_key(seed: int, record_id: str) -> str:
    """Sort key of the seeded selection: a record is kept when its key is among the smallest."""
    return hashlib.sha256(f"{seed}\0{record_id}".encode()).hexdigest()


def parse_python(text: str) -> ast.Module | None:
    """The module's syntax tree, or None for text that is not Python this interpreter can parse."""
    try:
        return ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _definitions(body: list[ast.stmt], owner: str | None) -> Iterator[tuple[str | None, FunctionNode]]:
    """Functions of a module or class body, looking into if/try/with blocks and nested classes."""
    for stmt in body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
            yield owner, stmt
        elif isinstance(stmt, ast.ClassDef):
            yield from _definitions(stmt.body, stmt.name if owner is None else f"{owner}.{stmt.name}")
        elif isinstance(stmt, ast.If | ast.While | ast.For):
            yield from _definitions(stmt.body + stmt.orelse, owner)
        elif isinstance(stmt, ast.Try | ast.TryStar):
            blocks = stmt.body + stmt.orelse + stmt.finalbody
            yield from _definitions(blocks + [s for h in stmt.handlers for s in h.body], owner)
        elif isinstance(stmt, ast.With):
            yield from _definitions(stmt.body, owner)


def _is_stub(stmts: list[ast.stmt]) -> bool:
    """`pass`, `...` or `raise NotImplementedError`: nothing to learn from."""
    if len(stmts) != 1:
        return False
    s = stmts[0]
    if isinstance(s, ast.Pass) or (
        isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and s.value.value is Ellipsis
    ):
        return True
    if isinstance(s, ast.Raise) and s.exc is not None:
        exc = s.exc.func if isinstance(s.exc, ast.Call) else s.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def find_functions(
    doc_id: str, tree: ast.Module, text: str, max_answer_lines: int, doc_index: int, skipped: Counter
) -> list[Function]:
    """The functions of one parsed document that make good pairs; the others are counted in `skipped`."""
    lines = _LINE_BREAK.split(text)
    found: list[Function] = []
    seen: Counter = Counter()
    for position, (owner, node) in enumerate(_definitions(tree.body, None)):
        qualname = node.name if owner is None else f"{owner}.{node.name}"
        seen[qualname] += 1
        if seen[qualname] > 1:
            qualname += f"#{seen[qualname]}"
        doc = ast.get_docstring(node)
        if doc is None:
            skipped["no_docstring"] += 1
            continue
        if len(doc.strip()) < MIN_DOCSTRING_CHARS:
            skipped["short_docstring"] += 1
            continue
        code = node.body[1:]
        if not code or _is_stub(code):
            skipped["stub"] += 1
            continue
        if code[0].lineno <= node.body[0].end_lineno:  # code on the docstring's line: no clean cut
            skipped["one_liner"] += 1
            continue
        if node.end_lineno - code[0].lineno + 1 > max_answer_lines:
            skipped["too_long"] += 1
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        header = textwrap.dedent("\n".join(lines[start - 1 : node.body[0].end_lineno])).rstrip()
        source = textwrap.dedent("\n".join(lines[start - 1 : node.end_lineno])).rstrip()
        if parse_python(source) is None:
            skipped["not_self_contained"] += 1  # e.g. a string whose lines sit left of the def
            continue
        found.append(Function(doc_id, qualname, owner, node, header, source, (doc_index, position)))
    return found


def instruction(fn: Function) -> str:
    """The user turn shared by the SFT record and the preference pair."""
    what = f"method of class `{fn.owner}`" if fn.owner else "function"
    return (
        f"Write a Python {what} with this signature and docstring. "
        "Reply with the complete definition in a Python code block.\n\n"
        f"```python\n{fn.header}\n```"
    )


def _fenced(code: str) -> str:
    return f"```python\n{code}\n```"


def sft_id(fn: Function) -> str:
    return "sft-" + stable_id("sft", fn.doc_id, fn.qualname)


def sft_record(fn: Function) -> dict:
    """A chat record: the instruction, and the function as written in the corpus."""
    return {
        "id": sft_id(fn),
        "source_doc": fn.doc_id,
        "messages": [
            {"role": "user", "content": instruction(fn)},
            {"role": "assistant", "content": _fenced(fn.source)},
        ],
    }


def _dedented_docstring(node: FunctionNode) -> FunctionNode:
    """A copy whose docstring lines lose the indentation of the def, as the dedented source does.

    `ast.unparse` prints a method at column 0 but keeps its docstring's text as it was, so without
    this the docstring's later lines would stand one level too deep.
    """
    node = copy.deepcopy(node)
    doc = node.body[0].value
    strip = " " * node.col_offset
    first, *rest = doc.value.split("\n")
    doc.value = "\n".join([first] + [line.removeprefix(strip) for line in rest])
    return node


def preference_id(fn: Function) -> str:
    return "pref-" + stable_id("preference", fn.doc_id, fn.qualname)


def preference_record(fn: Function, seed: int) -> tuple[dict, str] | None:
    """(record, corruption name), or None when the function offers nothing to corrupt.

    The corruption is drawn from an RNG seeded by (seed, record id), so it does not depend on which
    other functions were picked or in what order.
    """
    record_id = preference_id(fn)
    node = _dedented_docstring(fn.node)
    made = corrupt(node, random.Random(f"{seed}\0{record_id}"))
    if made is None:
        return None
    kind, rejected = made
    chosen = ast.unparse(node)
    record = {
        "id": record_id,
        "source_doc": fn.doc_id,
        "prompt": instruction(fn),
        "chosen": _fenced(chosen),
        "rejected": _fenced(rejected),
        "corruption": kind,
    }
    return record, kind
