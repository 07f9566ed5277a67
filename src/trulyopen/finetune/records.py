"""Post-training records: read, check and normalise every accepted format into one shape.

    chat               {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
                       with "tools" and assistant "tool_calls" and "tool" turns as OpenAI writes them
    prompt_completion  {"prompt": "...", "completion": "..."}        -> a user and an assistant turn
    preference         {"prompt": ..., "chosen": "...", "rejected": "..."}
    unpaired           {"prompt": ..., "completion": "...", "label": true}   (KTO: desirable or not)
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
from pathlib import Path
from typing import Any

from trulyopen.data.sources import DataError
from trulyopen.errors import UserError
from trulyopen.recipe import FinetuneDataConfig

ROLES = ("system", "user", "assistant", "tool")
FORMATS_FOR = {
    "sft": ("chat", "prompt_completion"),
    "distill": ("chat", "prompt_completion"),
    "dpo": ("preference",),
    "orpo": ("preference",),
    "simpo": ("preference",),
    "reward": ("preference",),
    "kto": ("unpaired", "preference"),  # a pair is two replies: the chosen desirable, the rejected not
    "grpo": ("grpo",),
}


class BadRecord(UserError, ValueError):
    """A record that cannot be used; the message says why (the reader adds where), and `field`
    names the field at fault when one is."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclass
class Example:
    id: str
    where: str  # file:line, for messages
    messages: list[dict] = field(default_factory=list)  # sft: the conversation; others: the prompt
    chosen: str = ""
    rejected: str = ""
    verifier: dict | None = None
    label: bool | None = None  # unpaired: the completion (in `chosen`) is desirable
    tools: list[dict] | None = None  # the functions the conversation may call (chat records)
    base_dir: Path | None = None  # where image paths in its messages are relative to (the file's folder)


def _guess_format(record: dict) -> str:
    if "messages" in record:
        return "chat"
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "verifier" in record:
        return "grpo"
    if "label" in record:
        return "unpaired"
    if "completion" in record:
        return "prompt_completion"
    raise BadRecord(
        "cannot tell its format: expected messages, prompt+completion, chosen+rejected or verifier"
    )


def read_messages(value: Any, what: str) -> list[dict]:
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
        calls = m.get("tool_calls") if m["role"] == "assistant" else None
        if calls is not None:
            if not isinstance(calls, list) or not calls:
                raise BadRecord(f"{what}[{i}].tool_calls must be a non-empty list")
            calls = [template_call(c, f"{what}[{i}].tool_calls[{j}]") for j, c in enumerate(calls)]
            content = content or ""  # a turn of calls alone has no text (OpenAI sends null)
        if isinstance(content, list):  # content parts: text and images (vision-language models)
            content = read_parts(content, f"{what}[{i}].content")
        elif not isinstance(content, str):
            raise BadRecord(
                f"{what}[{i}].content must be a string or a list of parts (got {type(content).__name__})"
            )
        elif not content.strip() and not calls:
            raise BadRecord(f"{what}[{i}].content is empty")
        message = {"role": m["role"], "content": content}
        if calls:
            message["tool_calls"] = calls
        if m["role"] == "tool" and isinstance(m.get("tool_call_id"), str):
            message["tool_call_id"] = m["tool_call_id"]
        out.append(message)
    return out


def read_parts(parts: list, what: str) -> list[dict]:
    """A content-part list (OpenAI's and transformers' form): text parts and image parts, checked for
    shape here; the images themselves are loaded and checked by the VLM's records (vlm/render.py)."""
    from trulyopen.vlm.images import BadImage, image_ref

    if not parts:
        raise BadRecord(f"{what} is an empty list of parts")
    for j, part in enumerate(parts):
        if isinstance(part, dict) and part.get("type") == "text":
            if not isinstance(part.get("text"), str):
                raise BadRecord(f"{what}[{j}].text must be a string", f"{what}[{j}].text")
            continue
        try:
            ref = image_ref(part)
        except BadImage as e:
            raise BadRecord(f"{what}[{j}]: {e}", f"{what}[{j}]") from None
        if ref is None:
            raise BadRecord(
                f'{what}[{j}] must be a text or image part ({{"type": "text" | "image" | "image_url"}})'
            )
    return parts


def _function(value: Any, what: str) -> dict:
    """The "function" object of a tool or a tool call, which must at least have a name."""
    function = value.get("function") if isinstance(value, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise BadRecord(f"{what}.function.name must be a non-empty string", f"{what}.function.name")
    return function


def template_call(call: Any, what: str) -> dict:
    """An OpenAI tool call as chat templates take it: transformers' convention has the arguments
    as an object, where OpenAI's messages carry them as a JSON string."""
    function = _function(call, what)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            raise BadRecord(f"{what}.function.arguments: not JSON", f"{what}.function.arguments") from None
    if not isinstance(arguments, dict):
        raise BadRecord(f"{what}.function.arguments must be a JSON object", f"{what}.function.arguments")
    out = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    return {"id": call["id"], **out} if isinstance(call.get("id"), str) else out


def read_tools(value: Any) -> list[dict] | None:
    """A record's tools: OpenAI's [{"type": "function", "function": {name, description, parameters}}]."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise BadRecord("tools must be a non-empty list")
    for i, tool in enumerate(value):
        function = _function(tool, f"tools[{i}]")
        if not isinstance(function.get("parameters", {}), dict):
            raise BadRecord(f"tools[{i}].function.parameters must be a JSON schema object")
    return value


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
        messages = read_messages(record.get("messages"), "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRecord("messages has no assistant turn to learn from")
        return Example(rid, where, messages, tools=read_tools(record.get("tools")))
    if "prompt" not in record:
        raise BadRecord("has no prompt")
    prompt = read_messages(record["prompt"], "prompt")
    if fmt == "prompt_completion":
        return Example(
            rid,
            where,
            [*prompt, {"role": "assistant", "content": _reply(record.get("completion"), "completion")}],
        )
    if fmt == "unpaired":
        if not isinstance(record.get("label"), bool):
            raise BadRecord("label must be true or false (is the completion desirable?)", "label")
        return Example(
            rid, where, prompt, chosen=_reply(record.get("completion"), "completion"), label=record["label"]
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
            if src.path is not None:
                ex.base_dir = src.path.parent if src.path.is_file() else src.path
            examples.append(ex)
    return examples, bad
