"""Conversations to token ids, with a mask that says which tokens the model learns to produce.

The tokenizer's own chat template renders the text. Which tokens are the assistant's is found by
rendering prefixes: the text of turns 0..i-1 followed by the generation prompt ends exactly where
assistant turn i starts, and the text of turns 0..i ends where it stops (its end-of-turn marker
included, so the model learns to stop). Tokens whose characters fall in those spans are trained:

    <|user|>\\nWrite f<|end|>\\n<|assistant|>\\ndef f(): ...<|end|>\\n
    ......................................████████████████████        █ = trained (loss), . = context

This works with any template that renders a conversation's prefix as a prefix of its text, which
is what chat templates do; one that does not is reported instead of silently mis-masked.
"""

from __future__ import annotations

from dataclasses import dataclass

from trulyopen.errors import UserError
from trulyopen.train.packing import IGNORE, Item


class RenderError(UserError, ValueError):
    """The template cannot be used to find assistant tokens (the message says why)."""


@dataclass
class Rendered:
    ids: list[int]
    trained: list[bool]  # per token: part of an assistant reply


def item_of(r: Rendered) -> Item:
    """The training item of a rendered conversation: next-token targets on the trained tokens."""
    targets = [t if trained else IGNORE for t, trained in zip(r.ids[1:], r.trained[1:], strict=True)]
    return Item(r.ids[:-1], targets)


class ChatRenderer:
    def __init__(self, tokenizer, template: str | None = None):
        self.tok = tokenizer
        self.template = template or getattr(tokenizer, "chat_template", None)
        if not self.template:
            raise RenderError(
                "the tokenizer has no chat template: set finetune.chat_template to a Jinja template"
            )

    def text(
        self, messages: list[dict], generation_prompt: bool = False, tools: list[dict] | None = None
    ) -> str:
        return self.tok.apply_chat_template(
            messages,
            tools=tools or None,
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )

    def _encode(self, text: str, spans: list[tuple[int, int]]) -> Rendered:
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        # a token is trained when its characters overlap an assistant span
        trained = [any(ts < e and te > s for s, e in spans) for ts, te in enc["offset_mapping"]]
        return Rendered(list(enc["input_ids"]), trained)

    def conversation(self, messages: list[dict], tools: list[dict] | None = None) -> Rendered:
        """The whole conversation; every assistant turn (its tool calls included) is trained."""
        full = self.text(messages, tools=tools)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.text(messages[:i], generation_prompt=True, tools=tools) if i else ""
            through = self.text(messages[: i + 1], tools=tools)
            if not (through.startswith(before) and full.startswith(through)):
                raise RenderError("the chat template does not render a conversation's prefix as a prefix")
            spans.append((len(before), len(through)))
        return self._encode(full, spans)

    def reply(self, prompt: list[dict], reply: str) -> Rendered:
        """A prompt and one assistant reply; only the reply is trained (DPO's chosen and rejected)."""
        return self.conversation([*prompt, {"role": "assistant", "content": reply}])

    def prompt(self, prompt: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The prompt followed by the generation prompt: what a model continues (GRPO, serving)."""
        text = self.text(prompt, generation_prompt=True, tools=tools)
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def tool_turn(self, output: str) -> list[int]:
        """The tokens that follow an assistant turn ending in a tool call when the tool answers
        `output`: the end of that turn, the tool turn, and the next assistant turn's start (what a
        tool environment appends to a rollout). Found by rendering with and without the tool turn."""
        marker = "\u2063"  # an invisible separator: where the assistant's text ends
        talk = [{"role": "user", "content": "a"}, {"role": "assistant", "content": marker}]
        before = self.text(talk)
        after = self.text([*talk, {"role": "tool", "content": output}], generation_prompt=True)
        cut = before.rindex(marker) + len(marker)
        if after[:cut] != before[:cut]:
            raise RenderError("the chat template renders a conversation's prefix differently from itself")
        return list(self.tok(after[cut:], add_special_tokens=False)["input_ids"])

    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that end an assistant turn: the end-of-sequence token and the template's end-of-turn
        marker (the last token of a rendered one-turn reply, when it is a special token)."""
        ids = {self.tok.eos_token_id} if self.tok.eos_token_id is not None else set()
        probe = self.conversation([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
        special = set(self.tok.all_special_ids)
        last = [t for t, tr in zip(probe.ids, probe.trained, strict=True) if tr]
        for t in reversed(last):
            if t in special or t in getattr(self.tok, "added_tokens_decoder", {}):
                ids.add(t)
                break
        return tuple(sorted(ids))
