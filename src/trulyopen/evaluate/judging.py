"""Judge tasks: the evaluated model answers each prompt, and a judge model scores the answer.

    mode        the judge is asked                               metrics (each {value, stderr, n})
    rubric      score 1..scale against the rubric                 score, unparsed
    reference   correct given the item's reference? (yes/no)      accuracy, unparsed
                ... or scored 1..scale (with a scale)             score, unparsed
    pairwise    the answer against a baseline, in both orders     win_rate (win 1, tie 0.5, loss 0),
                (the item's baseline, or a second model's)        wins, ties, losses, consistency,
                                                                  unparsed

The answers are made as generation tasks make theirs (the prompt as written, greedy by default,
ending at a blank line), and so are a baseline model's. The judge is a hosted model
(trulyopen.hosted) asked through trulyopen.judge. Replies with no readable verdict count in
`unparsed` and stay out of the other means; an item whose request fails for good is recorded with
its error and left out; a refused key stops the task. Without the judge's key the task is skipped
with one line, before anything is generated. results.json names the judge (provider, model,
endpoint, mode) with its request, retry and token counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch

from trulyopen import judge
from trulyopen.errors import warn
from trulyopen.evaluate.generation import ANSWER_STOPS, complete
from trulyopen.evaluate.stats import mean_and_stderr
from trulyopen.evaluate.taskfile import Instance, TaskSpec
from trulyopen.hosted import KeyMissing, KeyRefused, RemoteError, endpoint, open_client

_PROMPTS = {
    "rubric": judge.RUBRIC,
    "reference": judge.REFERENCE,
    "reference_scored": judge.REFERENCE_SCORED,
    "pairwise": judge.PAIRWISE,
}


def _baselines(spec: TaskSpec, instances: list[Instance], note: dict) -> list[str | None]:
    j = spec.judge
    if j is None or j.mode != "pairwise":
        return [None] * len(instances)
    if j.baseline_model is None:
        return [i.baseline for i in instances]
    from trulyopen.evaluate import models

    other = models.load(j.baseline_model)
    note["baseline_model"] = other.source
    prompts = [i.prompt for i in instances]
    return complete(other.model, other.tokenizer, prompts, spec, ANSWER_STOPS, spec.seed)


def _judge_one(ask: judge.Ask, spec: TaskSpec, inst: Instance, answer: str, baseline: str | None) -> dict:
    """One item's verdict: its numbers (None where the reply held none) and the judge's replies."""
    j = spec.judge
    assert j is not None
    prompt = judge.custom(_PROMPTS[j.prompt_kind], j.prompt_kind, j.system, j.prompt)
    if j.mode == "pairwise":
        assert baseline is not None
        v = judge.pairwise(ask, inst.prompt, answer, baseline, prompt=prompt)
        return {
            "baseline": baseline,
            "preferences": [v.first, v.second],
            "outcome": v.outcome,
            "consistent": v.consistent,
            "value": v.value,
            "replies": list(v.replies),
        }
    if j.mode == "rubric":
        s = judge.rubric(ask, inst.prompt, answer, rubric=j.rubric, scale=j.scale or 10, prompt=prompt)
    else:
        assert inst.reference is not None
        s = judge.reference(ask, inst.prompt, answer, inst.reference, scale=j.scale, prompt=prompt)
    return {"value": s.value, "replies": [s.reply]}


def _metrics(spec: TaskSpec, rows: list[dict]) -> dict[str, dict]:
    judged = [r for r in rows if "value" in r]
    parsed = [r for r in judged if r["value"] is not None]
    metrics: dict[str, dict] = {}
    j = spec.judge
    assert j is not None
    if j.mode == "pairwise":
        metrics["win_rate"] = mean_and_stderr([r["value"] for r in parsed])
        for outcome, name in (("win", "wins"), ("tie", "ties"), ("loss", "losses")):
            metrics[name] = mean_and_stderr([float(r["outcome"] == outcome) for r in parsed])
        metrics["consistency"] = mean_and_stderr([float(r["consistent"]) for r in parsed])
    else:
        headline = "accuracy" if j.mode == "reference" and j.scale is None else "score"
        metrics[headline] = mean_and_stderr([float(r["value"]) for r in parsed])
    metrics["unparsed"] = mean_and_stderr([float(r["value"] is None) for r in judged])
    return metrics


@torch.no_grad()
def evaluate_judge(
    model,
    tok,
    spec: TaskSpec,
    instances: list[Instance],
    *,
    environ: Mapping[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[dict, list[dict], dict[str, Any]]:
    """Metrics, one record per item, and the note on the judge (or why the task was skipped)."""
    j = spec.judge
    assert j is not None
    note: dict[str, Any] = {"provider": j.provider, "model": j.model, "endpoint": endpoint(j), "mode": j.mode}
    try:
        client = open_client(j, environ)
    except KeyMissing as e:
        note["skipped"] = f"{e}, the judge {j.model} was not asked"
        log(f"eval: judge task {spec.name} skipped: {note['skipped']}")
        return {}, [], {"judge": note}

    with client:
        answers = complete(model, tok, [i.prompt for i in instances], spec, ANSWER_STOPS, spec.seed)
        baselines = _baselines(spec, instances, note)
        rows: list[dict] = []
        failures: Counter[str] = Counter()
        for k, inst in enumerate(instances):
            row: dict[str, Any] = {"id": inst.id, "prompt": inst.prompt, "prediction": answers[k]}
            if inst.reference is not None:
                row["reference"] = inst.reference
            rows.append(row)
            if "stopped" in note:
                continue
            try:
                row |= _judge_one(client.ask, spec, inst, answers[k], baselines[k])
            except KeyRefused as e:
                note["stopped"] = client.scrub(str(e))
                warn(f"eval: judge task {spec.name} stopped: {note['stopped']}")
            except RemoteError as e:
                row["error"] = client.scrub(str(e))
                failures[row["error"]] += 1
        note |= client.stats()
    note |= {"failed": sum(failures.values()), "failures": dict(sorted(failures.items()))}
    return ({} if "stopped" in note else _metrics(spec, rows)), rows, {"judge": note}
