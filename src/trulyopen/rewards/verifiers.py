"""Verifiers: the JSON object in a data record that says how to check a completion.

A record reads `{"prompt": ..., "verifier": {"type": ..., ...}}`. The verifier scores a completion
1.0 or 0.0 by checking it (an exact answer, a pattern, a number within tolerance, tests that pass),
so a GRPO reward can be audited and reproduced, unlike a learned reward model's opinion.

Specs are validated when parsed, strictly: an unknown type, a missing or mistyped field, or a field
no type knows (a typo such as "tolerence") is a VerifierError naming the field, raised before any
training starts. Cutting the completion at an end-of-turn marker is the caller's job.
"""

from __future__ import annotations

import math
import re
import textwrap
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from typing import ClassVar

from trulyopen.errors import UserError
from trulyopen.rewards.sandbox import run_many, run_python


class VerifierError(UserError, ValueError):
    """A malformed verifier spec; the message says what is wrong (the caller adds file:line)."""


class Verifier(ABC):
    """Scores a completion 1.0 (verified) or 0.0."""

    kind: ClassVar[str]

    @abstractmethod
    def score(self, completion: str) -> float: ...


@dataclass(frozen=True)
class ExactVerifier(Verifier):
    kind: ClassVar[str] = "exact"
    answer: str
    strip: bool = True
    case_sensitive: bool = True

    def score(self, completion: str) -> float:
        got, want = completion, self.answer
        if self.strip:
            got, want = got.strip(), want.strip()
        if not self.case_sensitive:
            got, want = got.casefold(), want.casefold()
        return float(got == want)


@dataclass(frozen=True)
class RegexVerifier(Verifier):
    kind: ClassVar[str] = "regex"
    pattern: str
    fullmatch: bool = False
    strip: bool = True  # so that a fullmatch is not defeated by a trailing newline
    compiled: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "compiled", re.compile(self.pattern))
        except re.error as e:
            raise VerifierError(f"verifier field 'pattern' is not a valid regular expression: {e}") from e

    def score(self, completion: str) -> float:
        text = completion.strip() if self.strip else completion
        match = self.compiled.fullmatch(text) if self.fullmatch else self.compiled.search(text)
        return float(match is not None)


# a number as people and models write it: -1,234.5  3.  .5  1e3  +2.5E-3  (and the Unicode minus);
# not glued to a word before it, so "x2" holds no number and the "-" in "5-3" is no sign; units after
# it are fine ("12km"), but a group of four digits after a comma is no thousands group
_NUMBER = re.compile(
    r"(?<![\w.])[-+\u2212]?"  # a sign, not glued to what comes before
    r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)"  # 1,234  1234  1234.5  3.  .5
    r"(?:[eE][-+]?\d+)?(?!\d)"  # an exponent
)


def parse_number(text: str) -> float | None:
    """The last number written in text, thousands separators dropped; None when there is none."""
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    return float(numbers[-1].replace(",", "").replace("\u2212", "-"))


@dataclass(frozen=True)
class NumericVerifier(Verifier):
    kind: ClassVar[str] = "numeric"
    answer: float
    tolerance: float = 1e-6

    def score(self, completion: str) -> float:
        got = parse_number(completion)
        if got is None:
            return 0.0
        # absolute near zero, relative for large numbers
        return float(math.isclose(got, self.answer, rel_tol=self.tolerance, abs_tol=self.tolerance))


@dataclass(frozen=True)
class PythonVerifier(Verifier):
    kind: ClassVar[str] = "python"
    tests: str
    timeout_s: float = 5.0
    memory_mb: int = 512

    def program(self, completion: str) -> str:
        """The completion's code followed by the tests: it passes iff it exits cleanly."""
        return f"{extract_code(completion)}\n\n{self.tests}\n"

    def score(self, completion: str) -> float:
        result = run_python(
            self.program(completion), timeout_s=self.timeout_s, memory_mb=self.memory_mb, max_output=2000
        )
        return float(result.ok)


# an opening fence with an optional language tag, then everything up to the closing fence, or to the
# end of the text when the completion was cut off inside the block
_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"", "python", "python3", "py"}
_FLOAT_MAX = 1.7976931348623157e308  # a JSON integer beyond this cannot become a float


def extract_code(text: str) -> str:
    """The first ```python (or untagged) fenced block of text; the whole text when there is none."""
    for match in _FENCE.finditer(text):
        if match.group(1).lower() in _PYTHON_TAGS:
            return textwrap.dedent(match.group(2))
    return text


# per type: the required fields, then the optional ones with their default
_FIELDS: dict[str, tuple[type[Verifier], tuple[str, ...], dict[str, object]]] = {
    "exact": (ExactVerifier, ("answer",), {"strip": True, "case_sensitive": True}),
    "regex": (RegexVerifier, ("pattern",), {"fullmatch": False, "strip": True}),
    "numeric": (NumericVerifier, ("answer",), {"tolerance": 1e-6}),
    "python": (PythonVerifier, ("tests",), {"timeout_s": 5.0, "memory_mb": 512}),
}


def parse_verifier(spec: object) -> Verifier:
    """Validate a verifier spec (a dict from JSON) and build its Verifier; VerifierError if malformed."""
    if not isinstance(spec, dict):
        raise VerifierError(f"verifier must be a JSON object, got {type(spec).__name__}")
    kind = spec.get("type")
    if not isinstance(kind, str) or kind not in _FIELDS:
        known = ", ".join(sorted(_FIELDS))
        what = "missing field 'type'" if kind is None else f"unknown verifier type {kind!r}"
        raise VerifierError(f"{what}: expected one of {known}")
    cls, required, optional = _FIELDS[kind]
    unknown = sorted(set(spec) - {"type", *required, *optional})
    if unknown:
        allowed = ", ".join([*required, *optional])
        names = ", ".join(map(repr, unknown))
        raise VerifierError(f"unknown field(s) {names} for type {kind!r}: allowed {allowed}")
    for name in required:
        if name not in spec:
            raise VerifierError(f"missing field {name!r} (required for type {kind!r})")
    values = {**optional, **{k: v for k, v in spec.items() if k != "type"}}
    return cls(**{name: _check(kind, name, value) for name, value in values.items()})


def _check(kind: str, name: str, value: object) -> object:
    """Check one field's type and range; return it as the verifier stores it."""

    def wrong(expected: str) -> VerifierError:
        return VerifierError(f"field {name!r} of a {kind!r} verifier must be {expected}, got {value!r}")

    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if name in ("strip", "case_sensitive", "fullmatch"):
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if name in ("answer", "pattern", "tests") and kind != "numeric":
        if not isinstance(value, str):
            hint = " (use type 'numeric' to compare numbers)" if kind == "exact" and is_number else ""
            raise wrong("a string" + hint)
        if name == "tests" and not value.strip():
            raise wrong("non-empty Python code")
        return value
    if name == "answer":  # numeric: a number, or a string holding exactly one (as "1,234" in GSM8K)
        if is_number and abs(value) <= _FLOAT_MAX:  # false for inf and nan too
            return float(value)
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return parse_number(value)
        raise wrong("a finite number")
    if name == "tolerance":
        if not (is_number and value >= 0):
            raise wrong("a number >= 0")
        return float(value)
    if name == "timeout_s":
        if not (is_number and 0 < value <= 600):
            raise wrong("a number of seconds in (0, 600]")
        return float(value)
    if name == "memory_mb":
        if not (isinstance(value, int) and not isinstance(value, bool) and 32 <= value <= 65536):
            raise wrong("an integer number of MiB in [32, 65536]")
        return value
    raise AssertionError(f"no check for field {name!r}")  # _FIELDS and _check disagree: a bug here


def score_all(pairs: list[tuple[Verifier, str]], workers: int = 2) -> list[float]:
    """Score (verifier, completion) pairs, in order; code runs `workers` sandboxes at a time."""
    scores = [0.0] * len(pairs)
    # run_many takes one set of limits, so batch the python verifiers by their limits
    batches: dict[tuple[float, int], list[tuple[int, str]]] = defaultdict(list)
    for i, (verifier, completion) in enumerate(pairs):
        if isinstance(verifier, PythonVerifier):
            batches[(verifier.timeout_s, verifier.memory_mb)].append((i, verifier.program(completion)))
        else:
            scores[i] = verifier.score(completion)
    for (timeout_s, memory_mb), batch in batches.items():
        programs = [program for _, program in batch]
        results = run_many(
            programs, workers=workers, timeout_s=timeout_s, memory_mb=memory_mb, max_output=2000
        )
        for (i, _), result in zip(batch, results, strict=True):
            scores[i] = float(result.ok)
    return scores
