"""Built-in evaluation tasks made from the run's held-out split, so a run needs no downloaded benchmark.

Only what the model never trained on is read: `data/corpus/val.jsonl` (the data stage keeps
near-duplicates of it out of train) and the synth stage's held-out tool conversations, so these
tasks measure generalisation, not recall.

    next_line.jsonl             multiple choice: the first lines of a function (at least 3, the cut
                                drawn by a seeded RNG), then its real next non-empty line against 3
                                lines of other held-out functions, the nearest in length; every
                                choice gets the real line's indentation, so indentation gives
                                nothing away
    docstring_completion.jsonl  code: a module-level function's signature and docstring (with the
                                module's imports it uses) to complete; the tests run its doctest
                                examples. Kept only if the examples pass with the real body and fail
                                with `pass` and with `raise NotImplementedError`, checked in the
                                sandbox, so every item can be passed and cannot be passed by a stub
    heldout_text.jsonl          text: held-out documents cut at line ends into pieces of about
                                2,000 characters, for bits per byte
    tool_call.jsonl             tool calls: the synth stage's held-out conversations
                                (synth/tools_heldout.jsonl, never trained on), asked up to the
                                question: is the right function called, with valid arguments? Here
                                new questions to functions the tuned model was trained to call
    tool_call_new_tools.jsonl   the same for functions held out of training altogether

Each task keeps at most `max_items` items, picked by a hash of (seed, item id) and written in that
order, so a task's `limit` takes a seeded sample and not the first files. Each item's own choices
(the cut, the distractors, the shuffle) come from an RNG seeded by (seed, item id), so an item does
not change when other documents come or go. The same val split and seed give the same bytes.
"""

from __future__ import annotations

import ast
import bisect
import doctest
import io
import json
import random
import re
import textwrap
import tokenize
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from trulyopen.data.sources import DataError
from trulyopen.evaluate.taskfile import write_instances
from trulyopen.files import sha256_file
from trulyopen.rewards.sandbox import run_many
from trulyopen.synth.code_tasks import _LINE_BREAK, _definitions, find_functions, parse_python, rank_key

MIN_CONTEXT_LINES = 3
MAX_CONTEXT_LINES = 40  # keeps multiple-choice prompts short; the cut falls in a function's first lines
MIN_LINE_CHARS = 6  # shorter lines ("else:", ")", "pass") are too often right in any function
DISTRACTORS = 3
NEAREST = 24  # distractors are drawn from this many other-function lines nearest in length
MAX_BODY_LINES = 40  # docstring completion: longer bodies are beyond what a small model can write
SANDBOX_TIMEOUT_S = 5.0  # as the code evaluation runs them
TEXT_CHARS = 2000
STUBS = ("pass", "raise NotImplementedError")  # bodies a docstring task must not accept

TASKS = {
    "next_line": "multiple_choice",
    "docstring_completion": "code",
    "heldout_text": "text",
    "tool_call": "tool_call",
    "tool_call_new_tools": "tool_call",
}


@dataclass
class _Doc:
    index: int
    id: str
    text: str
    tree: ast.Module | None


def read_val(val_corpus: Path) -> list[_Doc]:
    """The documents of the held-out split, in file order; refuses to read a train split."""
    val_corpus = Path(val_corpus)
    if val_corpus.name.startswith("train"):
        raise DataError(f"{val_corpus}: built-in tasks come from the held-out split only, not from train")
    if not val_corpus.is_file():
        raise DataError(f"{val_corpus}: held-out split not found (run the data stage first)")
    docs: list[_Doc] = []
    seen: set[str] = set()
    with open(val_corpus, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{val_corpus}:{lineno}: not valid JSON: {e.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{val_corpus}:{lineno}: expected an object with a string field 'text'")
            doc_id = str(record.get("id", lineno))
            if doc_id in seen:
                continue
            seen.add(doc_id)
            text = record["text"]
            docs.append(_Doc(len(docs), doc_id, text, parse_python(text)))
    return docs


def _seeded(seed: int, task: str, item_id: str) -> random.Random:
    return random.Random(f"{seed}\0{task}\0{item_id}")


def _select(items: list[dict], seed: int, max_items: int) -> list[dict]:
    """At most max_items items, the smallest by the seeded hash of their id, in that order."""
    return sorted(items, key=lambda r: rank_key(seed, r["id"]))[:max_items]


# ----------------------------------------------------------------------------- next line


def _functions(doc: _Doc) -> Iterator[tuple[str, list[str], int]]:
    """(qualname, dedented lines from the first decorator to the end, first line number) of every
    function of a module (methods included, as code_tasks finds them)."""
    lines = _LINE_BREAK.split(doc.text)
    seen: Counter = Counter()
    for owner, node in _definitions(doc.tree.body, None):
        qualname = node.name if owner is None else f"{owner}.{node.name}"
        seen[qualname] += 1
        if seen[qualname] > 1:
            qualname += f"#{seen[qualname]}"
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        body = textwrap.dedent("\n".join(lines[start - 1 : node.end_lineno]))
        yield qualname, body.split("\n"), start


def _answerable(line: str) -> bool:
    """A line worth predicting: long enough to be specific, and code rather than a comment."""
    stripped = line.strip()
    return len(stripped) >= MIN_LINE_CHARS and not stripped.startswith("#")


_OPENS_STRING = re.compile(r"[rRbBuUfF]{0,2}[\"']")


def line_kinds(lines: list[str]) -> list[str]:
    """ "text" for each line that opens a string or lies inside a multi-line one (docstrings,
    messages), "code" for the others. A distractor is of the same kind as the real line, or a
    docstring line among code lines would give the answer away."""
    kinds = ["text" if _OPENS_STRING.match(line.lstrip()) else "code" for line in lines]
    try:
        for token in tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline):
            if token.type == tokenize.STRING:
                for row in range(token.start[0] + 1, token.end[0] + 1):
                    kinds[row - 1] = "text"
    except (tokenize.TokenError, SyntaxError):
        pass  # a function cut out of odd source: the first-character rule alone
    return kinds


class _LinePool:
    """Every answerable line of every held-out function, by kind and sorted by length, for distractors."""

    def __init__(self, functions: list[tuple[str, list[str], list[str]]]):
        owner: dict[tuple[str, str], str] = {}
        for fn_id, lines, kinds in functions:
            for line, kind in zip(lines, kinds, strict=True):
                if _answerable(line):
                    owner.setdefault((kind, line.strip()), fn_id)
        self.owner = owner
        self.lines: dict[str, list[str]] = {}
        for kind, line in sorted(owner, key=lambda k: (k[0], len(k[1]), k[1])):
            self.lines.setdefault(kind, []).append(line)
        self.lengths = {kind: [len(s) for s in lines] for kind, lines in self.lines.items()}

    def nearest(self, kind: str, length: int, exclude: set[str], fn_id: str, count: int) -> list[str]:
        """Up to count lines of that kind from other functions, nearest to length, outside exclude."""
        lines, lengths = self.lines.get(kind, []), self.lengths.get(kind, [])
        found: list[str] = []
        hi = bisect.bisect_left(lengths, length)
        lo = hi - 1
        while len(found) < count and (lo >= 0 or hi < len(lines)):
            # take the side whose next line is nearer in length
            if hi >= len(lines) or (lo >= 0 and length - lengths[lo] <= lengths[hi] - length):
                line, lo = lines[lo], lo - 1
            else:
                line, hi = lines[hi], hi + 1
            if line not in exclude and self.owner[(kind, line)] != fn_id:
                found.append(line)
        return found


def next_line_items(docs: list[_Doc], seed: int) -> list[dict]:
    """One multiple-choice item per function that has a line to predict after its first 3 lines."""
    functions = [
        (f"{doc.id}::{name}", lines, line_kinds(lines), doc.id, start)
        for doc in docs
        if doc.tree is not None
        for name, lines, start in _functions(doc)
    ]
    pool = _LinePool([(fn_id, lines, kinds) for fn_id, lines, kinds, _, _ in functions])
    items = []
    for fn_id, lines, kinds, doc_id, start in functions:
        cuts = [
            j
            for j in range(MIN_CONTEXT_LINES, min(len(lines), MAX_CONTEXT_LINES + 1))
            if _answerable(lines[j])
        ]
        if not cuts:
            continue
        rng = _seeded(seed, "next_line", fn_id)
        j = rng.choice(cuts)
        real = lines[j].rstrip()
        indent = real[: len(real) - len(real.lstrip())]
        own_lines = {line.strip() for line in lines}
        nearest = pool.nearest(kinds[j], len(real.strip()), own_lines, fn_id, NEAREST)
        if len(nearest) < DISTRACTORS:
            continue
        choices = [real] + [indent + line for line in rng.sample(nearest, DISTRACTORS)]
        rng.shuffle(choices)
        items.append(
            {
                "id": fn_id,
                "context": "\n".join(lines[:j]) + "\n",
                "choices": choices,
                "answer": choices.index(real),
                "meta": {"source_doc": doc_id, "line": start + j},
            }
        )
    return items


# ----------------------------------------------------------------------------- docstring completion


def _names_used(node: ast.AST, examples: list[doctest.Example]) -> set[str]:
    """Names the function's code and its doctest examples refer to."""
    trees = [node]
    for example in examples:
        tree = parse_python(example.source)
        if tree is not None:
            trees.append(tree)
    return {n.id for tree in trees for n in ast.walk(tree) if isinstance(n, ast.Name)}


def _imports_for(doc: _Doc, used: set[str]) -> list[str]:
    """The module's top-level absolute imports that bind a name in used, as written."""
    out = []
    for stmt in doc.tree.body:
        if isinstance(stmt, ast.Import) or (isinstance(stmt, ast.ImportFrom) and stmt.level == 0):
            bound = {(a.asname or a.name).split(".")[0] for a in stmt.names}
            if bound & used or (isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__"):
                out.append(ast.get_source_segment(doc.text, stmt))
    return out


def doctest_program(name: str, docstring: str) -> str:
    """Test code that runs the doctest examples of docstring against the function `name` defined
    above it, and exits non-zero unless at least one ran and none failed."""
    return (
        "import doctest as _doctest\n\n"
        f"_test = _doctest.DocTestParser().get_doctest({docstring!r}, dict(globals()), {name!r}, None, 0)\n"
        "_runner = _doctest.DocTestRunner(verbose=False)\n"
        "_runner.run(_test)\n"
        "if _runner.failures or not _runner.tries:\n"
        f"    raise SystemExit(f'{{_runner.failures}} of {{_runner.tries}} examples of {name} failed')\n"
    )


@dataclass
class _Candidate:
    id: str
    prompt: str
    body: str
    stub_indent: str
    tests: str
    doc_id: str
    name: str

    def program(self, body: str) -> str:
        return self.prompt + body + "\n\n" + self.tests + "\n"  # as evaluate_code joins them


def _candidates(docs: list[_Doc], stats: Counter) -> list[_Candidate]:
    """Module-level documented functions whose docstring has doctest examples."""
    out = []
    for doc in docs:
        if doc.tree is None:
            continue
        for fn in find_functions(doc.id, doc.tree, doc.text, MAX_BODY_LINES, doc.index, Counter()):
            docstring = fn.node.body[0].value.value
            if fn.owner is not None or ">>>" not in docstring:
                continue
            try:
                examples = doctest.DocTestParser().get_examples(docstring)
            except ValueError:  # badly indented examples: doctest itself would refuse them
                examples = []
            if not examples:
                stats["bad_doctest"] += 1
                continue
            if not fn.source.startswith(fn.header + "\n"):  # the header's last line had trailing blanks
                stats["no_clean_cut"] += 1
                continue
            body = fn.source[len(fn.header) + 1 :] + "\n"
            first = next(line for line in body.split("\n") if line.strip())
            imports = _imports_for(doc, _names_used(fn.node, examples))
            prompt = ("\n".join(imports) + "\n\n\n" if imports else "") + fn.header + "\n"
            out.append(
                _Candidate(
                    id=f"{doc.id}::{fn.qualname}",
                    prompt=prompt,
                    body=body,
                    stub_indent=first[: len(first) - len(first.lstrip())],
                    tests=doctest_program(fn.node.name, docstring),
                    doc_id=doc.id,
                    name=fn.qualname,
                )
            )
    return out


def _run_ok(programs: list[str]) -> list[bool]:
    return [r.ok for r in run_many(programs, workers=2, timeout_s=SANDBOX_TIMEOUT_S, memory_mb=512)]


def docstring_items(docs: list[_Doc], seed: int, max_items: int, stats: Counter) -> list[dict]:
    """Code items whose doctests the real body passes and both stubs fail, in the seeded order.

    Candidates are checked in that order, a batch at a time, until max_items are kept, so a small
    max_items runs few programs.
    """
    candidates = sorted(_candidates(docs, stats), key=lambda c: rank_key(seed, c.id))
    stats["candidates"] = len(candidates)
    items: list[dict] = []
    batch = 16
    for start in range(0, len(candidates), batch):
        if len(items) >= max_items:
            break
        chunk = candidates[start : start + batch]
        real = _run_ok([c.program(c.body) for c in chunk])
        passing = [c for c, ok in zip(chunk, real, strict=True) if ok]
        stats["fails_with_real_body"] += len(chunk) - len(passing)
        stub_ok = _run_ok([c.program(f"{c.stub_indent}{stub}\n") for c in passing for stub in STUBS])
        for n, c in enumerate(passing):
            if any(stub_ok[len(STUBS) * n : len(STUBS) * (n + 1)]):
                stats["passes_with_stub"] += 1
                continue
            if len(items) < max_items:
                items.append(
                    {
                        "id": c.id,
                        "prompt": c.prompt,
                        "tests": c.tests,
                        "meta": {"source_doc": c.doc_id, "function": c.name, "solution": c.body},
                    }
                )
    stats["kept"] = len(items)
    return items


# ----------------------------------------------------------------------------- held-out text


def text_pieces(text: str, target: int = TEXT_CHARS) -> list[tuple[int, str]]:
    """(offset, piece): text cut at line ends once a piece reaches target characters; a line
    longer than twice target is cut inside, and a last piece under a quarter of target joins the
    one before it. Whitespace-only pieces are left out."""
    pieces: list[tuple[int, str]] = []
    start = pos = 0
    for line in text.splitlines(keepends=True):
        while len(line) > 2 * target:  # minified code or data: cut inside the line
            if pos > start:
                pieces.append((start, text[start:pos]))
            pieces.append((pos, line[:target]))
            line, pos = line[target:], pos + target
            start = pos
        pos += len(line)
        if pos - start >= target:
            pieces.append((start, text[start:pos]))
            start = pos
    if pos > start:
        if pieces and pos - start < target // 4:
            offset, last = pieces.pop()
            pieces.append((offset, last + text[start:pos]))
        else:
            pieces.append((start, text[start:pos]))
    return [(offset, piece) for offset, piece in pieces if piece.strip()]


def heldout_text_items(docs: list[_Doc]) -> list[dict]:
    return [
        {"id": f"{doc.id}#{k}", "text": piece, "meta": {"source_doc": doc.id, "offset": offset}}
        for doc in docs
        for k, (offset, piece) in enumerate(text_pieces(doc.text))
    ]


# ----------------------------------------------------------------------------- tool calls


def tool_call_items(heldout: Path | None, held_out: str) -> list[dict]:
    """One item per held-out tool-use conversation of the kind `held_out` ("call": a new question
    to a trained function; "function": a function never trained on): its tools and question, and
    the call it makes as the answer."""
    if heldout is None or not Path(heldout).is_file():
        return []
    items = []
    for lineno, line in enumerate(Path(heldout).read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
            question, call_turn = record["messages"][:2]
            call = call_turn["tool_calls"][0]["function"]
            answer = {"name": call["name"], "arguments": json.loads(call["arguments"])}
        except (ValueError, KeyError, IndexError, TypeError):
            raise DataError(f"{heldout}:{lineno}: not a tool-use conversation of the synth stage") from None
        if record.get("held_out", "function") != held_out:
            continue
        meta = {"source_doc": record.get("source_doc"), "call_doc": record.get("call_doc")}
        items.append(
            {
                "id": record["id"],
                "messages": [question],
                "tools": record["tools"],
                "answer": answer,
                "meta": meta,
            }
        )
    return items


# ----------------------------------------------------------------------------- all of them


def build_builtin_tasks(
    val_corpus: Path, out_dir: Path, seed: int = 0, max_items: int = 500, tools_heldout: Path | None = None
) -> dict:
    """Write next_line, docstring_completion and heldout_text task files from the held-out split,
    and tool_call from the synth stage's held-out tool conversations when there are some.

    Returns {task: {"file", "type", "items", "sha256"}}, plus the docstring filter's counts under
    "docstring_completion"/"filter". A task with no items gets an empty file.
    """
    if max_items < 1:
        raise ValueError(f"max_items must be at least 1, got {max_items}")
    docs = read_val(val_corpus)
    stats: Counter = Counter()
    made = {
        "next_line": _select(next_line_items(docs, seed), seed, max_items),
        "docstring_completion": docstring_items(docs, seed, max_items, stats),
        "heldout_text": _select(heldout_text_items(docs), seed, max_items),
        "tool_call": _select(tool_call_items(tools_heldout, "call"), seed, max_items),
        "tool_call_new_tools": _select(tool_call_items(tools_heldout, "function"), seed, max_items),
    }
    out_dir = Path(out_dir)
    report: dict = {}
    for name, items in made.items():
        path = out_dir / f"{name}.jsonl"
        write_instances(path, items)
        report[name] = {
            "file": str(path),
            "type": TASKS[name],
            "items": len(items),
            "sha256": sha256_file(path),
        }
    report["docstring_completion"]["filter"] = dict(sorted(stats.items()))
    return report
