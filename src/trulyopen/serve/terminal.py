"""`trulyopen generate MODEL "prompt"` and `trulyopen chat MODEL`: the engine in a terminal,
text printed as it streams. A vision-language model (vlm/generate.py) answers about images:
`chat --image PATH` shows one with the first message, and `/image PATH` with the next."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from typing import TextIO

from trulyopen.infer.engine import Engine, Event, Request
from trulyopen.infer.sampling import SamplingParams
from trulyopen.vlm import generate
from trulyopen.vlm.generate import VLM


def _stream(
    engine, ids: list[int], params: SamplingParams, out=sys.stdout, inputs: dict | None = None
) -> tuple[str, Request]:
    text = []

    def show(e: Event) -> None:  # (called on this thread: the engine steps here)
        out.write(e.text)
        out.flush()
        text.append(e.text)

    req = engine.submit(Request(ids, params, show, inputs=inputs))
    while req.finish_reason is None:
        engine.step()
    if req.finish_reason == "error":
        raise RuntimeError(f"generation failed: {req.error}")
    return "".join(text), req


def _engine(model, tok, max_len: int | None):
    if isinstance(model, VLM):
        return generate.engine(model, slots=1, max_len=max_len)
    return Engine(model, lambda ids: tok.decode(ids, skip_special_tokens=True), slots=1, max_len=max_len)


def generate_text(
    model, tok, prompt: str, params: SamplingParams, max_len: int | None = None, out: TextIO | None = None
) -> str:
    """Continue `prompt`, writing the text to `out` (default: standard output) as it comes."""
    out = out or sys.stdout
    ids = tok(prompt, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]
    eos = (tok.eos_token_id,) if tok.eos_token_id is not None else ()
    params = replace(params, stop_ids=tuple(sorted({*params.stop_ids, *eos})))
    text, _ = _stream(_engine(model, tok, max_len), ids, params, out)
    out.write("\n")
    return text


def chat(
    model,
    tok,
    params: SamplingParams,
    system: str | None = None,
    max_len: int | None = None,
    image: str | None = None,
) -> None:
    """A conversation on standard input; an empty line or end of input ends it. With a VLM,
    `image` (a path) goes with the first message, and a line `/image PATH` with the next one."""
    from trulyopen.finetune.render import ChatRenderer

    vlm = model if isinstance(model, VLM) else None
    if vlm is None:
        renderer = ChatRenderer(tok)
        params = replace(params, stop_ids=renderer.stop_ids())
    else:
        params = replace(params, stop_ids=generate.stop_ids(vlm.processor))
    engine = _engine(model, tok, max_len)
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        if line.startswith("/image "):
            image = line[len("/image ") :].strip() if vlm is not None else None
            print(f"  (the next message shows {image})" if image else "  (a text model: it reads no images)")
            continue
        content = line
        if vlm is not None and image is not None:
            content = [{"type": "image", "image": image}, {"type": "text", "text": line}]
            image = None
        messages.append({"role": "user", "content": content})
        if vlm is None:
            ids, inputs = renderer.prompt(messages), None
        else:
            try:
                shown, pictures = generate.with_images(messages)
            except generate.BadImage as e:
                print(f"  {e}")
                messages.pop()
                continue
            inputs = generate.prompt_inputs(vlm.processor, shown, pictures)
            ids = inputs["input_ids"][0].tolist()
        sys.stdout.write("model> ")
        start = time.perf_counter()
        answer, req = _stream(engine, ids, params, inputs=inputs)
        secs = time.perf_counter() - start
        sys.stdout.write(f"\n  ({len(req.output)} tokens, {len(req.output) / secs:.1f} tokens/s)\n")
        messages.append({"role": "assistant", "content": answer})
