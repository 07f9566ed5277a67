"""Evaluation task files and suites, the built-in tasks from the held-out split, and the
contamination report."""

from __future__ import annotations

import builtins
import io
import json
import random
import re
import tempfile
import textwrap
from pathlib import Path

import pytest

from trulyopen.data.sources import DataError
from trulyopen.evaluate.builtin import build_builtin_tasks, line_kinds, text_pieces
from trulyopen.evaluate.contamination import CorpusError, contamination_report
from trulyopen.evaluate.taskfile import (
    Instance,
    TaskError,
    instance_text,
    load_instances,
    load_suite,
    write_instances,
)
from trulyopen.files import sha256_file
from trulyopen.rewards.sandbox import run_python

# ----------------------------------------------------------------------------- task files

GOOD = {
    "multiple_choice": {"id": "q1", "context": "The sky is", "choices": ["blue", "green"], "answer": 0},
    "generation": {"id": "q1", "prompt": "2 + 2 =", "verifier": {"type": "numeric", "answer": 4}},
    "code": {"id": "q1", "prompt": "def f():\n", "tests": "assert f() == 1"},
    "text": {"id": "q1", "text": "Some held-out text."},
    "tool_call": {
        "id": "q1",
        "messages": [{"role": "user", "content": "Add 2 and 3."}],
        "tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}],
        "answer": {"name": "add", "arguments": {"a": 2, "b": 3}},
    },
}


def _tool(**changes) -> str:
    return json.dumps({**GOOD["tool_call"], "id": "q2", **changes})


def _mc(**changes) -> dict:
    record = {"id": "q2", "context": "Two plus two is", "choices": ["four", "five"], "answer": 0}
    record.update(changes)
    return {k: v for k, v in record.items() if v is not None}


MALFORMED = [
    ("multiple_choice", '{"context": "x", "choices": ["a", "b"], "answer": 1', "not valid JSON"),
    ("multiple_choice", "[1, 2]", "expected a JSON object, got list"),
    ("multiple_choice", json.dumps(_mc(answer=None)), "missing field(s) 'answer'"),
    ("multiple_choice", json.dumps(_mc(choices="ab")), "field 'choices' must be a list of strings, got str"),
    ("multiple_choice", json.dumps(_mc(choices=[])), "needs at least 2 choices, got 0"),
    ("multiple_choice", json.dumps(_mc(choices=["a", 3])), "choice 1 must be a non-empty string"),
    ("multiple_choice", json.dumps(_mc(choices=["a", "a"])), "choice 1 repeats choice 0"),
    ("multiple_choice", json.dumps(_mc(answer=2)), "'answer' is 2, out of range for 2 choices"),
    ("multiple_choice", json.dumps(_mc(answer="0")), "'answer' must be the index of the right choice"),
    ("multiple_choice", json.dumps(_mc(answer=True)), "'answer' must be the index of the right choice"),
    ("multiple_choice", json.dumps(_mc(context=5)), "field 'context' must be a string, got int"),
    ("multiple_choice", json.dumps(_mc(choises=["a", "b"])), "unknown field(s) 'choises'"),
    ("multiple_choice", json.dumps(_mc(id="q1")), "duplicate id 'q1' (first on line 1)"),
    ("multiple_choice", json.dumps(_mc(id=[1])), "field 'id' must be a non-empty string or an integer"),
    (
        "generation",
        '{"prompt": "hi", "verifier": {"type": "exactt"}}',
        "field 'verifier': unknown verifier type",
    ),
    (
        "generation",
        '{"prompt": "hi", "verifier": {"type": "numeric", "answer": "many"}}',
        "field 'verifier': field 'answer' of a 'numeric' verifier must be a finite number",
    ),
    (
        "generation",
        '{"prompt": 5, "verifier": {"type": "exact", "answer": "x"}}',
        "'prompt' must be a string",
    ),
    ("code", '{"prompt": "def f():\\n", "tests": "  "}', "field 'tests' must not be empty"),
    ("code", '{"prompt": "def f():\\n"}', "missing field(s) 'tests'"),
    ("text", '{"id": "t"}', "missing field(s) 'text'"),
    ("text", '{"text": "x", "choices": ["a"]}', "unknown field(s) 'choices' for a text item"),
    ("tool_call", _tool(answer={"name": "sub", "arguments": {}}), "field 'answer.name': 'sub' is none of"),
    (
        "tool_call",
        _tool(answer={"name": "add", "arguments": "{}"}),
        "'answer.arguments' must be a JSON object",
    ),
    ("tool_call", _tool(tools=[{"type": "function", "function": {}}]), "tools[0].function.name must be"),
    ("tool_call", _tool(messages=[{"role": "robot", "content": "x"}]), "messages[0].role is 'robot'"),
    ("tool_call", json.dumps({"messages": [], "answer": {}}), "missing field(s) 'tools'"),
]


@pytest.mark.parametrize(("kind", "line", "message"), MALFORMED)
def test_malformed_task_file_is_named_by_file_and_line(tmp_path: Path, kind: str, line: str, message: str):
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps(GOOD[kind]) + "\n\n" + line + "\n" + json.dumps(GOOD[kind]) + "\n")
    with pytest.raises(TaskError) as err:
        load_instances(path, kind)
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)


def test_task_file_level_errors(tmp_path: Path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(TaskError, match="task file not found"):
        load_instances(missing, "text")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(TaskError, match=f"^{re.escape(str(empty))}: no items$"):
        load_instances(empty, "text")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(TaskError, match="not a UTF-8 text file"):
        load_instances(binary, "text")
    empty.write_text('{"text": "x"}\n')
    with pytest.raises(TaskError, match="unknown task type 'mcq'"):
        load_instances(empty, "mcq")


def test_ids_default_to_line_numbers_and_files_round_trip(tmp_path: Path):
    path = tmp_path / "mc.jsonl"
    path.write_text(
        json.dumps({"context": "A cat is an", "choices": ["animal", "rock"], "answer": 0})
        + "\n\n"
        + json.dumps(
            {"context": "", "question": "Pick b", "choices": ["a", "b"], "answer": 1, "meta": {"s": 1}}
        )
        + "\n"
    )
    first, second = load_instances(path, "multiple_choice")
    assert (first.id, first.where, first.answer, first.question) == ("1", f"{path}:1", 0, None)
    assert (second.id, second.where, second.question, second.meta) == ("3", f"{path}:3", "Pick b", {"s": 1})

    copy = tmp_path / "copy.jsonl"
    assert write_instances(copy, [first, second]) == 2
    assert load_instances(copy, "multiple_choice") == [
        Instance(**{**vars(first), "where": f"{copy}:1"}),
        Instance(**{**vars(second), "where": f"{copy}:2"}),
    ]
    assert not list(tmp_path.glob("*.tmp-*"))


def test_instance_text_holds_everything_an_item_shows():
    mc = Instance(id="1", where="f:1", kind="multiple_choice", context="ctx", choices=["x", "y"], answer=0)
    assert instance_text(mc) == "ctx\nx\ny"
    gen = Instance(
        id="1", where="f:1", kind="generation", prompt="2+2?", verifier={"type": "exact", "answer": "4"}
    )
    assert instance_text(gen) == "2+2?\n4"
    code = Instance(id="1", where="f:1", kind="code", prompt="def f():\n", tests="assert f()")
    assert instance_text(code) == "def f():\n\nassert f()"
    path = Path(tempfile.mkdtemp()) / "tools.jsonl"
    path.write_text(json.dumps(GOOD["tool_call"]) + "\n")
    [tool] = load_instances(path, "tool_call")
    assert instance_text(tool) == 'Add 2 and 3.\n{"name": "add", "arguments": {"a": 2, "b": 3}}'
    assert write_instances(path, [tool]) == 1 and load_instances(path, "tool_call") == [tool]


# ----------------------------------------------------------------------------- suites


def _suite(tmp_path: Path, tasks: object) -> Path:
    (tmp_path / "tasks").mkdir(exist_ok=True)
    (tmp_path / "tasks" / "mc.jsonl").write_text(json.dumps(GOOD["multiple_choice"]) + "\n")
    (tmp_path / "tasks" / "code.jsonl").write_text(json.dumps(GOOD["code"]) + "\n")
    path = tmp_path / "suite.yaml"
    path.write_text(json.dumps(tasks))  # JSON is YAML
    return path


def test_suite_resolves_paths_and_fills_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = _suite(
        tmp_path,
        [
            {"name": "mc", "path": "tasks/mc.jsonl", "type": "multiple_choice", "few_shot": 2},
            {
                "name": "code",
                "path": "tasks/code.jsonl",
                "type": "code",
                "samples": 4,
                "temperature": 0.8,
                "k": [1, 4],
            },
        ],
    )
    monkeypatch.chdir("/")
    mc, code = load_suite(path)
    assert mc.path == (tmp_path / "tasks" / "mc.jsonl").resolve()
    assert (mc.few_shot, mc.seed, mc.normalization, mc.forms, mc.k, mc.limit) == (
        2,
        1234,
        "char",
        ["cloze", "lettered"],
        [1],
        None,
    )
    assert (code.samples, code.k, code.max_new_tokens) == (4, [1, 4], 128)
    assert all(f.description for f in type(mc).model_fields.values())


SUITE_ERRORS = [
    ({"name": "a"}, "expected a non-empty YAML list of tasks, got dict"),
    (
        [{"name": "a", "path": "tasks/mc.jsonl", "type": "multiple_choice", "fewshot": 1}],
        "task 0 ('a'): field 'fewshot': unknown key",
    ),
    ([{"name": "a", "path": "tasks/mc.jsonl", "type": "mcq"}], "task 0 ('a'): field 'type'"),
    (
        [{"name": "a", "path": "tasks/mc.jsonl", "type": "multiple_choice", "normalization": "bytes"}],
        "field 'normalization'",
    ),
    ([{"name": "a", "type": "multiple_choice"}], "task 0 ('a'): field 'path': required but missing"),
    (
        [
            {"name": "a", "path": "tasks/mc.jsonl", "type": "multiple_choice"},
            {"name": "b", "path": "tasks/none.jsonl", "type": "text"},
        ],
        "task 1 ('b'): field 'path': task file not found",
    ),
    (
        [
            {"name": "a", "path": "tasks/mc.jsonl", "type": "multiple_choice"},
            {"name": "a", "path": "tasks/code.jsonl", "type": "code"},
        ],
        "task 1 ('a'): field 'name': repeats the name",
    ),
    ([{"name": "a/b", "path": "tasks/mc.jsonl", "type": "multiple_choice"}], "name 'a/b' must be letters"),
    (
        [
            {
                "name": "c",
                "path": "tasks/code.jsonl",
                "type": "code",
                "samples": 2,
                "temperature": 0.8,
                "k": [1, 5],
            }
        ],
        "pass@5 needs samples >= 5",
    ),
    (
        [{"name": "c", "path": "tasks/code.jsonl", "type": "code", "samples": 4}],
        "needs a temperature above 0",
    ),
    ([{"name": "c", "path": "tasks/code.jsonl", "type": "code", "limit": 0}], "field 'limit'"),
    (["just a string"], "task 0: expected a mapping of fields, got str"),
]


@pytest.mark.parametrize(("tasks", "message"), SUITE_ERRORS)
def test_suite_errors_name_the_file_and_the_task(tmp_path: Path, tasks: object, message: str):
    path = _suite(tmp_path, tasks)
    with pytest.raises(TaskError) as err:
        load_suite(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


def test_suite_checks_its_task_files_and_yaml(tmp_path: Path):
    path = _suite(tmp_path, [{"name": "a", "path": "tasks/mc.jsonl", "type": "multiple_choice"}])
    task = tmp_path / "tasks" / "mc.jsonl"
    task.write_text(json.dumps(GOOD["multiple_choice"]) + "\n" + '{"context": "x"}\n')
    with pytest.raises(TaskError, match=f"^{re.escape(str(task.resolve()))}:2: missing field"):
        load_suite(path)
    path.write_text("- name: [unclosed\n")
    with pytest.raises(TaskError, match="not valid YAML"):
        load_suite(path)


# ----------------------------------------------------------------------------- built-in tasks

MATHY = '''\
import math
import os


def add(a, b):
    """Add two numbers and return their sum.

    >>> add(2, 3)
    5
    """
    return a + b


def hypotenuse(a, b):
    """Length of the hypotenuse of a right triangle.

    >>> hypotenuse(3, 4)
    5.0
    """
    return math.hypot(a, b)


def wrong_example(x):
    """Double a number; the example expects the wrong answer.

    >>> wrong_example(2)
    5
    """
    return x * 2


def silent(items):
    """Sort a list in place; the example shows no output at all.

    >>> silent([3, 1, 2])
    """
    items.sort()


def uses_helper(x):
    """Call a helper that only this module defines.

    >>> uses_helper(1)
    2
    """
    return _helper(x)


def _helper(x):
    return x + 1


class Box:
    def size(self):
        """The size of the box, which is always three.

        >>> Box().size()
        3
        """
        return 3
'''

WORDS = """\
def count_words(text):
    words = text.split()
    counts = {}
    for word in words:
        counts[word] = counts.get(word, 0) + 1
    return counts


def longest_line(lines):
    best = ""
    for line in lines:
        if len(line) > len(best):
            best = line
    return best


def flatten(nested):
    result = []
    for part in nested:
        result.extend(part)
    return result
"""

TRAIN_ONLY = '''\
def triple(x):
    """Triple a number, a function only the training split has.

    >>> triple(2)
    6
    """
    return 3 * x
'''

README = "A plain text document about the project. " * 120  # ~5,000 chars, one line: cut inside


def _write_corpus(path: Path, docs: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for doc_id, text in docs.items():
            f.write(json.dumps({"id": doc_id, "source": "test", "meta": {}, "text": text}) + "\n")


@pytest.fixture(scope="module")
def val_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("run")
    corpus = root / "data" / "corpus"
    val_docs = {"pkg/mathy.py": MATHY, "pkg/words.py": WORDS, "README.txt": README}
    _write_corpus(corpus / "val.jsonl", val_docs)
    _write_corpus(corpus / "train.jsonl", {"pkg/train_only.py": TRAIN_ONLY * 3, "pkg/more.py": WORDS * 2})
    report = build_builtin_tasks(corpus / "val.jsonl", root / "tasks", seed=0)
    return {"root": root, "corpus": corpus, "val": val_docs, "report": report, "out": root / "tasks"}


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_next_line_items_point_at_the_real_next_line(val_run: dict):
    items = _read(val_run["out"] / "next_line.jsonl")
    ids = {item["id"] for item in items}
    functions = ["add", "hypotenuse", "wrong_example", "silent", "uses_helper", "Box.size"]
    assert ids == {f"pkg/mathy.py::{f}" for f in functions} | {
        f"pkg/words.py::{f}" for f in ("count_words", "longest_line", "flatten")
    }  # _helper has 2 lines: nothing to predict after 3
    val_lines = "\n".join(val_run["val"].values()).split("\n")
    for item in items:
        doc, _, name = item["id"].partition("::")
        answer = item["choices"][item["answer"]]
        context_lines = item["context"].split("\n")[:-1]
        assert item["context"].endswith("\n") and len(context_lines) >= 3
        # the context and the answer are consecutive lines of the function (methods are dedented)
        text = val_run["val"][doc] if "." not in name else textwrap.dedent(MATHY.split("class Box:\n")[1])
        assert item["context"] + answer + "\n" in text + "\n"
        assert val_run["val"][doc].split("\n")[item["meta"]["line"] - 1].strip() == answer.strip()
        # three distinct distractors from other functions, indented like the answer
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        indent = answer[: len(answer) - len(answer.lstrip())]
        for choice in item["choices"]:
            assert choice.startswith(indent) and not choice[len(indent)].isspace()
            assert any(line.strip() == choice.strip() for line in val_lines)
            if choice != answer:
                assert choice.strip() not in {line.strip() for line in context_lines}
        if answer.strip().startswith(("return", "for ", "if ")):  # code: no docstring lines offered
            assert not any(c.strip().startswith(('"""', ">>>")) for c in item["choices"])


def test_line_kinds_tell_strings_from_code():
    lines = ["def f(x):", '    """First line.', "    >>> f(1)", '    """', "    y = 'a'", "    return y"]
    assert line_kinds(lines) == ["code", "text", "text", "text", "code", "code"]


def test_docstring_tasks_keep_only_discriminating_doctests(val_run: dict):
    items = {item["id"]: item for item in _read(val_run["out"] / "docstring_completion.jsonl")}
    assert set(items) == {"pkg/mathy.py::add", "pkg/mathy.py::hypotenuse"}
    assert val_run["report"]["docstring_completion"]["filter"] == {
        "candidates": 5,  # Box.size is a method: left out
        "fails_with_real_body": 2,  # wrong_example, uses_helper (its helper is not in the prompt)
        "passes_with_stub": 1,  # silent
        "kept": 2,
    }
    hyp = items["pkg/mathy.py::hypotenuse"]
    assert (
        hyp["prompt"].startswith("import math\n\n\ndef hypotenuse(a, b):\n")
        and "import os" not in hyp["prompt"]
    )
    assert hyp["prompt"].endswith('    5.0\n    """\n')
    assert (
        items["pkg/mathy.py::add"]["prompt"]
        == MATHY[MATHY.index("def add") : MATHY.index("    return a + b")]
    )
    for item in items.values():
        for body, passes in ((item["meta"]["solution"], True), ("    return None\n", False)):
            program = item["prompt"] + body + "\n\n" + item["tests"] + "\n"  # as evaluate_code joins them
            assert run_python(program).ok is passes


def test_heldout_text_pieces_cover_the_documents(val_run: dict):
    items = _read(val_run["out"] / "heldout_text.jsonl")
    for doc_id, text in val_run["val"].items():
        pieces = sorted((i["meta"]["offset"], i["text"]) for i in items if i["meta"]["source_doc"] == doc_id)
        assert "".join(p for _, p in pieces) == text
        assert all(text[offset:].startswith(piece) for offset, piece in pieces)
    assert len([i for i in items if i["meta"]["source_doc"] == "README.txt"]) == 2  # 5,040 chars, cut inside


def test_text_pieces_cut_at_line_ends():
    text = "".join(f"line {i:03d} " + "x" * 40 + "\n" for i in range(100))  # 5,000 chars in 100 lines
    pieces = text_pieces(text)
    assert "".join(p for _, p in pieces) == text
    assert [len(p) for _, p in pieces] == [2000, 2000, 1000]
    assert all(p.endswith("\n") for _, p in pieces)
    tail = text_pieces("a" * 2000 + "\n" + "b" * 100)  # a tail under 500 chars joins the piece before
    assert [len(p) for _, p in tail] == [2101]


def test_builtin_tasks_are_deterministic_and_never_read_train(val_run: dict, monkeypatch, tmp_path: Path):
    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        assert "train" not in Path(str(file)).name, f"opened {file}"
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)
    val = val_run["corpus"] / "val.jsonl"
    again = build_builtin_tasks(val, tmp_path / "again", seed=0)
    other = build_builtin_tasks(val, tmp_path / "other", seed=1)
    monkeypatch.undo()
    for name, first in val_run["report"].items():
        assert again[name]["sha256"] == first["sha256"] == sha256_file(first["file"])
        assert again[name]["items"] == first["items"]
    assert other["next_line"]["sha256"] != again["next_line"]["sha256"]
    assert "triple" not in (tmp_path / "again" / "docstring_completion.jsonl").read_text()
    with pytest.raises(DataError, match="held-out split only"):
        build_builtin_tasks(val_run["corpus"] / "train.jsonl", tmp_path / "bad")


def test_tool_call_task_is_made_from_the_held_out_tool_conversations(val_run: dict, tmp_path: Path):
    """The synth stage's held-out conversations become tool_call items up to the question, with the
    call they make as the answer; a line that is no such conversation is named."""
    from trulyopen.recipe import SynthConfig
    from trulyopen.synth import synthesize

    from .test_synth import tools_corpus

    synthesize(
        SynthConfig(kinds=["tools"], tools_heldout=0.5, seed=0), tools_corpus(tmp_path), tmp_path / "synth"
    )
    heldout = tmp_path / "synth" / "tools_heldout.jsonl"
    conversations = {r["id"]: r for r in _read(heldout)}
    report = build_builtin_tasks(val_run["corpus"] / "val.jsonl", tmp_path / "tasks", tools_heldout=heldout)
    seen = 0
    for task, held_out in (("tool_call", "call"), ("tool_call_new_tools", "function")):
        items = load_instances(tmp_path / "tasks" / f"{task}.jsonl", "tool_call")
        assert report[task]["items"] == len(items) > 0
        for item in items:
            source = conversations[item.id]
            call = source["messages"][1]["tool_calls"][0]["function"]
            assert source["held_out"] == held_out
            assert item.messages == source["messages"][:1] and item.tools == source["tools"]
            assert item.call == {"name": call["name"], "arguments": json.loads(call["arguments"])}
        seen += len(items)
    assert seen == len(conversations)
    # without held-out conversations the task is empty, and the eval stage leaves it out
    none = build_builtin_tasks(val_run["corpus"] / "val.jsonl", tmp_path / "none")
    assert none["tool_call"]["items"] == none["tool_call_new_tools"]["items"] == 0
    heldout.write_text(heldout.read_text() + '{"id": "x", "messages": []}\n')
    with pytest.raises(
        DataError, match=f"{re.escape(str(heldout))}:{len(conversations) + 1}: not a tool-use"
    ):
        build_builtin_tasks(val_run["corpus"] / "val.jsonl", tmp_path / "bad", tools_heldout=heldout)


def test_builtin_tasks_respect_max_items(val_run: dict, tmp_path: Path):
    report = build_builtin_tasks(val_run["corpus"] / "val.jsonl", tmp_path, seed=0, max_items=1)
    assert {name: r["items"] for name, r in report.items()} == {
        "next_line": 1,
        "docstring_completion": 1,
        "heldout_text": 1,
        "tool_call": 0,  # (no synth stage here)
        "tool_call_new_tools": 0,
    }
    for r in report.values():
        assert r["items"] == 0 or load_instances(
            Path(r["file"]), r["type"]
        )  # every file is a valid task file


# ----------------------------------------------------------------------------- contamination


def _words(rng: random.Random, n: int) -> list[str]:
    """Letter-only words (digits would all hash as "0")."""
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(7)) for _ in range(n)]


@pytest.fixture
def planted(tmp_path: Path) -> dict:
    rng = random.Random(7)
    ctx = {name: _words(rng, 20) for name in ("copied", "overlap13", "overlap12", "clean")}
    mc = tmp_path / "mc.jsonl"
    write_instances(
        mc,
        [
            {"id": name, "context": " ".join(words), "choices": _words(rng, 2), "answer": 0}
            for name, words in ctx.items()
        ],
    )
    short9, short5 = _words(rng, 9), _words(rng, 5)
    text = tmp_path / "text.jsonl"
    write_instances(
        text,
        [
            {"id": "short9", "text": " ".join(short9)},
            {"id": "short5", "text": " ".join(short5)},
            {"id": "long", "text": " ".join(_words(rng, 40))},
        ],
    )
    clean = tmp_path / "clean.jsonl"
    write_instances(clean, [{"id": f"c{i}", "text": " ".join(_words(rng, 30))} for i in range(3)])

    def filler(n: int = 30) -> str:
        return " ".join(_words(rng, n))

    train = tmp_path / "train.jsonl"
    _write_corpus(
        train,
        {
            "d0": filler(200),
            "d1": filler() + "\n" + " ".join(ctx["copied"]) + "\n" + filler(),
            "d2": filler() + " " + " ".join(ctx["overlap13"][4:17]) + " " + filler(),
            "d3": filler() + " " + " ".join(ctx["overlap12"][4:16]) + " " + filler(),
            "d4": filler() + " " + " ".join(short9) + " " + " ".join(short5) + " " + filler(),
            "d5": " ".join(ctx["copied"]),  # later copy: the report names the first document
        },
    )
    files = {"mc": mc, "text": text, "clean": clean}
    kinds = {"mc": "multiple_choice", "text": "text", "clean": "text"}
    return {"files": files, "kinds": kinds, "train": train, "ctx": ctx, "tmp": tmp_path}


def test_contamination_finds_planted_overlaps(planted: dict):
    report = contamination_report(planted["files"], planted["kinds"], [planted["train"]])
    assert report["mc"] == {
        "items": 4,
        "checked": 4,
        "too_short": 0,
        "contaminated": 2,
        "share": 0.5,
        "examples": [{"id": "copied", "corpus_doc": "d1"}, {"id": "overlap13", "corpus_doc": "d2"}],
        "ngram": 13,
        "corpora": [str(planted["train"])],
    }
    text = report["text"]
    assert (text["items"], text["checked"], text["too_short"], text["contaminated"]) == (3, 2, 1, 1)
    assert text["share"] == 1 / 3 and text["examples"] == [{"id": "short9", "corpus_doc": "d4"}]
    clean = report["clean"]
    assert (clean["items"], clean["contaminated"], clean["share"], clean["examples"]) == (3, 0, 0.0, [])

    shorter = contamination_report(planted["files"], planted["kinds"], [planted["train"]], ngram=12)
    assert [e["id"] for e in shorter["mc"]["examples"]] == ["copied", "overlap13", "overlap12"]


def test_contamination_reads_directories_and_names_bad_lines(planted: dict):
    corpus = planted["tmp"] / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "sub" / "notes.txt").write_text("intro " + " ".join(planted["ctx"]["clean"]) + " outro")
    (corpus / ".hidden.txt").write_text(" ".join(planted["ctx"]["copied"]))
    _write_corpus(corpus / "part.jsonl", {"j1": " ".join(planted["ctx"]["overlap12"])})
    report = contamination_report(planted["files"], planted["kinds"], [corpus])
    assert report["mc"]["examples"] == [
        {"id": "overlap12", "corpus_doc": "j1"},
        {"id": "clean", "corpus_doc": str(corpus / "sub" / "notes.txt")},
    ]
    assert report["text"]["contaminated"] == 0

    (corpus / "part.jsonl").write_text('{"id": "j1", "text": "fine"}\n{"id": "j2"}\n')
    with pytest.raises(CorpusError, match=f"^{re.escape(str(corpus / 'part.jsonl'))}:2: expected an object"):
        contamination_report(planted["files"], planted["kinds"], [corpus])
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such corpus"):
        contamination_report(planted["files"], planted["kinds"], [planted["tmp"] / "missing.jsonl"])
