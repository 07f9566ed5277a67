"""synth: SFT, preference and GRPO data from a corpus, decontamination, and the optional remote model."""

from __future__ import annotations

import ast
import builtins
import hashlib
import json
import random
import textwrap
import time
from pathlib import Path

import pytest

from trulyopen.data.sources import DataError
from trulyopen.recipe import DecontaminationConfig, RemoteModelConfig, SynthConfig
from trulyopen.rewards.verifiers import parse_verifier
from trulyopen.synth import synthesize
from trulyopen.synth.corrupt import CORRUPTIONS, corrupt
from trulyopen.synth.expressions import check_expression
from trulyopen.synth.remote import remote_step

from .fake_api import Reply, anthropic_reply, fake_api, openai_reply

KEY_ENV = "TRULYOPEN_TEST_SYNTH_KEY"
SECRET = "sk-test-very-secret-0123456789"

HELPERS = '''\
"""Small helpers."""

import functools

LIMIT = 2 * (3 + 4)
PARTS = 'a,b'.split(',')
ORDER = sorted([3, 1, 2])
MASK = (1 << 8) - 1
BIG = 2 ** 64
RATIO = 1 / 4
INFINITE = 1 / 0
HUGE = 10 ** 10 ** 10
EVIL = __import__('os').system('echo pwned')
WIDE = 'ab' * 1000 * 1000
MIXED = ','.join({'x', 'y'})


def clamp(value, low, high):
    """Return value limited to the closed interval from low to high."""
    if value < low:
        return low
    if value > high:
        return high
    return value


@functools.lru_cache(maxsize=None)
def fib(n):
    """Return the n-th Fibonacci number, counting from fib(0) == 0."""
    if n < 2 and n >= 0:
        return n
    return fib(n - 1) + fib(n - 2)


def wrap_words(text, width):
    """Break the text into lines of at most width characters, keeping whole words together and
    never splitting a word across lines."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + [line] if line else lines


def _private_helper(items):
    """Count the items that are truthy, skipping None and empty strings."""
    return sum(1 for x in items if x)


def undocumented(x):
    return x + 1


def terse(x):
    """Add one."""
    return x + 1


def stub(x):
    """This function is not implemented yet, it only raises."""
    raise NotImplementedError


class Stack:
    """A last-in first-out stack."""

    def __init__(self):
        self.items = []

    def push(self, item):
        """Put item on the top of the stack and return the new size."""
        self.items.append(item)
        return len(self.items)

    def pop(self):
        """Remove and return the top item, or None when the stack is empty."""
        if not self.items:
            return None
        return self.items.pop()
'''

LONG = (
    'def long_one(x):\n    """A function whose body is far too long to be an answer."""\n'
    + "    x += 1\n" * 40
)


def generated(i: int) -> str:
    return textwrap.dedent(f'''\
        def scale_{i}(x, y):
            """Multiply x by {i} and add y; say whether that exceeds {i * 10}."""
            total = x * {i} + y
            if total > {i * 10}:
                return max(total, y)
            return None
        ''')


def build_run(tmp_path: Path) -> Path:
    """A run's data directory: corpus/train.jsonl, corpus/val.jsonl and the data manifest."""
    data = tmp_path / "run" / "data"
    (data / "corpus").mkdir(parents=True)
    docs = [
        ("toy/helpers.py", HELPERS),
        ("toy/long.py", LONG),
        ("toy/broken.py", "def broken(:\n    pass\n"),
        ("toy/generated.py", "\n\n".join(generated(i) for i in range(2, 12))),
    ]
    with open(data / "corpus" / "train.jsonl", "w") as f:
        for doc_id, text in docs:
            f.write(json.dumps({"id": doc_id, "source": "toy", "meta": {}, "text": text}) + "\n")
    secret = 'def secret_function(a):\n    """This docstring belongs to the validation split only."""\n'
    (data / "corpus" / "val.jsonl").write_text(
        json.dumps({"id": "toy/val.py", "source": "toy", "meta": {}, "text": secret + "    return a\n"})
        + "\n"
    )
    (data / "manifest.json").write_text(json.dumps({"sources": [{"name": "toy", "license": "MIT"}]}))
    return data / "corpus"


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return build_run(tmp_path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def code_of(fenced: str) -> str:
    assert fenced.startswith("```python\n") and fenced.endswith("\n```")
    return fenced[len("```python\n") : -len("\n```")]


def names_in(records: list[dict]) -> set[str]:
    """The function each SFT or preference record is about."""
    out = set()
    for r in records:
        answer = r["messages"][1]["content"] if "messages" in r else r["chosen"]
        node = ast.parse(code_of(answer)).body[0]
        out.add(node.name)
    return out


def test_sft_answers_are_the_functions_as_written(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "synth"
    m = synthesize(SynthConfig(kinds=["sft"], max_per_kind=100), corpus, out)
    records = read_jsonl(out / "sft.jsonl")
    by_name = {ast.parse(code_of(r["messages"][1]["content"])).body[0].name: r for r in records}

    assert set(by_name) == {"clamp", "fib", "wrap_words", "_private_helper", "push", "pop"} | {
        f"scale_{i}" for i in range(2, 12)
    }
    for r in records:
        user, assistant = r["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert r["source_doc"] in ("toy/helpers.py", "toy/generated.py")
        ast.parse(code_of(assistant["content"]))
    # the answer is the original text, decorator and comments included, methods dedented
    fib = code_of(by_name["fib"]["messages"][1]["content"])
    assert fib.startswith("@functools.lru_cache(maxsize=None)\ndef fib(n):\n")
    assert fib in HELPERS
    pop = code_of(by_name["pop"]["messages"][1]["content"])
    assert textwrap.indent(pop, "    ") in HELPERS
    prompt = by_name["pop"]["messages"][0]["content"]
    assert "method of class `Stack`" in prompt
    assert '```python\ndef pop(self):\n    """Remove and return the top item' in prompt
    assert "self.items.pop()" not in prompt  # the body is what the model must write
    wrap_prompt = by_name["wrap_words"]["messages"][0]["content"]
    assert 'never splitting a word across lines."""\n```' in wrap_prompt

    assert m["functions"]["skipped"] == {
        "no_docstring": 2,  # undocumented, Stack.__init__
        "short_docstring": 1,
        "stub": 1,
        "too_long": 1,
    }
    assert m["corpus"]["unparsable"] == 1 and m["corpus"]["unparsable_examples"] == ["toy/broken.py"]
    assert m["kinds"]["sft"]["kept"] == len(records) == 16
    assert m["sources"] == [{"name": "toy", "license": "MIT", "examples": 16}]
    assert m["files"]["sft.jsonl"]["records"] == 16
    assert not (out / "preference.jsonl").exists() and not (out / "grpo.jsonl").exists()
    card = (out / "SYNTHCARD.md").read_text()
    assert "| toy | MIT | 16 |" in card and "No evaluation sets were given" in card
    assert "secret_function" not in (out / "sft.jsonl").read_text()  # the val split is never read


def test_preference_pairs_differ_by_one_corruption(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "synth"
    m = synthesize(SynthConfig(kinds=["sft", "preference"], max_per_kind=100), corpus, out)
    pairs = read_jsonl(out / "preference.jsonl")
    prompts = {r["messages"][0]["content"] for r in read_jsonl(out / "sft.jsonl")}
    assert len(pairs) == 16
    for p in pairs:
        chosen, rejected = ast.parse(code_of(p["chosen"])), ast.parse(code_of(p["rejected"]))
        assert p["chosen"] != p["rejected"]
        assert ast.unparse(chosen) == code_of(p["chosen"])  # both printed the same way
        assert ast.get_docstring(chosen.body[0]) == ast.get_docstring(rejected.body[0])
        assert p["prompt"] in prompts and p["corruption"] in CORRUPTIONS
    stats = m["kinds"]["preference"]
    assert sum(stats["corruptions"].values()) == stats["kept"] == 16
    # the real function, reprinted: clamp's chosen answer behaves like clamp
    clamp = next(p for p in pairs if "def clamp(" in p["chosen"])
    space: dict = {}
    exec(code_of(clamp["chosen"]), space)  # our own test fixture, not corpus input
    assert [space["clamp"](v, 0, 10) for v in (-5, 5, 50)] == [0, 5, 10]
    # a method's docstring is dedented like the function, not left one level too deep
    pop = next(p for p in pairs if "def pop(" in p["chosen"])
    assert '"""Remove and return the top item, or None when the stack is empty."""' in pop["chosen"]


def test_every_corruption_keeps_syntax_and_changes_code() -> None:
    src = textwrap.dedent('''\
        def f(a, b):
            """A function with somewhere to apply every corruption."""
            if a < b and b > 0:
                x = divmod(a, b)
            else:
                x = (b, a)
            y = 1 if a else 2
            return x
        ''')
    fn = ast.parse(src).body[0]
    original = ast.unparse(fn)
    seen = set()
    for seed in range(200):
        made = corrupt(fn, random.Random(seed))
        assert made is not None
        kind, text = made
        seen.add(kind)
        tree = ast.parse(text)
        assert text != original
        assert ast.get_docstring(tree.body[0]) == ast.get_docstring(fn)
    assert seen == set(CORRUPTIONS)
    assert ast.unparse(fn) == original  # the input is never modified
    bare = ast.parse('def g():\n    """Nothing in here can be corrupted at all."""\n    pass\n').body[0]
    assert corrupt(bare, random.Random(0)) is None


def test_grpo_answers_are_checked_and_dangerous_expressions_refused(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_eval(*args: object, **kw: object) -> None:
        raise AssertionError("synth must never evaluate corpus expressions in its own process")

    monkeypatch.setattr(builtins, "eval", no_eval)
    out = tmp_path / "synth"
    m = synthesize(SynthConfig(kinds=["grpo"], max_per_kind=100), corpus, out)
    monkeypatch.undo()
    records = read_jsonl(out / "grpo.jsonl")
    answers = {r["prompt"].split("`")[1]: r["verifier"] for r in records}
    assert answers == {
        "2 * (3 + 4)": {"type": "numeric", "answer": 14, "tolerance": 0.0},
        "'a,b'.split(',')": {"type": "exact", "answer": "['a', 'b']"},
        "sorted([3, 1, 2])": {"type": "exact", "answer": "[1, 2, 3]"},
        "(1 << 8) - 1": {"type": "numeric", "answer": 255, "tolerance": 0.0},
        "2 ** 64": {"type": "exact", "answer": "18446744073709551616"},
        "1 / 4": {"type": "numeric", "answer": 0.25, "tolerance": 1e-6},
    }
    text = (out / "grpo.jsonl").read_text()
    for bad in ("10 ** 10 ** 10", "__import__", "system", "'ab' * 1000", "join({", "1 / 0"):
        assert bad not in text
    for r in records:
        assert r["prompt"].endswith("Answer with the value's repr only.")
        v = parse_verifier(r["verifier"])
        assert v.score(str(r["verifier"]["answer"])) == 1.0
    g = m["kinds"]["grpo"]
    assert g["failed"] == {"ZeroDivisionError": 1}
    assert g["rejected"]["power"] == 1 and g["rejected"]["call"] >= 1 and g["rejected"]["repeat"] == 1
    assert g["rejected"]["unordered"] == 1
    assert g["verifiers"] == {"numeric": 3, "exact": 3}


def test_expression_whitelist() -> None:
    def reason(text: str) -> str | None:
        return check_expression(ast.parse(text, mode="eval").body)

    for ok in ("2 * (3 + 4)", "'a,b'.split(',')", "sorted({'b', 'a'})", "len({'x'})", "b'ab'[::-1]"):
        assert reason(ok) is None, ok
    assert reason("10 ** 10 ** 10") == "power"
    assert reason("__import__('os')") == "call"
    assert reason("(1).__class__") == "attribute"
    assert reason("'{0.__class__}'.format(1)") == "attribute"
    assert reason("'ab' * 1000 * 1000") == "repeat"
    assert reason("'x'.center(10 ** 9)") == "repeat"
    assert reason("list(range(10 ** 9))") == "range"
    assert reason("range(3)") == "range" and reason("sum(range(3))") is None
    assert reason("1 << 100000") == "shift"
    assert reason("','.join({'x', 'y'})") == "unordered"
    assert reason("[x for x in (1, 2)]") == "syntax"
    assert reason("len(x)") == "name"
    assert reason("(1, 2, 3)") == "trivial"
    assert reason("-1") == "trivial"


def test_same_seed_same_bytes_other_seed_other_sample(corpus: Path, tmp_path: Path) -> None:
    files = ("sft.jsonl", "preference.jsonl", "grpo.jsonl", "manifest.json", "SYNTHCARD.md")

    def run(seed: int, name: str) -> dict[str, bytes]:
        synthesize(SynthConfig(max_per_kind=6, seed=seed), corpus, tmp_path / name)
        return {f: (tmp_path / name / f).read_bytes() for f in files}

    first, again, other = run(0, "a"), run(0, "b"), run(1, "c")
    assert first == again
    assert first["sft.jsonl"] != other["sft.jsonl"]
    assert first["preference.jsonl"] != other["preference.jsonl"]
    assert len(read_jsonl(tmp_path / "c" / "sft.jsonl")) == 6
    manifest = json.loads(first["manifest.json"])
    for f in ("sft.jsonl", "preference.jsonl", "grpo.jsonl"):
        assert manifest["files"][f]["sha256"] == hashlib.sha256(first[f]).hexdigest()


def test_decontamination_removes_quoted_examples(corpus: Path, tmp_path: Path) -> None:
    evals = tmp_path / "evals.jsonl"
    quote = "keeping whole words together and never splitting a word across lines"
    evals.write_text(
        json.dumps({"text": f"Q: Break the text into lines of at most width characters, {quote}?"}) + "\n"
    )
    decon = DecontaminationConfig(eval_files=[evals], ngram=13)
    out = tmp_path / "synth"
    m = synthesize(SynthConfig(kinds=["sft", "preference"], max_per_kind=100), corpus, out, decon)
    for kind in ("sft", "preference"):
        records = read_jsonl(out / f"{kind}.jsonl")
        assert "wrap_words" not in names_in(records) and len(records) == 15
        assert m["kinds"][kind]["decontaminated"] == 1
        assert m["kinds"][kind]["decontaminated_by_eval_set"] == {str(evals): 1}
    assert m["decontamination"] == {"ngram": 13, "text_field": "text", "eval_sets": [str(evals)]}
    # with a limit, removed examples are replaced by the next candidates
    m = synthesize(SynthConfig(kinds=["sft"], max_per_kind=15), corpus, tmp_path / "limited", decon)
    assert m["kinds"]["sft"]["kept"] == 15 and "wrap_words" not in names_in(
        read_jsonl(tmp_path / "limited" / "sft.jsonl")
    )


def test_malformed_corpus_line_is_named(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.jsonl").write_text('{"id": "a", "text": "x = 1"}\n{"id": "b", "text": 3}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:2: .*string text"):
        synthesize(SynthConfig(), corpus, tmp_path / "out")
    (corpus / "train.jsonl").write_text('{"id": "a", "text": "x = 1"}\nnot json\n')
    with pytest.raises(DataError, match=r"train\.jsonl:2: not valid JSON"):
        synthesize(SynthConfig(), corpus, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="run the data stage first"):
        synthesize(SynthConfig(), tmp_path / "nowhere", tmp_path / "out")


# ----------------------------------------------------------------------------- the remote model


def remote(url: str, provider: str = "openai", **kw: object) -> RemoteModelConfig:
    base = url + "/v1" if provider == "openai" else url
    fields = {"requests_per_minute": 60_000, "max_retries": 2, "api_key_env": KEY_ENV, **kw}
    return RemoteModelConfig(provider=provider, model="fake-model", base_url=base, **fields)


def sft_records(n: int) -> list[dict]:
    return [
        {
            "id": f"sft-{i}",
            "source_doc": "toy/x.py",
            "messages": [
                {"role": "user", "content": f"Write f{i}"},
                {"role": "assistant", "content": f"```python\ndef f{i}():\n    return {i}\n```"},
            ],
        }
        for i in range(n)
    ]


def test_remote_write_replaces_answers_and_keeps_the_key_secret(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)

    def respond(path: str, headers: dict, body: dict, n: int) -> Reply:
        return openai_reply("Here you go:\n```python\ndef written():\n    return 42\n```\n")

    with fake_api(respond) as api:
        cfg = SynthConfig(
            kinds=["sft"], max_per_kind=100, remote=remote(api.url, task="write", max_examples=5)
        )
        m = synthesize(cfg, corpus, tmp_path / "synth", log=lambda line: None)
    assert len(api.requests) == 5
    path, headers, body = api.requests[0]
    assert path == "/v1/chat/completions" and headers["authorization"] == f"Bearer {SECRET}"
    assert body["model"] == "fake-model" and body["messages"][-1]["content"].startswith("Write a Python")
    records = read_jsonl(tmp_path / "synth" / "sft.jsonl")
    written = [r for r in records if r.get("written_by") == "fake-model"]
    assert len(written) == 5 and len(records) == 16
    for r in written:
        assert r["messages"][1]["content"] == "```python\ndef written():\n    return 42\n```"
        assert r["reference"].startswith("```python\n") and "written" not in r["reference"]
    assert m["remote"]["outcomes"] == {"written": 5} and m["remote"]["failed"] == 0
    for f in (tmp_path / "synth").iterdir():
        assert SECRET not in f.read_text()
    assert (
        "`fake-model` (openai API) was asked to write 5" in (tmp_path / "synth" / "SYNTHCARD.md").read_text()
    )


def test_remote_judge_drops_low_ratings_anthropic(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)

    def respond(path: str, headers: dict, body: dict, n: int) -> Reply:
        assert path == "/v1/messages" and body["max_tokens"] > 0 and "system" in body
        return anthropic_reply("2" if "def scale_" in body["messages"][0]["content"] else "Rating: 8/10")

    with fake_api(respond) as api:
        cfg = SynthConfig(
            kinds=["sft"],
            max_per_kind=100,
            remote=remote(api.url, "anthropic", task="judge", max_examples=100),
        )
        m = synthesize(cfg, corpus, tmp_path / "synth", log=lambda line: None)
    headers = api.requests[0][1]
    assert headers["x-api-key"] == SECRET and headers["anthropic-version"] == "2023-06-01"
    records = read_jsonl(tmp_path / "synth" / "sft.jsonl")
    assert names_in(records) == {"clamp", "fib", "wrap_words", "_private_helper", "push", "pop"}
    assert all(r["rating"] == {"score": 8, "model": "fake-model"} for r in records)
    r = m["remote"]
    assert r["dropped"] == 10 and r["ratings"] == {"2": 10, "8": 6} and len(api.requests) == 16
    assert m["kinds"]["sft"]["kept"] == 6 and SECRET not in json.dumps(m)


def test_remote_retries_429_honouring_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)

    def respond(path: str, headers: dict, body: dict, n: int) -> Reply:
        if n == 1:
            return 429, {"Retry-After": "1"}, {"error": "slow down"}
        return openai_reply("```python\ndef better():\n    return 1\n```")

    with fake_api(respond) as api:
        start = time.monotonic()
        records, stats = remote_step(sft_records(2), remote(api.url, task="write"), log=lambda line: None)
        elapsed = time.monotonic() - start
    assert elapsed >= 1.0  # waited as long as the server asked
    assert stats["retries"] == 1 and stats["requests"] == 3 and stats["outcomes"] == {"written": 2}
    assert all(r["written_by"] == "fake-model" for r in records)


def test_remote_failures_leave_examples_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    with fake_api(lambda path, headers, body, n: (500, {}, {"error": "down"})) as api:
        before = sft_records(3)
        records, stats = remote_step(
            before, remote(api.url, task="write"), backoff_s=0.01, log=lambda s: None
        )
    assert records == sft_records(3)
    assert stats["failed"] == 3 and stats["failures"] == {"HTTP 500, 3 attempts": 3}
    assert stats["requests"] == 9 and len(api.requests) == 9

    # a server that echoes the key back in an error: the key still appears nowhere
    def echo(path: str, headers: dict, body: dict, n: int) -> Reply:
        return 400, {}, f"bad request from {headers['authorization']}"

    with fake_api(echo) as api:
        records, stats = remote_step(sft_records(1), remote(api.url, task="judge"), log=lambda s: None)
    assert stats["failed"] == 1 and SECRET not in json.dumps(stats) and "***" in json.dumps(stats)

    # a refused key stops the step after one request
    with fake_api(lambda path, headers, body, n: (401, {}, {"error": "no"})) as api:
        records, stats = remote_step(sft_records(4), remote(api.url, task="judge"), log=lambda s: None)
    assert len(api.requests) == 1 and records == sft_records(4)
    assert stats["outcomes"] == {"failed": 1, "not_asked": 3}


def test_remote_skipped_without_key(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    lines: list[str] = []
    with fake_api(lambda path, headers, body, n: openai_reply("9")) as api:
        cfg = SynthConfig(kinds=["sft"], max_per_kind=100, remote=remote(api.url, task="judge"))
        m = synthesize(cfg, corpus, tmp_path / "with", log=lines.append)
    assert api.requests == []
    assert any(f"${KEY_ENV} is not set" in line and "skipped" in line for line in lines)
    assert m["remote"]["skipped"] == f"${KEY_ENV} is not set"
    synthesize(SynthConfig(kinds=["sft"], max_per_kind=100), corpus, tmp_path / "without", log=lines.append)
    assert (tmp_path / "with" / "sft.jsonl").read_bytes() == (tmp_path / "without" / "sft.jsonl").read_bytes()


# ----------------------------------------------------------------------------- tools

UNITS = '''\
"""Unit conversions.

>>> to_celsius(212)
100.0
"""

import os


def to_celsius(fahrenheit, digits=1):
    """Convert a temperature in degrees Fahrenheit to degrees Celsius."""
    return round((fahrenheit - 32) * 5 / 9, digits)


def join_words(words: list, sep: str = " "):
    """Join the words with the separator between each pair.

    >>> join_words(["a", "b"], sep="-")
    'a-b'
    """
    return sep.join(words)


def bounded(value: int, low: int = 0, high: int = 100):
    """Return the value limited to the closed interval from low to high."""
    return min(max(value, low), high)


def initials(name):
    """Return the first letter of each word of a name, in capitals."""
    return "".join(word[0].upper() for word in name.split())


def home_of(user):
    """Return the home directory of a user, as the environment says."""
    return os.environ.get("HOME", "/home/" + user)


def spread(text):
    """Return the distinct letters of a text, in no particular order."""
    return list(set(text))


def boxed(value):
    """Wrap a value in a one-element tuple subclass nobody can serialise."""
    return object()


def total(*numbers):
    """Add up any number of numbers given as arguments."""
    return sum(numbers)


if __name__ == "__main__":
    print(to_celsius(100), to_celsius(-40, digits=0), join_words(["x", "y", "z"]))
    print(home_of("ann"), spread("abcdefghijkl"), spread("mnopqrstuvwx"), boxed(3), total(1, 2))
'''
CALLER = '''\
"""Uses the conversions."""

import units
from units import join_words

BOUNDED = [units.bounded(15, high=10), units.initials("Ada King Lovelace")]
READINGS = [units.to_celsius(50), units.to_celsius(98.6, digits=2), units.to_celsius("hot")]
TITLE = join_words(["unit", "report"])
SAME = units.to_celsius(50)
'''


def tools_corpus(tmp_path: Path) -> Path:
    data = tmp_path / "tools-run" / "data"
    (data / "corpus").mkdir(parents=True)
    with open(data / "corpus" / "train.jsonl", "w") as f:
        for doc_id, text in [("toy/units.py", UNITS), ("toy/report.py", CALLER), ("toy/helpers.py", HELPERS)]:
            f.write(json.dumps({"id": doc_id, "source": "toy", "meta": {}, "text": text}) + "\n")
    return data / "corpus"


def test_tools_conversations_call_corpus_functions_with_their_real_results(tmp_path: Path) -> None:
    """Each conversation offers the called function among others, asks with its summary and the
    arguments the corpus uses, calls it with arguments its schema accepts, and the tool turn holds
    what the function really returns; functions that read the machine, return what JSON cannot
    hold, answer differently from run to run, or take *args never become calls."""
    import jsonschema
    from transformers import AutoTokenizer

    from trulyopen.data.tokenizer import CHAT_TEMPLATE, save_hf, train_tokenizer
    from trulyopen.finetune.records import parse
    from trulyopen.finetune.render import ChatRenderer
    from trulyopen.recipe import TokenizerConfig

    corpus = tools_corpus(tmp_path)
    manifest = synthesize(SynthConfig(kinds=["tools"], tools_heldout=0.0), corpus, tmp_path / "out")
    trained = read_jsonl(tmp_path / "out" / "tools.jsonl")
    held = read_jsonl(tmp_path / "out" / "tools_heldout.jsonl")  # a new question to each function
    assert [r["held_out"] for r in held] == ["call", "call"]  # called three or more times
    records = trained + held
    namespace: dict = {}
    exec(UNITS, namespace)  # the test's own copy: what the functions really return
    calls = set()
    for r in records:
        user, call_turn, tool_turn, answer = r["messages"]
        [call] = call_turn["tool_calls"]
        name, arguments = call["function"]["name"], json.loads(call["function"]["arguments"])
        spec = next(t["function"] for t in r["tools"] if t["function"]["name"] == name)
        jsonschema.validate(arguments, spec["parameters"])
        assert spec["description"] in user["content"] and len(r["tools"]) == 3
        assert tool_turn["tool_call_id"] == call["id"] and tool_turn["content"] in answer["content"]
        assert json.loads(tool_turn["content"]) == namespace[name](**arguments)
        calls.add((name, json.dumps(arguments, sort_keys=True)))
    assert calls == {
        ("to_celsius", '{"fahrenheit": 212}'),  # the module's doctest
        ("to_celsius", '{"fahrenheit": 100}'),  # its __main__ block
        ("to_celsius", '{"digits": 0, "fahrenheit": -40}'),
        ("to_celsius", '{"fahrenheit": 50}'),  # another document, through `import units`, once
        ("to_celsius", '{"digits": 2, "fahrenheit": 98.6}'),
        ("join_words", '{"sep": "-", "words": ["a", "b"]}'),
        ("join_words", '{"words": ["x", "y", "z"]}'),
        ("join_words", '{"words": ["unit", "report"]}'),  # through `from units import join_words`
        ("bounded", '{"high": 10, "value": 15}'),
        ("initials", '{"name": "Ada King Lovelace"}'),
    }
    stats = manifest["kinds"]["tools"]
    assert stats["tools_skipped"]["reads_machine"] == 1  # home_of
    assert stats["tools_skipped"]["signature"] == 2  # total(*numbers), and fib under its decorator
    assert stats["failed"] == {"TypeError": 1, "differs": 1, "not_json": 1} or stats["failed"] == {
        "TypeError": 1,
        "differs": 2,
        "not_json": 1,
    }  # to_celsius("hot"); spread(...): its two texts, one of which may come out equal by chance
    # the records train as chat records: the call is the assistant's, the result is not
    save_hf(
        train_tokenizer(iter([UNITS, CALLER, HELPERS] * 20), TokenizerConfig(vocab_size=600)),
        tmp_path / "tok",
    )
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    ex = parse(records[0], "auto", "tools.jsonl:1", 0)
    rendered = ChatRenderer(tok, CHAT_TEMPLATE).conversation(ex.messages, ex.tools)
    trained = tok.decode([t for t, x in zip(rendered.ids, rendered.trained, strict=True) if x])
    assert (
        f'<tool_call>{{"name": "{records[0]["messages"][1]["tool_calls"][0]["function"]["name"]}"' in trained
    )
    assert records[0]["messages"][0]["content"] not in trained and "<tools>" not in trained


def test_tools_hold_out_functions_and_repeat_to_the_byte(tmp_path: Path) -> None:
    corpus = tools_corpus(tmp_path)

    def run(name: str) -> tuple[list[dict], list[dict], bytes]:
        synthesize(SynthConfig(kinds=["tools"], tools_heldout=0.5, seed=0), corpus, tmp_path / name)
        out = tmp_path / name
        return (
            read_jsonl(out / "tools.jsonl"),
            read_jsonl(out / "tools_heldout.jsonl"),
            (out / "tools.jsonl").read_bytes(),
        )

    train, held, raw = run("a")
    called = lambda records: {r["messages"][1]["tool_calls"][0]["function"]["name"] for r in records}  # noqa: E731
    new_tools = [r for r in held if r["held_out"] == "function"]
    new_questions = [r for r in held if r["held_out"] == "call"]
    assert train and new_tools and new_questions and len(new_tools) + len(new_questions) == len(held)
    assert not called(train) & called(new_tools)
    assert not any(
        t["function"]["name"] in called(new_tools) for r in train for t in r["tools"]
    )  # not even shown
    asked = {r["messages"][0]["content"] for r in train}
    assert called(new_questions) <= called(train) and not asked & {r["messages"][0]["content"] for r in held}
    assert run("b")[2] == raw
