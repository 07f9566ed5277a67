"""Tool-call tasks: given tools and a question, does the model call the right function, with
arguments that function's schema accepts?

The prompt is the item's messages and tools rendered by the model's own chat template (ours, or a
Hugging Face model's as it comes); the model answers freely, greedily by default, as it would with
`tool_choice: auto`, so deciding to call a tool at all is part of what is measured. Calls are read
in the format our template teaches (<tool_call>{"name", "arguments"}</tool_call>, also Qwen's and
Hermes'), or as one bare JSON object {"name", "arguments" or "parameters"} (Llama 3's).

    called          the answer holds a call that parses
    right_tool      its first call names the expected function
    accuracy        ... and its arguments satisfy that function's JSON schema (the headline)
    exact           ... and they equal the expected arguments
"""

from __future__ import annotations

import json

import torch

from trulyopen.errors import warn
from trulyopen.evaluate.stats import mean_and_stderr
from trulyopen.infer.engine import generate
from trulyopen.infer.sampling import SamplingParams
from trulyopen.infer.tool_calls import parse_calls

MIN_ANSWER_TOKENS = 16  # an item whose prompt leaves less room than this is not asked


def first_call(text: str) -> tuple[str, dict] | None:
    """The first call in a model's answer, in our tags or as a bare JSON object."""
    _, calls = parse_calls(text)
    if calls:
        return calls[0]
    try:
        obj = json.loads(text.strip())
    except ValueError:
        return None
    if isinstance(obj, dict) and isinstance(obj.get("name"), str):
        arguments = obj.get("arguments", obj.get("parameters"))
        if isinstance(arguments, dict):
            return obj["name"], arguments
    return None


def _valid(arguments: dict, schema: dict) -> bool:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        return Draft202012Validator(schema).is_valid(arguments)
    except SchemaError:
        return False


@torch.no_grad()
def evaluate_tool_calls(model, tok, spec, instances: list, max_len: int) -> tuple[dict, list[dict]]:
    from trulyopen.finetune.render import ChatRenderer

    renderer = ChatRenderer(tok)
    prompts = [renderer.prompt(i.messages, i.tools) for i in instances]
    asked = [k for k, p in enumerate(prompts) if len(p) + MIN_ANSWER_TOKENS <= max_len]
    if len(asked) < len(prompts):
        warn(
            f"eval: task {spec.name}: {len(prompts) - len(asked)} of {len(prompts)} items leave less than "
            f"{MIN_ANSWER_TOKENS} of the model's {max_len} positions for the answer, and are not asked"
        )
    if not asked:
        return {}, [{"id": i.id, "skipped": "prompt too long"} for i in instances]
    longest = max(len(prompts[k]) for k in asked)
    params = SamplingParams(
        max_new_tokens=min(spec.max_new_tokens, max_len - longest),
        temperature=spec.temperature,
        stop_ids=renderer.stop_ids(),
    )
    outputs = generate(model, [prompts[k] for k in asked], params, seed=spec.seed)
    answers = dict(zip(asked, (tok.decode(o, skip_special_tokens=True) for o in outputs), strict=True))
    scores: dict[str, list[float]] = {"called": [], "right_tool": [], "accuracy": [], "exact": []}
    records = []
    for k, inst in enumerate(instances):
        if k not in answers:
            records.append({"id": inst.id, "skipped": f"prompt of {len(prompts[k])} tokens is too long"})
            continue
        call = first_call(answers[k])
        schema = next(
            t["function"].get("parameters", {})
            for t in inst.tools
            if t["function"]["name"] == inst.call["name"]
        )
        right = call is not None and call[0] == inst.call["name"]
        valid = right and _valid(call[1], schema)
        row = {
            "called": call is not None,
            "right_tool": right,
            "accuracy": valid,
            "exact": valid and call[1] == inst.call["arguments"],
        }
        for name, ok in row.items():
            scores[name].append(float(ok))
        records.append({"id": inst.id, "answer": answers[k], "call": call and list(call), **row})
    return {name: mean_and_stderr(values) for name, values in scores.items()}, records
