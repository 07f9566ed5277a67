"""GRPO prompts with checkable answers: constant expressions found in the corpus, evaluated in a sandbox.

Code is full of expressions over literals (`2 ** 31 - 1`, `'a,b'.split(',')`, `sorted((3, 1, 2))`).
Asking a model what one evaluates to is a task with exactly one right answer, which a verifier can
check without a judge. The expression comes from the corpus, so nothing is invented; the answer
comes from running it, so nothing is guessed.

Two fences keep that safe. First an AST whitelist: literals, operators, displays, subscripts, a
short list of pure builtins and of str/bytes/list methods called on such values, nothing else (no
names, no other attributes, no comprehensions), with static bounds on what could grow without limit
(`**` only between small number literals, `<<` by at most 64, sequence repetition only by a small
literal and not nested). Then the accepted expressions are evaluated in a separate process from
`trulyopen.rewards.sandbox` (time and memory limits), with a timer per expression and a namespace
holding only the whitelisted builtins; nothing from the corpus is ever evaluated in our process.

Results whose printed form could differ between runs (sets of strings, whose order follows the hash
seed) are refused: a set may only be consumed by something order-free (`len`, `sorted`, `min`, a
comparison), and the value itself must be plain data (numbers, strings, bytes, None, and lists,
tuples and dicts of those).
"""

from __future__ import annotations

import ast
from collections import Counter
from dataclasses import dataclass

MAX_EXPR_CHARS = 120
MAX_NODES = 40
MAX_LITERAL_CHARS = 100
MAX_REPEAT = 1000  # largest literal a sequence may be repeated by, or a string padded to
MAX_POWER = 64  # largest exponent of **, largest shift of <<
MAX_BASE = 2**32
MAX_REPR_CHARS = 200
EXPR_TIMEOUT_S = 1.0

BUILTINS = frozenset(
    "abs all any bin bool chr divmod float frozenset hex int len list max min oct ord range round set "
    "sorted str sum tuple".split()
)
ORDER_FREE = frozenset({"all", "any", "bool", "len", "max", "min", "sorted", "sum", "frozenset", "set"})
SET_MAKERS = frozenset({"set", "frozenset"})
METHODS = frozenset(
    "capitalize casefold center count decode encode endswith expandtabs find hex index isalnum isalpha "
    "isascii isdecimal isdigit isidentifier islower isnumeric isspace istitle isupper join ljust lower "
    "lstrip partition removeprefix removesuffix replace rfind rindex rjust rpartition rsplit rstrip "
    "split splitlines startswith strip swapcase title upper zfill".split()
)
SIZED_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
BIN_OPS = (
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow,
    ast.LShift, ast.RShift, ast.BitOr, ast.BitXor, ast.BitAnd,
)  # fmt: skip
UNBOUNDED = frozenset({"power", "shift", "repeat", "range"})  # reasons that say "could grow without bound"
OPERATIONS = (ast.BinOp, ast.BoolOp, ast.Compare, ast.Call, ast.Subscript, ast.IfExp)


class Unsafe(Exception):
    """Why an expression may not be evaluated (the message is a short reason used in counts)."""


def _number(node: ast.expr) -> int | float | None:
    """The value of a number literal such as `3`, `-2.5` or `+1`, else None."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _number(node.operand)
        return None if value is None else (-value if isinstance(node.op, ast.USub) else value)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    return None


def _numeric(node: ast.expr) -> bool:
    """True when the expression is arithmetic over number literals only (so `*` cannot repeat)."""
    if _number(node) is not None:
        return True
    if isinstance(node, ast.UnaryOp):
        return _numeric(node.operand)
    return isinstance(node, ast.BinOp) and _numeric(node.left) and _numeric(node.right)


def _small_int(node: ast.expr) -> bool:
    value = _number(node)
    return type(value) is int and abs(value) <= MAX_REPEAT


def _check(node: ast.expr, sets_ok: bool = False) -> None:
    """Raise Unsafe unless every node is whitelisted and nothing can grow without bound."""
    match node:
        case ast.Constant(value=value):
            if type(value) not in (int, float, bool, str, bytes, type(None)):
                raise Unsafe("literal")
            if isinstance(value, str | bytes) and len(value) > MAX_LITERAL_CHARS:
                raise Unsafe("long_literal")
        case ast.Tuple(elts=elts) | ast.List(elts=elts):
            if not isinstance(node.ctx, ast.Load):
                raise Unsafe("syntax")
            for e in elts:
                _check(e)
        case ast.Set(elts=elts):
            if not sets_ok:
                raise Unsafe("unordered")
            for e in elts:
                _check(e)
        case ast.Dict(keys=keys, values=values):
            if any(k is None for k in keys):
                raise Unsafe("syntax")
            for e in [*keys, *values]:
                _check(e)
        case ast.UnaryOp(operand=operand):
            _check(operand)
        case ast.BinOp(left=left, op=op, right=right):
            _check_binop(left, op, right)
        case ast.BoolOp(values=values):
            for e in values:
                _check(e)
        case ast.Compare(left=left, comparators=comparators):
            for e in [left, *comparators]:
                _check(e, sets_ok=True)
        case ast.IfExp(test=test, body=body, orelse=orelse):
            for e in (test, body, orelse):
                _check(e)
        case ast.Subscript(value=value, slice=index):
            if not isinstance(node.ctx, ast.Load):
                raise Unsafe("syntax")
            _check(value)
            parts = [index.lower, index.upper, index.step] if isinstance(index, ast.Slice) else [index]
            for e in parts:
                if e is not None:
                    _check(e)
        case ast.Call():
            _check_call(node, sets_ok)
        case ast.Name():
            raise Unsafe("name")
        case ast.Attribute():
            raise Unsafe("attribute")
        case _:
            raise Unsafe("syntax")


def _check_binop(left: ast.expr, op: ast.operator, right: ast.expr) -> None:
    if not isinstance(op, BIN_OPS):
        raise Unsafe("operator")
    _check(left)  # first, so that code reading a variable is refused as "name", not as too big
    _check(right)
    if isinstance(op, ast.Pow):
        base, exponent = _number(left), _number(right)
        if base is None or exponent is None or abs(base) > MAX_BASE or abs(exponent) > MAX_POWER:
            raise Unsafe("power")
    elif isinstance(op, ast.LShift):
        shift = _number(right)
        if type(shift) is not int or not 0 <= shift <= MAX_POWER:
            raise Unsafe("shift")
    elif isinstance(op, ast.Mult) and not (_numeric(left) and _numeric(right)):
        # a sequence repeated: only by a small literal, and never a repetition of a repetition
        count, other = (left, right) if _small_int(left) else (right, left)
        if not _small_int(count) or any(
            isinstance(n, ast.BinOp) and isinstance(n.op, ast.Mult) for n in ast.walk(other)
        ):
            raise Unsafe("repeat")


def _check_call(node: ast.Call, sets_ok: bool) -> None:
    if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
        raise Unsafe("syntax")
    args = [*node.args, *(k.value for k in node.keywords)]
    func = node.func
    if isinstance(func, ast.Name):
        if func.id not in BUILTINS:
            raise Unsafe("call")
        for a in args:
            _check(a, sets_ok=func.id in ORDER_FREE)
        if func.id in SET_MAKERS and not sets_ok:
            raise Unsafe("unordered")
        if func.id == "range" and not all(_small_int(a) for a in args):
            raise Unsafe("range")
    elif isinstance(func, ast.Attribute):
        if func.attr not in METHODS:
            raise Unsafe("attribute")
        _check(func.value)
        for a in args:
            _check(a)
        if func.attr in SIZED_METHODS and args and not _small_int(args[0]):
            raise Unsafe("repeat")  # the width or tab size: a small literal
    else:
        raise Unsafe("call")


def check_expression(node: ast.expr) -> str | None:
    """None when `node` may be evaluated and makes a task; otherwise the reason it may not."""
    if sum(1 for _ in ast.walk(node)) > MAX_NODES:
        return "too_big"
    try:
        _check(node)
    except Unsafe as e:
        return str(e)
    except RecursionError:
        return "too_big"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range":
        return "range"  # a range object, not data: only useful inside list(), sum(), len()...
    if not any(
        isinstance(n, OPERATIONS) or (isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.Not | ast.Invert))
        for n in ast.walk(node)
    ):
        return "trivial"  # a literal, or a display of literals: it evaluates to itself
    return None


@dataclass
class Found:
    """Expressions of one document that may be evaluated, and why the others may not."""

    expressions: list[str]
    rejected: Counter


def find_expressions(tree: ast.Module) -> Found:
    """Safe, non-trivial expressions of a module (as `ast.unparse` prints them), in source order.

    The largest safe sub-expression is taken, not its parts; an expression refused because it could
    grow without bound gives none of its parts either. `rejected` counts, for each expression
    that stands directly under a statement and was not taken whole, the first reason it failed
    (mostly "name": it reads a variable).
    """
    found = Found([], Counter())
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]  # (node, its parent is not an expression)
    while stack:  # depth first, by hand: deep expression chains would overflow Python's stack
        node, root = stack.pop()
        if isinstance(node, ast.expr):
            reason = check_expression(node)
            if reason is None:
                text = ast.unparse(node)
                if len(text) <= MAX_EXPR_CHARS and "`" not in text and "\n" not in text:
                    found.expressions.append(text)
                continue
            if root:
                found.rejected[reason] += 1
            if reason in UNBOUNDED:
                continue  # the parts of something refused as too big are not tasks either
        is_expr = isinstance(node, ast.expr)
        stack.extend((child, not is_expr) for child in reversed(list(ast.iter_child_nodes(node))))
    return found


# The program run in the sandbox: reads a JSON list of expressions on stdin, prints one JSON line each.
EVALUATOR = f"""
import builtins, json, math, signal, sys

ENV = {{"__builtins__": {{name: getattr(builtins, name) for name in {sorted(BUILTINS)!r}}}}}
PLAIN = (int, float, bool, str, bytes, type(None))


def plain(value, depth=0):
    if depth > 20:
        return False
    if isinstance(value, PLAIN):
        return True
    if type(value) in (list, tuple):
        return all(plain(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(plain(k, depth + 1) and plain(v, depth + 1) for k, v in value.items())
    return False


def expired(signum, frame):
    raise TimeoutError


signal.signal(signal.SIGALRM, expired)
for text in json.loads(sys.stdin.read()):
    try:
        signal.setitimer(signal.ITIMER_REAL, {EXPR_TIMEOUT_S})
        try:
            value = eval(compile(text, "<expression>", "eval"), dict(ENV))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if not plain(value):
            out = {{"ok": False, "why": "not_plain"}}
        elif type(value) is float and not math.isfinite(value):
            out = {{"ok": False, "why": "not_finite"}}
        else:
            text = repr(value)
            if len(text) > {MAX_REPR_CHARS}:
                out = {{"ok": False, "why": "long_result"}}
            else:
                number = value if type(value) in (int, float) else None
                out = {{"ok": True, "repr": text, "number": number}}
    except BaseException as e:
        out = {{"ok": False, "why": type(e).__name__}}
    print(json.dumps(out), flush=True)
"""


@dataclass
class Evaluated:
    """The outcome of one expression: its repr and numeric value, or why it has none."""

    ok: bool
    repr: str = ""
    number: int | float | None = None
    why: str = ""


def evaluate(expressions: list[str], batch_size: int = 200, timeout_s: float = 20.0) -> list[Evaluated]:
    """Evaluate expressions (already checked by `check_expression`) in the sandbox, in order.

    Each batch runs in one sandboxed process. When a batch dies (an expression the per-expression
    timer could not stop, or memory), the lines it printed are kept, the expression it died on is
    marked failed, and the rest is run again, so one bad expression costs one retry, not the batch.
    """
    from trulyopen.rewards.sandbox import run_lines

    lines = run_lines(
        EVALUATOR, expressions, batch_size=batch_size, timeout_s=timeout_s, line_chars=MAX_REPR_CHARS
    )
    return [Evaluated(o["ok"], o.get("repr", ""), o.get("number"), o.get("why", "")) for o in lines]


def verifier(result: Evaluated) -> dict:
    """How a reward checks an answer: numerically for numbers, by exact repr for everything else.

    Integers must match exactly; floats within 1e-6 (relative, or absolute near zero), so `0.3`
    passes for `0.1 + 0.2`. Integers too large for a float to hold exactly are checked by repr.
    """
    n = result.number
    if isinstance(n, float):
        return {"type": "numeric", "answer": n, "tolerance": 1e-6}
    if isinstance(n, int) and abs(n) <= 2**53:
        return {"type": "numeric", "answer": n, "tolerance": 0.0}
    return {"type": "exact", "answer": result.repr}


def prompt(expression: str) -> str:
    return f"What does the Python expression `{expression}` evaluate to? Answer with the value's repr only."
