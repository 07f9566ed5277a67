"""Verifiable rewards: each verifier type and malformed specs (the sandbox itself: test_sandbox.py)."""

from __future__ import annotations

import pytest

from trulyopen.rewards.verifiers import VerifierError, extract_code, parse_verifier, score_all

# --- verifiers --------------------------------------------------------------------------------------


def test_exact_strips_and_respects_case() -> None:
    v = parse_verifier({"type": "exact", "answer": "Paris"})
    assert v.kind == "exact"
    assert v.score("  Paris\n") == 1.0
    assert v.score("paris") == 0.0
    assert v.score("Paris, France") == 0.0
    assert parse_verifier({"type": "exact", "answer": "Paris", "case_sensitive": False}).score("PARIS") == 1.0
    assert parse_verifier({"type": "exact", "answer": "Paris", "strip": False}).score(" Paris") == 0.0


def test_regex_search_versus_fullmatch() -> None:
    search = parse_verifier({"type": "regex", "pattern": r"\d+"})
    full = parse_verifier({"type": "regex", "pattern": r"\d+", "fullmatch": True})
    assert search.score("the answer is 42") == 1.0
    assert full.score("the answer is 42") == 0.0
    assert full.score("42\n") == 1.0  # stripped first
    assert search.score("no digits here") == 0.0


def test_numeric_takes_the_last_number() -> None:
    v = parse_verifier({"type": "numeric", "answer": -1234.5})
    assert v.score("First 3 apples, then the total is -1,234.5.") == 1.0
    assert v.score("-1,234.5 at first, but finally 7") == 0.0
    assert v.score("no number at all") == 0.0
    assert parse_verifier({"type": "numeric", "answer": 1000}).score("about 1e3") == 1.0
    # relative tolerance for large numbers, absolute near zero
    big = parse_verifier({"type": "numeric", "answer": 1e9, "tolerance": 1e-6})
    assert big.score("1,000,000,500") == 1.0
    assert big.score("1,000,002,000") == 0.0
    assert parse_verifier({"type": "numeric", "answer": 0, "tolerance": 1e-3}).score("0.0005") == 1.0
    # an answer written as text, as GSM8K stores it
    assert parse_verifier({"type": "numeric", "answer": "1,234"}).score("so 1234") == 1.0


ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0"


def test_python_passes_and_fails_tests() -> None:
    v = parse_verifier({"type": "python", "tests": ADD_TESTS})
    assert v.kind == "python"
    assert v.score("def add(a, b):\n    return a + b\n") == 1.0
    assert v.score("def add(a, b):\n    return a - b\n") == 0.0
    assert v.score("def add(a, b) return a + b") == 0.0  # a syntax error


def test_python_takes_code_from_the_fenced_block() -> None:
    completion = (
        "Here is a shell command:\n```bash\nexit 1\n```\n"
        "And the function:\n```python\ndef add(a, b):\n    return a + b\n```\nIt adds."
    )
    assert extract_code(completion) == "def add(a, b):\n    return a + b\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```py\nx = 1") == "x = 1"  # cut off before the closing fence
    assert extract_code("x = 1") == "x = 1"
    assert parse_verifier({"type": "python", "tests": ADD_TESTS}).score(completion) == 1.0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([1, 2], "JSON object"),
        ({"answer": "1"}, "missing field 'type'"),
        ({"type": "llm-judge"}, "unknown verifier type 'llm-judge'"),
        ({"type": ["exact"]}, "unknown verifier type"),
        ({"type": "numeric", "answer": 10**400}, "'answer'"),
        ({"type": "exact"}, "missing field 'answer'"),
        ({"type": "exact", "answer": 42}, "'answer'"),
        ({"type": "exact", "answer": "4", "strip": "yes"}, "'strip'"),
        ({"type": "exact", "answer": "4", "case_sensitive": 1}, "'case_sensitive'"),
        ({"type": "regex"}, "missing field 'pattern'"),
        ({"type": "regex", "pattern": "(unclosed"}, "'pattern' is not a valid regular expression"),
        ({"type": "regex", "pattern": "a", "fullmatch": "no"}, "'fullmatch'"),
        ({"type": "numeric"}, "missing field 'answer'"),
        ({"type": "numeric", "answer": "forty-two"}, "'answer'"),
        ({"type": "numeric", "answer": True}, "'answer'"),
        ({"type": "numeric", "answer": 1, "tolerance": -1}, "'tolerance'"),
        ({"type": "numeric", "answer": 1, "tolerence": 0.1}, "unknown field(s) 'tolerence'"),
        ({"type": "python"}, "missing field 'tests'"),
        ({"type": "python", "tests": ["assert True"]}, "'tests'"),
        ({"type": "python", "tests": "  "}, "'tests'"),
        ({"type": "python", "tests": "pass", "timeout_s": 0}, "'timeout_s'"),
        ({"type": "python", "tests": "pass", "memory_mb": 1.5}, "'memory_mb'"),
    ],
)
def test_malformed_specs_are_errors_naming_the_problem(spec: object, message: str) -> None:
    with pytest.raises(VerifierError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_verifier(spec)


def test_score_all_keeps_order_across_types() -> None:
    exact = parse_verifier({"type": "exact", "answer": "4"})
    code = parse_verifier({"type": "python", "tests": ADD_TESTS})
    slow = parse_verifier({"type": "python", "tests": ADD_TESTS, "timeout_s": 3})
    right = "def add(a, b):\n    return a + b"
    wrong = "def add(a, b):\n    return 0"
    pairs = [(code, wrong), (exact, "4"), (code, right), (slow, right), (exact, "5"), (slow, wrong)]
    assert score_all(pairs, workers=2) == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
