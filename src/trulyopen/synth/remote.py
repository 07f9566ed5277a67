"""Optionally asking an outside model to write or judge the SFT examples.

Everything `synth` makes by default comes from the corpus alone, so the release stays fully open.
A user who has a key may still want a stronger model to rewrite the answers (`write`) or to weed
out weak pairs (`judge`); the data card then says which model touched the data and how.

The model is any of trulyopen.hosted's providers (OpenAI-compatible, Anthropic, Gemini, Vertex AI,
Bedrock), asked through its client: rate-limited, retried with backoff, the key never written
anywhere. An example whose request fails for good is left as it was and counted as failed; a
refused key (401, 403) stops the step. Judging is trulyopen.judge's rubric judge, scoring 1 to 10
for correctness and usefulness; examples rated below MIN_RATING are dropped, and a reply with no
readable rating leaves its example as it was. With the key unset nothing is requested.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from trulyopen import judge
from trulyopen.hosted import ChatClient, KeyMissing, KeyRefused, RemoteError, endpoint, open_client
from trulyopen.progress import Progress
from trulyopen.recipe import RemoteModelConfig

MIN_RATING = 5  # judged examples rated below this are dropped

WRITE_SYSTEM = (
    "You are an expert Python programmer. Reply with the complete definition asked for, docstring "
    "included, in a single ```python code block and nothing else."
)
# the rubric judge's prompt, in the words of a training-data review
JUDGE = judge.Prompt(
    system="You review training data for a Python coding assistant.",
    template="Rate the answer below from 1 to {scale} for {rubric}. Reply with a bare integer and nothing "
    "else.\n\n## Instruction\n\n{question}\n\n## Answer\n\n{answer}",
)
JUDGE_RUBRIC = (
    "correctness (does the code do what the instruction and docstring say?) and usefulness as a "
    "training example"
)


_CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(reply: str) -> str | None:
    """The code of a reply (its first fenced block, else all of it) when it parses and defines a function."""
    match = _CODE_BLOCK.search(reply)
    code = (match.group(1) if match else reply).strip()
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return None
    defines = any(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) for n in tree.body)
    return code if defines else None


def _write(client: ChatClient, record: dict, model: str) -> tuple[dict | None, str]:
    reply = client.ask(WRITE_SYSTEM, record["messages"][0]["content"])
    code = extract_code(reply)
    if code is None:
        return None, "unusable_reply"
    user, assistant = record["messages"]
    new = {
        **record,
        "messages": [user, {**assistant, "content": f"```python\n{code}\n```"}],
        "reference": assistant["content"],
        "written_by": model,
    }
    return new, "written"


def _judge(client: ChatClient, record: dict, model: str) -> tuple[dict | None, str]:
    user, assistant = record["messages"]
    score = judge.rubric(
        client.ask, user["content"], assistant["content"], rubric=JUDGE_RUBRIC, scale=10, prompt=JUDGE
    ).value
    if score is None:
        return None, "unusable_reply"
    return {**record, "rating": {"score": score, "model": model}}, "rated"


def remote_step(
    records: list[dict],
    cfg: RemoteModelConfig,
    *,
    environ: Mapping[str, str] | None = None,
    backoff_s: float = 1.0,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], dict[str, Any]]:
    """Have the outside model write or judge the first `cfg.max_examples` SFT records.

    Returns the records (judged ones below MIN_RATING left out) and what happened, for the
    manifest. Records beyond max_examples, and any whose request failed, are returned unchanged.
    """
    stats: dict[str, Any] = {
        "provider": cfg.provider,
        "model": cfg.model,
        "task": cfg.task,
        "base_url": endpoint(cfg),
        "skipped": None,
    }
    try:
        client = open_client(cfg, environ, backoff_s=backoff_s)
    except KeyMissing as e:
        stats["skipped"] = str(e)
        log(f"synth: remote {cfg.task} step skipped: {e}, {cfg.model} was not asked")
        return records, stats

    todo = records[: cfg.max_examples]
    outcomes: Counter = Counter()
    failures: Counter = Counter()
    ratings: Counter = Counter()
    dropped: list[str] = []
    out: list[dict] = []
    act = _write if cfg.task == "write" else _judge
    with client, Progress(f"remote {cfg.task}", len(todo), "examples") as bar:
        for i, record in enumerate(todo):
            try:
                new, outcome = act(client, record, cfg.model)
            except KeyRefused as e:
                log(f"synth: remote step stopped: {client.scrub(str(e))}")
                failures["key_refused"] += 1
                outcomes["failed"] += 1
                outcomes["not_asked"] += len(todo) - i - 1
                out.extend(todo[i:])
                break
            except RemoteError as e:
                failures[client.scrub(str(e))] += 1
                new, outcome = None, "failed"
            outcomes[outcome] += 1
            bar.update()
            if new is None:
                out.append(record)
            elif "rating" in new:
                ratings[new["rating"]["score"]] += 1
                if new["rating"]["score"] < MIN_RATING:
                    dropped.append(record["id"])
                else:
                    out.append(new)
            else:
                out.append(new)
        stats.update(client.stats())
    stats.update(
        asked=len(todo),
        outcomes=dict(sorted(outcomes.items())),
        failed=outcomes["failed"],
        failures=dict(sorted(failures.items())),
    )
    if cfg.task == "judge":
        stats.update(
            min_rating=MIN_RATING,
            ratings={str(k): v for k, v in sorted(ratings.items())},
            dropped=len(dropped),
            dropped_ids=dropped,
        )
    log(
        f"synth: remote {cfg.task} with {cfg.model}: {len(todo)} examples, "
        + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
        + (f", {len(dropped)} dropped (rated below {MIN_RATING})" if cfg.task == "judge" else "")
    )
    return out + records[cfg.max_examples :], stats
