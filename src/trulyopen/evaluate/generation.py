"""Generation tasks: sample (or greedily decode) an answer and check it.

    generation   the answer is scored by the item's verifier (exact, regex, numeric, python)
    code         prompt + completion + the item's tests run in the sandbox (time and memory
                 limits, no network); `samples` completions per item give pass@k

A completion ends at the end-of-text token or at a stop string: a blank line for answers, and for
code the start of a new top-level statement, as HumanEval does.
"""

from __future__ import annotations

import torch

from trulyopen.evaluate.stats import mean_and_stderr, pass_at_k
from trulyopen.infer.engine import generate
from trulyopen.infer.sampling import SamplingParams

ANSWER_STOPS = ("\n\n",)
CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


def _cut(text: str, stops: tuple[str, ...]) -> str:
    cuts = [text.find(s) for s in stops if s in text]
    return text[: min(cuts)] if cuts else text


def complete(model, tok, prompts: list[str], spec, stops: tuple[str, ...], seed: int) -> list[str]:
    """A completion of each prompt, with the task's max_new_tokens and temperature, cut at `stops`."""
    ids = [tok(p, add_special_tokens=False)["input_ids"] or [tok.eos_token_id] for p in prompts]
    params = SamplingParams(
        max_new_tokens=spec.max_new_tokens,
        temperature=spec.temperature,
        stop_ids=(tok.eos_token_id,),
        stop_strings=stops,
    )
    completions = generate(model, ids, params, seed=seed, decode=tok.decode)
    return [_cut(tok.decode([t for t in c if t != tok.eos_token_id]), stops) for c in completions]


@torch.no_grad()
def evaluate_generation(model, tok, spec, instances: list) -> tuple[dict, list[dict]]:
    from trulyopen.rewards.verifiers import parse_verifier, score_all

    answers = complete(model, tok, [i.prompt for i in instances], spec, ANSWER_STOPS, spec.seed)
    verifiers = [parse_verifier(i.verifier) for i in instances]
    scores = score_all(list(zip(verifiers, answers, strict=True)))
    records = [
        {"id": i.id, "prompt": i.prompt, "prediction": a, "score": s}
        for i, a, s in zip(instances, answers, scores, strict=True)
    ]
    return {"score": mean_and_stderr(scores)}, records


@torch.no_grad()
def evaluate_code(model, tok, spec, instances: list) -> tuple[dict, list[dict]]:
    from trulyopen.rewards.sandbox import run_many

    if spec.samples > 1 and spec.temperature == 0:
        raise ValueError(f"task {spec.name}: samples > 1 needs a temperature above 0 (greedy answers repeat)")
    prompts = [i.prompt for i in instances for _ in range(spec.samples)]
    completions = complete(model, tok, prompts, spec, CODE_STOPS, spec.seed)
    programs = [
        p + c + "\n\n" + inst.tests + "\n"
        for p, c, inst in zip(
            prompts, completions, [i for i in instances for _ in range(spec.samples)], strict=True
        )
    ]
    results = run_many(programs)
    metrics, records = {}, []
    passed = [
        [r.ok for r in results[k * spec.samples : (k + 1) * spec.samples]] for k in range(len(instances))
    ]
    for k in spec.k:
        if k > spec.samples:
            raise ValueError(
                f"task {spec.name}: pass@{k} needs at least {k} samples (samples: {spec.samples})"
            )
        metrics[f"pass@{k}"] = mean_and_stderr([pass_at_k(spec.samples, sum(p), k) for p in passed])
    for n, inst in enumerate(instances):
        rows = range(n * spec.samples, (n + 1) * spec.samples)
        records.append(
            {
                "id": inst.id,
                "prompt": inst.prompt,
                "completions": [completions[r] for r in rows],
                "status": [results[r].status for r in rows],
                "passed": passed[n],
            }
        )
    return metrics, records
