"""Tool calls in a model's text, in the format our chat template teaches (Hermes-style, as Qwen's):

    <tool_call>{"name": "dedent", "arguments": {"text": "  a"}}</tool_call>

The server parses an answer's calls out of its text and decodes required calls under `grammar`;
evaluation parses a model's free answer to see which function it called, with what.
"""

from __future__ import annotations

import json
import re

from trulyopen.infer.constrain import COMPACT

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
CALL = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(CALL_CLOSE), re.DOTALL)


def parse_calls(text: str) -> tuple[str | None, list[tuple[str, dict]]]:
    """An answer's text split into its content (None when only calls) and its (name, arguments)
    calls: each complete <tool_call>...</tool_call> whose JSON has a string name and an object of
    arguments. Anything else (a half-written call, bad JSON) stays in the content."""
    calls, rest, at = [], [], 0
    for m in CALL.finditer(text):
        try:
            call = json.loads(m.group(1))
            name, arguments = call["name"], call["arguments"]
        except (ValueError, KeyError, TypeError):
            continue
        if not isinstance(name, str) or not isinstance(arguments, dict):
            continue
        rest.append(text[at : m.start()])
        at = m.end()
        calls.append((name, arguments))
    content = ("".join(rest) + text[at:]).strip() if calls else text
    return (content or None), calls


def call_grammar(functions: list[tuple[str, dict]]) -> str:
    """A Lark grammar (llguidance's dialect) of one call of one of `functions`, (name, JSON schema
    of its arguments) pairs: the name is one of theirs and the arguments satisfy its schema."""
    calls = []
    for name, parameters in functions:
        props = {"name": {"const": name}, "arguments": parameters}
        calls.append({"type": "object", "properties": props, "required": ["name", "arguments"]})
        calls[-1]["additionalProperties"] = False
    call = {"anyOf": calls} if len(calls) > 1 else calls[0]
    call["x-guidance"] = COMPACT
    return f'start: "{CALL_OPEN}" call "{CALL_CLOSE}"\ncall: %json {json.dumps(call)}'
