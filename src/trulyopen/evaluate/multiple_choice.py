"""Multiple choice by log-likelihood, in the cloze and the lettered form (as OLMES does).

    cloze     "<context> <choice>"        the choice the model finds likeliest, its log-probability
                                          normalised per character (default), per token, or not
    lettered  "Question: <question>        the likeliest of the letters " A", " B", ...; small
               A. <choice 0>               models cannot yet use this form, large ones prefer it,
               B. <choice 1>               so both are reported, and `acc` is the better of the two
              Answer:"

Few-shot examples come from the same task file, chosen by a fixed seed, never the item itself.
"""

from __future__ import annotations

import random
import string

import torch

from trulyopen.evaluate.loglik import Request, Score, request, score
from trulyopen.evaluate.stats import mean_and_stderr

LETTERS = string.ascii_uppercase


def cloze_prompt(inst) -> str:
    return inst.context


def cloze_choice(inst, choice: str) -> str:
    """The delimiter between context and choice is a space, unless the context ends in whitespace."""
    return choice if not inst.context or inst.context[-1].isspace() else " " + choice


def lettered_prompt(inst) -> str:
    question = inst.question if inst.question is not None else inst.context
    options = "".join(f"\n {LETTERS[i]}. {c}" for i, c in enumerate(inst.choices))
    return f"Question: {question.strip()}{options}\nAnswer:"


def few_shot(instances: list, k: int, seed: int) -> list[list[int]]:
    """For each item, the indices of its k examples: a fixed shuffle of the task, minus the item."""
    if not k:
        return [[] for _ in instances]
    pool = list(range(len(instances)))
    random.Random(seed).shuffle(pool)
    return [[j for j in pool if j != i][:k] for i in range(len(instances))]


def _normalised(logprob: float, tokens: int, chars: int, how: str) -> float:
    return (
        logprob / max(tokens, 1) if how == "token" else logprob / max(chars, 1) if how == "char" else logprob
    )


def evaluate(model: torch.nn.Module, tok, spec, instances: list, max_len: int) -> tuple[dict, list[dict]]:
    """(metrics {name: {value, stderr, n}}, a record per item)."""
    shots = few_shot(instances, spec.few_shot, spec.seed)
    requests: dict[str, list[Request]] = {}
    texts: dict[str, list[tuple[str, list[str]]]] = {}
    for form in spec.forms:
        prompts = []
        for i, inst in enumerate(instances):
            examples = [instances[j] for j in shots[i]]
            if form == "cloze":
                prefix = "".join(
                    cloze_prompt(e) + cloze_choice(e, e.choices[e.answer]) + "\n\n" for e in examples
                )
                prompts.append((prefix + cloze_prompt(inst), [cloze_choice(inst, c) for c in inst.choices]))
            else:
                prefix = "".join(f"{lettered_prompt(e)} {LETTERS[e.answer]}\n\n" for e in examples)
                prompts.append(
                    (prefix + lettered_prompt(inst), [f" {LETTERS[j]}" for j in range(len(inst.choices))])
                )
        texts[form] = prompts
        requests[form] = [request(tok, ctx, conts) for ctx, conts in prompts]
    scores = {form: score(model, reqs, max_len) for form, reqs in requests.items()}

    records = []
    for i, inst in enumerate(instances):
        rec = {"id": inst.id, "choices": inst.choices, "answer": inst.answer}
        for form in spec.forms:
            rec[form] = scored(spec, form, inst, texts[form][i][0], scores[form][i])
        records.append(rec)
    return accuracy(spec, records), records


def scored(spec, form: str, inst, prompt: str, scores: list[Score]) -> dict:
    """One form's record of an item: its choices' scores, the prediction, and whether it is right."""
    how = spec.normalization if form == "cloze" else "none"
    # per-character normalisation counts the choice's own characters, as lm-eval's acc_norm does
    values = [
        _normalised(s.logprob, s.tokens, len(c), how) for s, c in zip(scores, inst.choices, strict=True)
    ]
    pred = max(range(len(values)), key=values.__getitem__)
    return {
        "prompt": prompt,
        "logprobs": [s.logprob for s in scores],
        "scores": values,
        "prediction": pred,
        "correct": pred == inst.answer,
    }


def accuracy(spec, records: list[dict]) -> dict:
    """acc per form, with its standard error, and `acc`: the better form's."""
    metrics = {
        f"acc_{form}": mean_and_stderr([float(r[form]["correct"]) for r in records]) for form in spec.forms
    }
    best = max(spec.forms, key=lambda f: metrics[f"acc_{f}"]["value"])
    metrics["acc"] = {**metrics[f"acc_{best}"], "form": best}
    return metrics
