"""Answering with a vision-language model: messages with images become the model's inputs through
its own processor, and our batching engine, or where the family does not allow it transformers'
`generate()`, writes the answer, streamed token by token.

    messages ──► image parts ──► load_image (vlm/images.py: path, data URL, URL when allowed; checked)
       │                                   │ PIL images, in order
       └─► {"type": "image"} placeholders  │
             │                             ▼
             processor.apply_chat_template ─► text ─► processor(text, images) ─► input_ids,
                                                                                pixel_values, ...
    GenerateEngine (our engine's face: submit, cancel, step, start, stop; infer/serial.py)
       one request at a time: model.generate(**inputs) with one logits processor, `Pick`, that
       samples each token as our engine does (its seed, temperature, top-k/p, penalty, grammar),
       keeps the raw logits for logprobs and streams the token through the engines' shared `take`

Which engine (`engine`): our batching engine where the family allows, its prompts with images
prefilled from embeddings with the image features in place (vlm/embed.py: LLaVA), so requests with
images, other images or none are batched together. A family whose image tokens are not plain tokens
to the language model (Qwen2-VL's three positions a token, M-RoPE; Gemma 3's image tokens that see
each other both ways) runs here instead, every request, text-only ones too, one after another; the
server says so once in its log (NOTE).

`Pick` chooses the token itself (generate's own sampling is off: greedy over a score that is 0 for
the chosen token and -inf elsewhere), so a request samples with its own seeded generator exactly as
in our engine; the model's generation_config (recommended temperatures, penalties, suppressed
tokens) is set aside, so nothing changes an answer that the request did not ask for.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trulyopen.infer.engine import Engine, Request
from trulyopen.infer.sampling import penalise, sample_next
from trulyopen.infer.serial import SerialEngine
from trulyopen.vlm import embed
from trulyopen.vlm.images import BadImage, Limits, image_ref, load_image

NOTE = (
    "{name}: a vision-language model ({family}) that our batching engine does not take (it batches "
    "{batched}, whose image tokens are plain tokens to the language model): its requests, with images "
    "or not, run one at a time through transformers' generate()"
)


@dataclass
class VLM:
    """A vision-language model and its processor (images and text), in eval mode."""

    model: torch.nn.Module
    processor: Any

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def family(self) -> str:
        return self.model.config.model_type


def is_processor(obj: Any) -> bool:
    """Whether `obj` is a multimodal processor (it reads images), not a plain tokenizer."""
    return getattr(obj, "image_processor", None) is not None


def with_images(
    messages: list[dict], limits: Limits | None = None, base_dir: Path | None = None
) -> tuple[list[dict], list]:
    """The messages as a processor's chat template takes them (each image part an {"type": "image"}
    placeholder) and their images, loaded and checked, in order. A bad image raises BadImage
    naming its part: `messages.I.content.J: why`."""
    out, images = [], []
    for i, m in enumerate(messages):
        content = m.get("content")
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for j, part in enumerate(content):
            try:
                ref = image_ref(part)
                if ref is not None:
                    images.append(load_image(ref, base_dir, limits or Limits()))
            except BadImage as e:
                raise BadImage(f"messages.{i}.content.{j}: {e}") from None
            if ref is not None:
                parts.append({"type": "image"})
            elif isinstance(part, dict) and part.get("type") == "text":
                parts.append({"type": "text", "text": part.get("text", "")})
        out.append({**m, "content": parts})
    return out, images


def prompt_inputs(
    processor, messages: list[dict], images: list, tools: list[dict] | None = None
) -> dict[str, torch.Tensor]:
    """The model's inputs for `messages` (from `with_images`) followed by the generation prompt:
    input_ids [1, T] with the image tokens expanded, and the image tensors the family takes."""
    text = processor.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    try:
        features = processor(text=[text], images=images or None, return_tensors="pt")
    except (ValueError, TypeError) as e:  # an image the processor cannot take (too small, say)
        raise BadImage(f"messages: the model's processor refused the images: {e}") from None
    return dict(features)


def stop_ids(processor) -> tuple[int, ...]:
    """Tokens that end an assistant turn: eos, and the chat template's end-of-turn marker."""
    from trulyopen.finetune.render import ChatRenderer, RenderError

    tok = processor.tokenizer
    try:
        return ChatRenderer(tok, getattr(processor, "chat_template", None)).stop_ids()
    except RenderError:
        return (tok.eos_token_id,) if tok.eos_token_id is not None else ()


def engine(vlm: VLM, slots: int = 32, max_len: int | None = None) -> Engine | GenerateEngine:
    """Our batching engine for a family it takes (vlm/embed.py), else a GenerateEngine (whose
    caller logs `note`)."""
    if not embed.batchable(vlm.model):
        return GenerateEngine(vlm, max_len)
    tok = vlm.tokenizer
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    return Engine(vlm.model, decode, slots=slots, max_len=max_len, embed=embed.ImageEmbedder(vlm.model))


def note(name: str, vlm: VLM) -> str:
    """The log's line for a VLM that falls back to generate()."""
    return NOTE.format(name=name, family=vlm.family, batched=", ".join(sorted(embed.BATCHED)))


class GenerateEngine(SerialEngine):
    """Requests to a VLM, answered one after another by transformers' `generate()`. A request's
    `inputs` are what `prompt_inputs` made (ids and images); without them, its prompt ids alone."""

    thread_name = "trulyopen-vlm"

    def __init__(self, vlm: VLM, max_len: int | None = None):

        from transformers import GenerationConfig

        self.vlm, self.model = vlm, vlm.model
        tok = vlm.tokenizer
        text = self.model.config.get_text_config()
        positions = int(getattr(text, "max_position_embeddings", 2048) or 2048)
        super().__init__(
            lambda ids: tok.decode(ids, skip_special_tokens=True),
            max_len or min(positions, 4096),
            self.model.get_input_embeddings().num_embeddings,
        )
        self.device = next(self.model.parameters()).device
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # generate() fills what a call leaves unset from the model's generation_config (its
        # recommended sampling, penalties, suppressed tokens...): the engine owns the model, and
        # only the request decides, so the model's is replaced by a neutral one
        self.model.generation_config = GenerationConfig(pad_token_id=self.pad)

    def _run(self, req: Request) -> None:
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        seed = req.params.seed if req.params.seed is not None else random.randrange(2**63)
        req.generator = torch.Generator(device=self.device).manual_seed(seed)
        inputs = req.inputs or {"input_ids": torch.tensor([req.prompt])}
        dtype = self.model.dtype
        inputs = {
            k: v.to(self.device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()
        }
        pick = Pick(self, req)
        with torch.inference_mode():
            self.model.generate(
                **inputs,
                generation_config=GenerationConfig(  # greedy over Pick's scores, which hold one token
                    do_sample=False,
                    pad_token_id=self.pad,
                    max_new_tokens=max(1, min(req.params.max_new_tokens, self.max_len - len(req.prompt))),
                ),
                logits_processor=LogitsProcessorList([pick]),
                stopping_criteria=StoppingCriteriaList([pick.stop]),
            )


class Pick:
    """generate()'s last logits processor and its stopping criterion, for one request: chooses the
    next token as our engine would, streams it (`emit`), and stops generate once the request is done."""

    def __init__(self, engine: GenerateEngine, req: Request):
        self.engine, self.req, self.done = engine, req, False

    def stop(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        """The stopping criterion: [batch] booleans, true once the request is done."""
        return torch.full((input_ids.shape[0],), self.done, dtype=torch.bool, device=input_ids.device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        from trulyopen.infer import constrain

        req, p = self.req, self.req.params
        raw = scores[0].float()
        row = raw[None].clone()
        if req.matcher is not None:
            constrain.mask(row, [req.matcher])
        if p.temperature == 0 and p.repetition_penalty == 1.0:
            token = int(row.argmax(dim=-1))
        else:
            seen = torch.tensor([req.prompt + req.output], device=row.device)
            token = int(sample_next(penalise(row, seen, p.repetition_penalty), p, req.generator)[0])
        self.done = self.engine.emit(req, token, raw)
        out = torch.full_like(scores, float("-inf"))
        out[0, token] = 0.0
        return out
