"""Judges: a model that scores another model's answers, for evaluation and for filtering data.

Three ways of judging an answer to a question, each one prompt (a plain template in `prompts.py`,
replaceable from a config) and one parser that reads the verdict however the judge phrased it:

    rubric     score 1..N against a rubric          Score(value, reply)   synth's judge; eval `rubric`
    reference  correct given a reference answer?    Score(1.0 | 0.0, ...) or 1..N with a scale
    pairwise   answer against a baseline answer     PairVerdict(first, second) -> win | loss | tie

Judges prefer whatever they are shown first (or second) more often than chance, so `pairwise` asks
twice with the two answers swapped, and counts a win only when both orders agree:

    order 1: A = answer,   B = baseline  ─► "A"  ┐  agree        ─► win (or loss, or both tie: tie)
    order 2: A = baseline, B = answer    ─► "B"  ┘  disagree     ─► tie  (the judge went by position)

so a judge that always picks A scores every answer a tie, never a win; the share of agreeing
pairs is the judge's position consistency. A reply with no readable verdict gives None, which
callers count (and leave out of means) rather than fail on.

The judge itself is any `ask(system, prompt) -> reply`: a hosted model's `ChatClient.ask`
(trulyopen.hosted), or a function that has a local model generate. Errors of the judge's API
(RemoteError) pass through to the caller, which decides whether one failed item stops the rest.
"""

from trulyopen.judge.judges import (
    Ask,
    PairVerdict,
    Score,
    pairwise,
    parse_preference,
    parse_score,
    parse_verdict,
    reference,
    rubric,
)
from trulyopen.judge.prompts import (
    DEFAULT_RUBRIC,
    PAIRWISE,
    REFERENCE,
    REFERENCE_SCORED,
    RUBRIC,
    JudgeError,
    Prompt,
    check_template,
    custom,
)

__all__ = [
    "DEFAULT_RUBRIC",
    "PAIRWISE",
    "REFERENCE",
    "REFERENCE_SCORED",
    "RUBRIC",
    "Ask",
    "JudgeError",
    "PairVerdict",
    "Prompt",
    "Score",
    "check_template",
    "custom",
    "pairwise",
    "parse_preference",
    "parse_score",
    "parse_verdict",
    "reference",
    "rubric",
]
