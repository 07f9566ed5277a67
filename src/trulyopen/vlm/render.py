"""Conversations with images to training items: which of the processor's tokens the model learns.

A VLM's processor turns each image placeholder of the text into as many image tokens as the image
has features (Qwen2-VL: one per 2x2 patches; LLaVA: one per patch), and may add a BOS token. So the
assistant's tokens are found on the text first, then carried over to the processor's tokens:

    1. render the conversation with the chat template, and find the assistant's character spans by
       rendering prefixes, as for text models (finetune/render.py): Rendered ids + trained flags
    2. run the processor on the same text and images: its input_ids, placeholders expanded
    3. align the two token lists (difflib on ids): a processor token matched to a rendered token
       takes its flag; a token the expansion added is context, never a target

       rendered   <im_start> user \\n <image_pad>                    What ? <im_end> ... red <im_end>
       processor  <im_start> user \\n <image_pad> <image_pad> x 3    What ? <im_end> ... red <im_end>
       trained     .          .    .   .           .  (added)        .    . .          ███  ███

Images are loaded and checked (trulyopen.vlm.images) when an item is built, so a missing, broken or
too large image is a bad record named by file and line; the item keeps only the references, and a
batch loads its images again (records may hold more pixels than memory).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trulyopen.finetune.records import Example
from trulyopen.finetune.render import ChatRenderer
from trulyopen.vlm.images import Limits, image_ref, load_image

METHODS = ("sft", "dpo")  # what a vision-language model trains with here


@dataclass
class VlmItem:
    """One conversation as the processor sees it, and which of its tokens are trained."""

    text: str  # rendered by the chat template, image placeholders not yet expanded
    images: list[str]  # references of its images, in order (paths, data URLs)
    base_dir: Path | None  # what relative image paths are relative to
    trained: list[bool]  # per token of the processor's input_ids: an assistant token

    def __len__(self) -> int:
        return len(self.trained)

    @property
    def trained_tokens(self) -> int:
        return sum(self.trained[1:])  # targets are next tokens: the first token is never one


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as VLM chat templates take them: every content a list of parts, an image part as
    {"type": "image"} (some templates test only for that type), text parts as they are."""
    out = []
    for m in messages:
        content = m["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        parts = [{"type": "image"} if image_ref(p) is not None else p for p in parts]
        out.append({**m, "content": parts})
    return out


def image_refs(messages: list[dict]) -> list[str]:
    """The image references of a conversation, in the order they appear."""
    refs = []
    for m in messages:
        if isinstance(m["content"], list):
            refs += [r for r in map(image_ref, m["content"]) if r is not None]
    return refs


def align(rendered: list[int], trained: list[bool], expanded: list[int]) -> list[bool]:
    """Trained flags for `expanded` (the processor's ids): those of the rendered tokens it matches;
    tokens only `expanded` has (image tokens, a BOS) are not trained."""
    out = [False] * len(expanded)
    matcher = difflib.SequenceMatcher(None, rendered, expanded, autojunk=False)
    for a, b, n in matcher.get_matching_blocks():
        out[b : b + n] = trained[a : a + n]
    return out


class VlmRenderer:
    """Records to VlmItems, and micro-batches of them to processor outputs (vlm/batch.py)."""

    def __init__(self, processor: Any, chat: ChatRenderer, limits: Limits):
        self.processor, self.chat, self.limits = processor, chat, limits
        processor.tokenizer.padding_side = "right"  # targets are placed row by row from position 0

    def images(self, item: VlmItem) -> list:
        return [load_image(ref, item.base_dir, self.limits) for ref in item.images]

    def encode(self, texts: list[str], images: list) -> Any:
        """The processor over a micro-batch: padded input_ids, attention_mask and the family's
        image tensors (pixel_values, image_grid_thw, pixel_attention_mask...)."""
        return self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)

    def item(self, messages: list[dict], base_dir: Path | None) -> VlmItem:
        """A conversation's item, every assistant turn trained; raises BadImage for a bad image."""
        refs = image_refs(messages)
        images = [load_image(ref, base_dir, self.limits) for ref in refs]
        messages = template_messages(messages)
        r = self.chat.conversation(messages)
        text = self.chat.text(messages)
        expanded = self.encode([text], images)["input_ids"][0].tolist()
        return VlmItem(text, refs, base_dir, align(r.ids, r.trained, expanded))

    def build(self, examples: list[Example], method: str, seq_len: int) -> list:
        """Per example: its item (sft) or (chosen, rejected) items (dpo); None when longer than
        seq_len; a string saying why for a record whose images cannot be used."""
        from trulyopen.vlm.images import BadImage

        out: list = []
        for ex in examples:
            try:
                if method == "sft":
                    it: Any = self.item(ex.messages, ex.base_dir)
                    out.append(it if len(it) <= seq_len else None)
                    continue
                pair = tuple(
                    self.item([*ex.messages, {"role": "assistant", "content": reply}], ex.base_dir)
                    for reply in (ex.chosen, ex.rejected)
                )
                out.append(pair if max(map(len, pair)) <= seq_len else None)
            except BadImage as e:
                out.append(str(e))
        return out
