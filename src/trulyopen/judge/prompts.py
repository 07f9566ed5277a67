"""The judges' prompts: plain templates, filled with `str.format`, each a (system, template) pair.

    judge              fields of the template                       the judge is asked to reply with
    RUBRIC             {rubric} {scale} {question} {answer}         a bare integer from 1 to {scale}
    REFERENCE          {question} {answer} {reference}              yes or no
    REFERENCE_SCORED   {question} {answer} {reference} {scale}      a bare integer from 1 to {scale}
    PAIRWISE           {question} {answer_a} {answer_b}             [[A]], [[B]] or [[C]] (a tie)

A config may replace the system text or the template of any of them (`custom`); a replacement must
hold the fields its judge needs (the answer, the reference, both answers) and no others, so a typo
such as {anwser} is an error before anything is asked. Write a literal brace twice: {{ and }}. The
parsers in `judges.py` accept more than the form asked for (`Score: 7/10`, `**yes**`, `Verdict: A`),
since judges do not always keep to it.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from trulyopen.errors import UserError

DEFAULT_RUBRIC = "helpfulness, correctness and clarity"

_RATE = "Reply with a bare integer from 1 to {scale} and nothing else."


class JudgeError(UserError, ValueError):
    """A judge's prompt that cannot be used (a missing or unknown field)."""


@dataclass(frozen=True)
class Prompt:
    """The system text and the user template of one judge."""

    system: str
    template: str

    def fill(self, **values: object) -> str:
        return self.template.format(**values)


RUBRIC = Prompt(
    system="You are a strict, fair judge of answers to questions.",
    template="Rate the answer below from 1 to {scale} for {rubric}. "
    + _RATE
    + "\n\n## Question\n\n{question}\n\n## Answer\n\n{answer}",
)
REFERENCE = Prompt(
    system="You are a strict, fair judge: you check answers against a reference answer.",
    template="Is the answer below correct, given the reference answer? It need not use the same words, "
    "but it must agree with the reference in substance. Reply with yes or no and nothing else."
    "\n\n## Question\n\n{question}\n\n## Reference answer\n\n{reference}\n\n## Answer\n\n{answer}",
)
REFERENCE_SCORED = Prompt(
    system=REFERENCE.system,
    template="Rate from 1 to {scale} how correct the answer below is, given the reference answer. "
    + _RATE
    + "\n\n## Question\n\n{question}\n\n## Reference answer\n\n{reference}\n\n## Answer\n\n{answer}",
)
PAIRWISE = Prompt(
    system="You are a strict, fair judge: you compare two answers to the same question. The order in "
    "which they are shown says nothing about their quality, and neither does their length.",
    template="Which answer is better: more helpful, correct and clear? Reply with [[A]] if answer A is "
    "better, [[B]] if answer B is better, or [[C]] if neither is, and nothing else."
    "\n\n## Question\n\n{question}\n\n## Answer A\n\n{answer_a}\n\n## Answer B\n\n{answer_b}",
)

# per judge: the fields its template must hold, and those it may hold
FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "rubric": (frozenset({"answer"}), frozenset({"question", "rubric", "scale"})),
    "reference": (frozenset({"answer", "reference"}), frozenset({"question"})),
    "reference_scored": (frozenset({"answer", "reference"}), frozenset({"question", "scale"})),
    "pairwise": (frozenset({"answer_a", "answer_b"}), frozenset({"question"})),
}


def _braced(names: list[str]) -> str:
    return ", ".join("{" + name + "}" for name in names)


def check_template(template: str, judge: str) -> str:
    """`template` when `judge` can fill it; JudgeError naming the missing or unknown field."""
    required, optional = FIELDS[judge]
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise JudgeError(f"the {judge} prompt is not a template: {e} (write a literal brace twice)") from None
    if unknown := sorted(names - required - optional):
        allowed = ", ".join("{" + n + "}" for n in sorted(required | optional))
        raise JudgeError(
            f"the {judge} prompt has unknown field(s) {{{'}, {'.join(unknown)}}} (allowed: {allowed})"
        )
    if missing := sorted(required - names):
        raise JudgeError(f"the {judge} prompt lacks {{{'}, {'.join(missing)}}}")
    return template


def custom(base: Prompt, judge: str, system: str | None = None, template: str | None = None) -> Prompt:
    """`base` with the system text and the template a config gives instead (the template checked)."""
    return Prompt(
        system=base.system if system is None else system,
        template=base.template if template is None else check_template(template, judge),
    )
