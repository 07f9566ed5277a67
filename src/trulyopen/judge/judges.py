"""The three judges and the parsers of their replies.

A judge is asked through `ask(system, prompt) -> reply`: a hosted model's `ChatClient.ask`, or any
function, such as one that has a local model generate. A reply that holds no readable verdict is
not an error: the judge returns None in place of the score, and callers count it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from trulyopen.judge.prompts import DEFAULT_RUBRIC, PAIRWISE, REFERENCE, REFERENCE_SCORED, RUBRIC, Prompt

Ask = Callable[[str, str], str]  # (system, prompt) -> the judge's reply
Preference = Literal["A", "B", "tie"]
Outcome = Literal["win", "loss", "tie"]

_NUMBER = r"(\d+(?:\.\d+)?)"


def _in_scale(found: str, scale: int) -> float | None:
    value = float(found)
    if not 1 <= value <= scale:
        return None
    return int(value) if value.is_integer() else value


def parse_score(reply: str, scale: int = 10) -> float | None:
    """A score from 1 to `scale` in a reply that should be a bare number but may say `Rating: 8/10`,
    `[[8]]`, `I'd give it 8 out of 10` or `Score: 8`; None when it holds none, or several numbers
    and no sign of which is the score, or one out of range. Integral scores come back as int."""
    text = reply.strip()
    bare = re.fullmatch(rf"[^\w-]*{_NUMBER}[^\w]*", text)
    if bare:
        return _in_scale(bare.group(1), scale)
    for pattern in (
        rf"\[\[\s*{_NUMBER}\s*\]\]",
        rf"{_NUMBER}\s*(?:/|out of)\s*{scale}\b",
        rf"\b(?:score|rating|grade)\b\W{{0,5}}(?:is\W{{1,3}}|of\W{{1,3}})?{_NUMBER}",
    ):
        found = re.findall(pattern, text, re.IGNORECASE)
        if found:  # the last: a judge that reasons first gives its verdict at the end
            return _in_scale(found[-1], scale)
    numbers = {float(n) for n in re.findall(rf"(?<![\w.-]){_NUMBER}(?!\w)", text)}
    return _in_scale(str(numbers.pop()), scale) if len(numbers) == 1 else None


_YES, _NO = ("yes", "correct", "right", "true"), ("no", "incorrect", "not correct", "wrong", "false")
_VERDICT_WORD = "|".join(sorted(_YES + _NO, key=len, reverse=True))  # "incorrect" before "correct"


def parse_verdict(reply: str) -> bool | None:
    """True for a yes (or `correct`), False for a no (or `incorrect`), None when the reply says neither."""
    text = reply.strip().lower()
    found = re.findall(rf"\[\[\s*({_VERDICT_WORD})\s*\]\]", text)
    found = found or re.findall(rf"^\W*({_VERDICT_WORD})\b", text)
    found = found or re.findall(
        rf"\b(?:verdict|answer is|judgement|judgment)\W{{0,3}}({_VERDICT_WORD})\b", text
    )
    if not found:
        return None
    return found[-1] in _YES


def parse_preference(reply: str) -> Preference | None:
    """'A', 'B' or 'tie' from `[[A]]`, `[[C]]` (a tie), a bare `B.`, `Verdict: tie` or `Answer A is
    better`; None when the reply says none of them."""
    text = reply.strip()
    for pattern in (
        r"\[\[\s*(A|B|C|tie)\s*\]\]",
        r"^\W*(?:answer\s+)?(A|B|tie)\W*$",
        r"\b(?:verdict|winner|better answer|choice)\W{0,3}(?:is\W{1,3})?(?:answer\s+)?(A|B|tie)\b",
        r"\banswer\s+(A|B)\s+is\s+better\b",
    ):
        found = re.findall(pattern, text, re.IGNORECASE)
        if found:
            word = found[-1].upper()
            return "A" if word == "A" else "B" if word == "B" else "tie"
    return None


@dataclass
class Score:
    """A judge's score of one answer (None: its reply held none we could read) and the reply."""

    value: float | None
    reply: str


def rubric(
    ask: Ask,
    question: str,
    answer: str,
    *,
    rubric: str = DEFAULT_RUBRIC,
    scale: int = 10,
    prompt: Prompt = RUBRIC,
) -> Score:
    """Score `answer` from 1 to `scale` against `rubric` (what a good answer is)."""
    reply = ask(prompt.system, prompt.fill(question=question, answer=answer, rubric=rubric, scale=scale))
    return Score(parse_score(reply, scale), reply)


def reference(
    ask: Ask,
    question: str,
    answer: str,
    reference: str,
    *,
    scale: int | None = None,
    prompt: Prompt | None = None,
) -> Score:
    """Is `answer` correct given `reference`? 1.0 for yes and 0.0 for no; with a `scale`, a score
    from 1 to `scale` instead."""
    prompt = prompt or (REFERENCE if scale is None else REFERENCE_SCORED)
    reply = ask(
        prompt.system, prompt.fill(question=question, answer=answer, reference=reference, scale=scale)
    )
    if scale is not None:
        return Score(parse_score(reply, scale), reply)
    verdict = parse_verdict(reply)
    return Score(None if verdict is None else float(verdict), reply)


@dataclass
class PairVerdict:
    """Answer against baseline, asked in both orders.

    first   the judge's preference with the answer shown as A and the baseline as B
    second  ... with the baseline as A and the answer as B
    outcome the answer's win or loss when both orders agree; a tie when they disagree (the judge
            went by position, not content) or both say tie; None when a reply held no verdict
    """

    first: Preference | None
    second: Preference | None
    replies: tuple[str, str]

    @property
    def consistent(self) -> bool | None:
        """Both orders prefer the same answer (or both call it a tie)."""
        if self.first is None or self.second is None:
            return None
        return _AS_ANSWER[self.first, 1] == _AS_ANSWER[self.second, 2]

    @property
    def outcome(self) -> Outcome | None:
        if self.consistent is None:
            return None
        return _AS_ANSWER[self.first, 1] if self.consistent else "tie"  # type: ignore[index]

    @property
    def value(self) -> float | None:
        """1 for a win, 0.5 for a tie, 0 for a loss: its mean is the win rate."""
        return None if self.outcome is None else {"win": 1.0, "tie": 0.5, "loss": 0.0}[self.outcome]


# (preference, the order asked) -> what it means for the answer (1: answer shown as A; 2: as B)
_AS_ANSWER: dict[tuple[Preference, int], Outcome] = {
    ("A", 1): "win",
    ("B", 1): "loss",
    ("A", 2): "loss",
    ("B", 2): "win",
    ("tie", 1): "tie",
    ("tie", 2): "tie",
}


def pairwise(
    ask: Ask, question: str, answer: str, baseline: str, *, prompt: Prompt = PAIRWISE
) -> PairVerdict:
    """Compare `answer` with `baseline` in both orders (position swapping): a judge that prefers a
    position rather than an answer gives ties, never wins."""
    replies = (
        ask(prompt.system, prompt.fill(question=question, answer_a=answer, answer_b=baseline)),
        ask(prompt.system, prompt.fill(question=question, answer_a=baseline, answer_b=answer)),
    )
    return PairVerdict(parse_preference(replies[0]), parse_preference(replies[1]), replies)
