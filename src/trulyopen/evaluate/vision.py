"""Multiple choice and generation for a vision-language model, whose items may carry images.

An item becomes one user turn, rendered with the model's processor (its chat template, or the
family's image placeholder where it has none):

    user: [image] [image] <the item's text>          the images first, then the text of the form
    assistant: <choice>                               multiple choice: log p(choice | images, text)
    assistant: <generated answer>                     generation: checked by the item's verifier

The processor expands each image into its image tokens and makes the pixel inputs; the choices of an
item are scored in one forward pass (a row per choice). The forms (cloze, lettered), normalisation
and metrics are those of text multiple choice (multiple_choice.py), so the figures read the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trulyopen.evaluate.loglik import Score
from trulyopen.evaluate.multiple_choice import (
    LETTERS,
    accuracy,
    cloze_choice,
    cloze_prompt,
    lettered_prompt,
    scored,
)
from trulyopen.evaluate.stats import mean_and_stderr


def _images(inst) -> list:
    from trulyopen.vlm.images import load_image

    return [load_image(ref) for ref in inst.images]


def user_prompt(processor, text: str, n_images: int) -> str:
    """The text of one user turn holding n images and `text`, ready for the answer to follow."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return getattr(processor, "image_token", "<image>") * n_images + text


def _inputs(processor, texts: list[str], images: list, device) -> dict:
    """The processor's tensors for rows of text sharing one item's images (none: text only)."""
    kwargs = {"images": [images] * len(texts)} if images else {}
    enc = processor(text=texts, return_tensors="pt", padding=True, **kwargs)
    return {k: v.to(device) for k, v in enc.items()}


@torch.no_grad()
def _choice_scores(model, processor, prompt: str, choices: list[str], images: list) -> list[Score]:
    """log p(choice | prompt, images) of each choice, one row per choice. A choice's tokens are
    those of prompt+choice after the prompt's, as in lm-eval."""
    device = next(model.parameters()).device
    processor.tokenizer.padding_side = "right"
    n_prompt = int(_inputs(processor, [prompt], images, device)["attention_mask"].sum())
    enc = _inputs(processor, [prompt + c for c in choices], images, device)
    logp = F.log_softmax(model(**enc).logits.float(), dim=-1)
    out = []
    for r in range(len(choices)):
        end = int(enc["attention_mask"][r].sum())
        target = enc["input_ids"][r, n_prompt:end]
        rows = logp[r, n_prompt - 1 : end - 1]
        greedy = bool((rows.argmax(dim=-1) == target).all())
        out.append(Score(float(rows.gather(1, target[:, None]).sum()), greedy, len(target)))
    return out


def evaluate_mc(model, processor, spec, instances: list) -> tuple[dict, list[dict]]:
    """Multiple choice with images (as multiple_choice.evaluate, without few-shot examples: each
    would need its own images)."""
    records = []
    for inst in instances:
        images = _images(inst)
        rec = {"id": inst.id, "choices": inst.choices, "answer": inst.answer, "images": inst.images}
        for form in spec.forms:
            if form == "cloze":
                text, conts = cloze_prompt(inst), [cloze_choice(inst, c) for c in inst.choices]
            else:
                text, conts = lettered_prompt(inst), [f" {LETTERS[j]}" for j in range(len(inst.choices))]
            prompt = user_prompt(processor, text, len(images))
            rec[form] = scored(
                spec, form, inst, prompt, _choice_scores(model, processor, prompt, conts, images)
            )
        records.append(rec)
    return accuracy(spec, records), records


@torch.no_grad()
def answer(
    model, processor, prompt: str, images: list, max_new_tokens: int, temperature: float, seed: int
) -> str:
    """The model's answer to one user turn with images (transformers' generate)."""
    device = next(model.parameters()).device
    enc = _inputs(processor, [prompt], images, device)
    torch.manual_seed(seed)
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=None,
        top_k=None,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    return processor.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def evaluate_generation(model, processor, spec, instances: list) -> tuple[dict, list[dict]]:
    """Generation with images: the answer to each item, scored by its verifier."""
    from trulyopen.evaluate.generation import ANSWER_STOPS, _cut
    from trulyopen.rewards.verifiers import parse_verifier, score_all

    answers = []
    for inst in instances:
        images = _images(inst)
        prompt = user_prompt(processor, inst.prompt, len(images))
        text = answer(model, processor, prompt, images, spec.max_new_tokens, spec.temperature, spec.seed)
        answers.append(_cut(text, ANSWER_STOPS).strip())
    verifiers = [parse_verifier(i.verifier) for i in instances]
    scores = score_all(list(zip(verifiers, answers, strict=True)))
    records = [
        {"id": i.id, "prompt": i.prompt, "images": i.images, "prediction": a, "score": s}
        for i, a, s in zip(instances, answers, scores, strict=True)
    ]
    return {"score": mean_and_stderr(scores)}, records
