"""Tool-use conversations made from a Python corpus: its functions are the tools, the calls it
makes are the questions, and running the call gives the answer. No outside model, nothing invented.

    corpus ─► documented module-level functions ─► tool specs: name, the docstring's summary, and a
         │                                         JSON schema of the arguments from the signature
         └──► calls with literal arguments, in code and doctests (`textwrap.dedent("  a")`)
    call ─► sandbox: the function's document run as its module, the function called (twice) ─► result
    record: tools (the function and others), the user's question, the assistant's call, the tool's
            result, the assistant's answer

A call is kept when its arguments satisfy the schema and the function returns plain JSON of a
modest size, the same in two runs (each run has its own hash seed, so an answer that depends on set
order or on the clock is caught). Functions that read the machine (the environment, the clock, the
file system, the platform) are left out before anything runs: their answers would hold on this
machine only, and the synth stage makes the same bytes from the same corpus anywhere.

A seeded share of the functions is held out: their conversations go to `tools_heldout.jsonl`,
never to training, and the eval stage's `tool_call` task asks whether a model calls the right
function, with arguments its schema accepts, for questions about functions it never saw called.
"""

from __future__ import annotations

import ast
import doctest
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, replace

from trulyopen.synth.code_tasks import rank_key, stable_id

MIN_SUMMARY_CHARS = 12
MAX_SUMMARY_CHARS = 120
MAX_VALUE_CHARS = 100  # arguments and results: a record must fit a small model's context
MAX_CALLS_PER_FUNCTION = 8  # `re.compile` is called a hundred times; a few teach as much
CALL_TIMEOUT_S = 2.0

# Modules (by first component) whose functions read or change the machine: answers would differ
# between machines, or calling them does something.
MACHINE_MODULES = frozenset(
    "asyncio concurrent ctypes curses distutils ensurepip getpass idlelib locale logging mimetypes "
    "multiprocessing os platform pydoc random secrets shutil signal site socket subprocess sys "
    "sysconfig tempfile test threading time tkinter turtle turtledemo uuid venv warnings "
    "webbrowser".split()
)
# Names whose use in a function's body says the same
MACHINE_NAMES = frozenset(
    "access choice cwd environ exists expanduser expandvars getcwd getcwdb getenv gethostname "
    "getlocale getlogin getpid getppid getpreferredencoding getuid glob hash home id iglob input "
    "isdir isfile islink ismount lexists listdir localtime lstat monotonic now open perf_counter "
    "popen randint random scandir shuffle stat system time today uname urandom walk which".split()
)
JSON_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}
JSON_TYPES |= {"list": "array", "List": "array", "dict": "object", "Dict": "object"}

QUESTIONS = (
    "{summary} {arguments}",
    "{summary}\nArguments: {arguments}",
    "Use a tool: {summary} ({arguments})",
)
ANSWERS = ("Result: {result}", "It returned {result}.", "`{name}` gives {result}.")


@dataclass
class Tool:
    """A documented module-level function of the corpus, as a tool a model may call."""

    key: str  # document id :: function name
    doc_id: str
    name: str
    params: list[str]  # in order: positional arguments are matched to these
    schema: dict  # JSON schema of the arguments object
    summary: str  # the docstring's first sentence

    def spec(self) -> dict:
        """The tool as OpenAI's API lists it."""
        function = {"name": self.name, "description": self.summary, "parameters": self.schema}
        return {"type": "function", "function": function}


@dataclass
class Call:
    """A call with literal arguments written somewhere in the corpus, its callee not yet found."""

    module: str | None  # the module the callee is defined in; None: the calling document itself
    name: str
    args: list
    kwargs: dict
    doc_id: str  # where the call is written
    order: tuple[int, int]  # (document index, position in it): corpus order


def module_of(doc_id: str) -> str | None:
    """`xml.etree.ElementTree` for the document `stdlib/xml/etree/ElementTree.py` (ids are
    `<source>/<path>`); None for a document that is no .py file."""
    path = doc_id.split("/", 1)[-1]
    if not path.endswith(".py"):
        return None
    parts = path[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) if parts and all(p.isidentifier() for p in parts) else None


def summary(docstring: str) -> str | None:
    """The docstring's first paragraph, on one line, cut to its first sentence when long."""
    first = " ".join(docstring.strip().split("\n\n")[0].split())
    if len(first) > MAX_SUMMARY_CHARS:
        sentence = re.match(r"(.+?[.!?])(\s|$)", first)
        first = sentence.group(1) if sentence else ""
    return first if MIN_SUMMARY_CHARS <= len(first) <= MAX_SUMMARY_CHARS else None


def _reads_machine(node: ast.AST) -> bool:
    for n in ast.walk(node):
        if (isinstance(n, ast.Name) and n.id in MACHINE_NAMES) or (
            isinstance(n, ast.Attribute) and n.attr in MACHINE_NAMES
        ):
            return True
    return False


def _property(annotation: ast.expr | None, default: ast.expr | None) -> dict:
    """A parameter's JSON schema from its annotation, else from its default's type, else any."""
    if isinstance(annotation, ast.Subscript):
        annotation = annotation.value
    if isinstance(annotation, ast.Name) and annotation.id in JSON_TYPES:
        return {"type": JSON_TYPES[annotation.id]}
    if isinstance(default, ast.Constant) and type(default.value).__name__ in JSON_TYPES:
        return {"type": JSON_TYPES[type(default.value).__name__]}
    return {}


def find_tools(doc_id: str, tree: ast.Module, skipped: Counter) -> list[Tool]:
    """The module-level functions of a document that make tools; others are counted in `skipped`."""
    module = module_of(doc_id)
    if module is not None and module.split(".")[0] in MACHINE_MODULES:
        return []
    tools = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        text = summary(doc) if doc else None
        a = node.args
        if text is None:
            skipped["no_summary"] += 1
        elif node.decorator_list or a.posonlyargs or a.vararg or a.kwarg:
            skipped["signature"] += 1  # *args, **kwargs or a decorator: the schema cannot say it
        elif _reads_machine(node):
            skipped["reads_machine"] += 1
        else:
            params = a.args + a.kwonlyargs
            defaults = [None] * (len(a.args) - len(a.defaults)) + a.defaults + a.kw_defaults
            props = {p.arg: _property(p.annotation, d) for p, d in zip(params, defaults, strict=True)}
            schema = {"type": "object", "properties": props}
            required = [p.arg for p, d in zip(params, defaults, strict=True) if d is None]
            if required:
                schema["required"] = required
            key = f"{doc_id}::{node.name}"
            tools.append(Tool(key, doc_id, node.name, [p.arg for p in params], schema, text))
    return tools


def _literal(node: ast.expr) -> tuple[bool, object]:
    """(True, value) for a literal that is plain JSON: no tuples, sets, bytes or complex numbers."""
    for n in ast.walk(node):
        if isinstance(n, ast.Tuple | ast.Set) or (
            isinstance(n, ast.Constant) and isinstance(n.value, bytes | complex)
        ):
            return False, None
    try:
        value = ast.literal_eval(node)
        text = json.dumps(value, allow_nan=False)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None
    return len(text) <= MAX_VALUE_CHARS, value


def _imports(tree: ast.Module) -> dict[str, str | tuple[str, str]]:
    """Names bound by absolute imports: a module's name, or (module, function) for `from m import f`."""
    bound: dict[str, str | tuple[str, str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                bound[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                bound[a.asname or a.name] = (node.module, a.name)
    return bound


def _doctest_trees(tree: ast.Module) -> list[ast.AST]:
    """The parsed sources of the doctest examples in the document's docstrings."""
    trees = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if not doc or ">>>" not in doc:
                continue
            try:
                examples = doctest.DocTestParser().get_examples(doc)
            except ValueError:
                continue
            for example in examples:
                try:
                    trees.append(ast.parse(example.source))
                except (SyntaxError, ValueError):
                    pass
    return trees


def find_calls(doc_id: str, tree: ast.Module, doc_index: int) -> list[Call]:
    """Every call in the document's code and doctests whose arguments are all JSON literals."""
    bound = _imports(tree)
    calls = []
    for root in [tree, *_doctest_trees(tree)]:
        for n in ast.walk(root):
            if not isinstance(n, ast.Call) or not (n.args or n.keywords):
                continue
            if isinstance(n.func, ast.Name):
                target = bound.get(n.func.id)
                module, name = target if isinstance(target, tuple) else (None, n.func.id)
            elif isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name):
                module, name = bound.get(n.func.value.id), n.func.attr
                if not isinstance(module, str):
                    continue
            else:
                continue
            if any(isinstance(a, ast.Starred) for a in n.args) or any(k.arg is None for k in n.keywords):
                continue
            values = [_literal(a) for a in n.args] + [_literal(k.value) for k in n.keywords]
            if all(ok for ok, _ in values):
                args = [v for _, v in values[: len(n.args)]]
                kwargs = {k.arg: v for k, (_, v) in zip(n.keywords, values[len(n.args) :], strict=True)}
                calls.append(Call(module, name, args, kwargs, doc_id, (doc_index, len(calls))))
    return calls


@dataclass
class Question:
    """A call of a corpus function with its arguments: what a user asks and a model should call."""

    id: str
    tool: Tool
    arguments: dict
    call_doc: str  # where the call is written
    order: tuple[int, int]
    held_out: str | None = None  # "function" (never seen in training) or "call" (a new question)


def questions(
    tools: list[Tool], calls: list[Call], seed: int, heldout: float, stats: Counter
) -> tuple[list[Question], list[Question]]:
    """The calls matched to their functions, at most MAX_CALLS_PER_FUNCTION each (a seeded pick),
    split into training and held-out questions. Held out: every call of a seeded `heldout` share
    of the functions (held_out "function": tools a model never saw), and one call of each other
    function called three or more times (held_out "call": a new question for a tool it knows)."""
    by_key = {t.key: t for t in tools}
    doc_of = {module_of(t.doc_id): t.doc_id for t in tools}
    found: dict[str, Question] = {}
    for call in calls:
        doc_id = doc_of.get(call.module) if call.module else call.doc_id
        tool = by_key.get(f"{doc_id}::{call.name}")
        if tool is None:
            stats["calls_not_a_tool"] += 1
            continue
        args = arguments(tool, call)
        if args is None:
            stats["calls_not_fitting_schema"] += 1
            continue
        qid = "tools-" + stable_id("tools", tool.key, json.dumps(args, sort_keys=True))
        if qid in found:
            stats["calls_repeated"] += 1
        else:
            found[qid] = Question(qid, tool, args, call.doc_id, call.order)
    per_tool: dict[str, list[Question]] = {}
    for q in sorted(found.values(), key=lambda q: rank_key(seed, q.id)):
        per_tool.setdefault(q.tool.key, []).append(q)
    train, held = [], []
    for key, qs in per_tool.items():
        if int(rank_key(seed, "heldout\0" + key)[:8], 16) < heldout * 16**8:
            held.extend(replace(q, held_out="function") for q in qs[:MAX_CALLS_PER_FUNCTION])
            stats["calls_over_cap"] += max(0, len(qs) - MAX_CALLS_PER_FUNCTION)
            continue
        n_held = 1 if len(qs) >= 3 else 0
        trained = qs[: min(len(qs) - n_held, MAX_CALLS_PER_FUNCTION)]
        if n_held:  # the next after the trained ones (past the cap when there are more)
            held.append(replace(qs[len(trained)], held_out="call"))
        stats["calls_over_cap"] += len(qs) - len(trained) - n_held
        train.extend(trained)
    stats["functions_called"] = len(per_tool)
    return train, held


def arguments(tool: Tool, call: Call) -> dict | None:
    """The call's arguments as the object a model sends, or None when they do not fit the signature
    or the schema (too many, unknown or repeated names, a required one missing, a wrong type)."""
    from jsonschema import Draft202012Validator

    if len(call.args) > len(tool.params):
        return None
    out = dict(zip(tool.params, call.args, strict=False))
    if set(out) & set(call.kwargs) or not set(call.kwargs) <= set(tool.params):
        return None
    out.update(call.kwargs)
    return out if Draft202012Validator(tool.schema).is_valid(out) else None


# The program run in the sandbox: reads {"source", "path", "module", "calls": [[name, arguments]]}
# on stdin, runs the document as its module, then each call, printing one JSON line per call.
CALLER = f"""
import io, json, signal, sys

job = json.loads(sys.stdin.read())
out = sys.stdout
sys.stdout = sys.stderr = io.StringIO()  # what the code prints is not an answer
module = job["module"] or "corpus_module"
package = module if job["path"].endswith("__init__.py") else module.rpartition(".")[0]
namespace = {{"__name__": module, "__package__": package or None, "__file__": job["path"]}}


def expired(signum, frame):
    raise TimeoutError


signal.signal(signal.SIGALRM, expired)
failed = None
signal.setitimer(signal.ITIMER_REAL, {CALL_TIMEOUT_S * 5})
try:
    exec(compile(job["source"], job["path"], "exec"), namespace)
except BaseException as e:
    failed = "module_" + type(e).__name__
finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
for name, arguments in job["calls"]:
    if failed:
        line = {{"ok": False, "why": failed}}
    else:
        try:
            signal.setitimer(signal.ITIMER_REAL, {CALL_TIMEOUT_S})
            try:
                value = namespace[name](**arguments)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            text = json.dumps(value, ensure_ascii=False, allow_nan=False, sort_keys=True)
            line = {{"ok": True, "result": text}}
            if len(text) > {MAX_VALUE_CHARS}:
                line = {{"ok": False, "why": "long_result"}}
        except (TypeError, ValueError) as e:
            line = {{"ok": False, "why": "not_json" if "serializable" in str(e) else type(e).__name__}}
        except BaseException as e:
            line = {{"ok": False, "why": type(e).__name__}}
    out.write(json.dumps(line) + "\\n")
    out.flush()
"""


def run_calls(source: str, path: str, module: str | None, calls: list[tuple[str, dict]]) -> list[dict]:
    """Each call's {"ok", "result" (its JSON)} or {"ok": False, "why"}, from two sandboxed runs of
    the document and the calls; a result the two runs disagree on is refused ("differs")."""
    from trulyopen.rewards.sandbox import run_lines

    def stdin_of(batch: list) -> str:
        return json.dumps({"source": source, "path": path, "module": module, "calls": batch})

    def run() -> list[dict]:
        return run_lines(CALLER, calls, stdin_of=stdin_of, timeout_s=30.0, line_chars=MAX_VALUE_CHARS + 50)

    first, second = run(), run()
    differs = {"ok": False, "why": "differs"}
    return [a if not a["ok"] or a == b else differs for a, b in zip(first, second, strict=True)]


def record(q: Question, result: str, pool: list[Tool], tools_per_example: int, seed: int) -> dict:
    """The conversation: the tools (the function and others of `pool` with other names, in a seeded
    order), the question, the call, its result and the answer. The other tools and the wording are
    drawn from a generator seeded by (seed, record id), so a record does not depend on the others."""
    rng = random.Random(f"{seed}\0{q.id}")
    tool, args, record_id = q.tool, q.arguments, q.id
    tools, names = [tool], {tool.name}
    for other in rng.sample(pool, min(len(pool), 4 * tools_per_example)):
        if len(tools) < tools_per_example and other.name not in names:
            tools.append(other)
            names.add(other.name)
    rng.shuffle(tools)
    shown = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in args.items())
    question = rng.choice(QUESTIONS).format(summary=tool.summary, arguments=shown)
    call_id = "call_" + stable_id("call", record_id)[:12]
    fn = {"name": tool.name, "arguments": json.dumps(args, ensure_ascii=False)}
    return {
        "id": record_id,
        "source_doc": tool.doc_id,
        "call_doc": q.call_doc,
        **({"held_out": q.held_out} if q.held_out else {}),
        "tools": [t.spec() for t in tools],
        "messages": [
            {"role": "user", "content": question},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": call_id, "type": "function", "function": fn}],
            },
            {"role": "tool", "tool_call_id": call_id, "content": result},
            {"role": "assistant", "content": rng.choice(ANSWERS).format(name=tool.name, result=result)},
        ],
    }
