"""Post-training records: read, check and normalise every accepted format into one shape.

    chat               {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
    prompt_completion  {"prompt": "...", "completion": "..."}        -> a user and an assistant turn
    preference         {"prompt": ..., "chosen": "...", "rejected": "..."}
    grpo               {"prompt": ..., "verifier": {"type": "exact", "answer": "4"}}

A prompt may be a string (one user turn) or a list of messages; chosen, rejected and completion may
be a string or a list holding one assistant message (TRL's conversational form). Files are JSONL,
or datasets saved with `datasets.save_to_disk`, or hub datasets (same code path). A malformed
record is named by file and line (or row) and skipped or fatal as the recipe says.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from trulyopen.data.sources import DataError
from trulyopen.errors import UserError
from trulyopen.recipe import FinetuneDataConfig

ROLES = ("system", "user", "assistant", "tool")
FORMATS_FOR = {"sft": ("chat", "prompt_completion"), "dpo": ("preference",), "grpo": ("grpo",)}


class BadRecord(UserError, ValueError):
    """A record that cannot be used; the message says why (the reader adds where)."""


@dataclass
class Example:
    id: str
    where: str  # file:line, for messages
    messages: list[dict] = field(default_factory=list)  # sft: the conversation; others: the prompt
    chosen: str = ""
    rejected: str = ""
    verifier: dict | None = None


def _guess_format(record: dict) -> str:
    if "messages" in record:
        return "chat"
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "verifier" in record:
        return "grpo"
    if "completion" in record:
        return "prompt_completion"
    raise BadRecord(
        "cannot tell its format: expected messages, prompt+completion, chosen+rejected or verifier"
    )


def _messages(value: Any, what: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise BadRecord(f"{what} is empty")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise BadRecord(f"{what} must be a string or a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise BadRecord(f"{what}[{i}] is not an object with role and content")
        if "role" not in m:
            raise BadRecord(f"{what}[{i}] has no role")
        if m["role"] not in ROLES:
            raise BadRecord(f"{what}[{i}].role is {m['role']!r}, not one of {', '.join(ROLES)}")
        content = m.get("content")
        if not isinstance(content, str):
            raise BadRecord(f"{what}[{i}].content must be a string (got {type(content).__name__})")
        if not content.strip():
            raise BadRecord(f"{what}[{i}].content is empty")
        out.append({"role": m["role"], "content": content})
    return out


def _reply(value: Any, what: str) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        if value[0].get("role") != "assistant":
            raise BadRecord(f"{what}[0].role must be assistant")
        value = value[0].get("content")
    if not isinstance(value, str):
        raise BadRecord(f"{what} must be a string (got {type(value).__name__})")
    if not value.strip():
        raise BadRecord(f"{what} is empty")
    return value


def parse(record: Any, fmt: str, where: str, index: int) -> Example:
    """One raw record as an Example; raises BadRecord saying what is wrong."""
    if not isinstance(record, dict):
        raise BadRecord(f"expected a JSON object, got {type(record).__name__}")
    fmt = _guess_format(record) if fmt == "auto" else fmt
    rid = str(record.get("id", index))
    if fmt == "chat":
        messages = _messages(record.get("messages"), "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRecord("messages has no assistant turn to learn from")
        return Example(rid, where, messages)
    if "prompt" not in record:
        raise BadRecord("has no prompt")
    prompt = _messages(record["prompt"], "prompt")
    if fmt == "prompt_completion":
        return Example(
            rid,
            where,
            [*prompt, {"role": "assistant", "content": _reply(record.get("completion"), "completion")}],
        )
    if fmt == "preference":
        chosen, rejected = _reply(record.get("chosen"), "chosen"), _reply(record.get("rejected"), "rejected")
        return Example(rid, where, prompt, chosen=chosen, rejected=rejected)
    from trulyopen.rewards.verifiers import VerifierError, parse_verifier

    try:
        parse_verifier(record.get("verifier"))
    except VerifierError as e:
        raise BadRecord(f"verifier: {e}") from None
    return Example(rid, where, prompt, verifier=record["verifier"])


def _raw(src: FinetuneDataConfig) -> Iterator[tuple[str, Any]]:
    """(where, record) for every record of a source."""
    if src.path is not None and src.path.is_file():
        with open(src.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{src.path}:{lineno}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, BadRecord(f"not valid JSON: {e.msg}")
        return
    import datasets

    try:
        if src.path is not None:
            ds = datasets.load_from_disk(str(src.path))
            ds = ds[src.split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(src.dataset, split=src.split)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{src.path or src.dataset}: cannot read as a dataset: {e}") from None
    name = src.path or src.dataset
    for i, row in enumerate(ds):
        yield f"{name}[row {i}]", row


def read_examples(
    sources: list[FinetuneDataConfig], method: str, on_bad: str
) -> tuple[list[Example], list[dict]]:
    """Every usable example of `sources` for `method`, and a list of {where, reason} for the bad ones."""
    examples, bad = [], []
    for src in sources:
        n = 0
        for where, record in _raw(src):
            n += 1
            try:
                if isinstance(record, BadRecord):
                    raise record
                ex = parse(record, src.format, where, n - 1)
                fmt = src.format if src.format != "auto" else _guess_format(record)
                if fmt not in FORMATS_FOR[method]:
                    raise DataError(
                        f"{where}: a {fmt} record, but finetune.method {method} takes "
                        f"{' or '.join(FORMATS_FOR[method])} records"
                    )
            except BadRecord as e:
                if on_bad == "stop":
                    raise DataError(f"{where}: {e} (finetune.on_bad_record is stop)") from None
                bad.append({"where": where, "reason": str(e)})
                continue
            examples.append(ex)
    return examples, bad
