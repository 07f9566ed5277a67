"""`trulyopen generate MODEL "prompt"` and `trulyopen chat MODEL`: the engine in a terminal,
text printed as it streams."""

from __future__ import annotations

import queue
import sys
import time
from dataclasses import replace

from trulyopen.infer.engine import Engine, Event, Request
from trulyopen.infer.sampling import SamplingParams


def _stream(engine: Engine, ids: list[int], params: SamplingParams, out=sys.stdout) -> tuple[str, Request]:
    events: queue.Queue[Event] = queue.Queue()
    req = engine.submit(Request(ids, params, events.put))
    text = []
    while True:
        while not events.empty():
            e = events.get()
            out.write(e.text)
            out.flush()
            text.append(e.text)
            if e.finish_reason is not None:
                if e.finish_reason == "error":
                    raise RuntimeError(f"generation failed: {e.error}")
                return "".join(text), req
        engine.step()


def _engine(model, tok, max_len: int | None) -> Engine:
    return Engine(model, lambda ids: tok.decode(ids, skip_special_tokens=True), slots=1, max_len=max_len)


def generate_text(model, tok, prompt: str, params: SamplingParams, max_len: int | None = None) -> str:
    ids = tok(prompt, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]
    eos = (tok.eos_token_id,) if tok.eos_token_id is not None else ()
    params = replace(params, stop_ids=tuple(sorted({*params.stop_ids, *eos})))
    text, _ = _stream(_engine(model, tok, max_len), ids, params)
    sys.stdout.write("\n")
    return text


def chat(model, tok, params: SamplingParams, system: str | None = None, max_len: int | None = None) -> None:
    """A conversation on standard input; an empty line or end of input ends it."""
    from trulyopen.finetune.render import ChatRenderer

    renderer = ChatRenderer(tok)
    params = replace(params, stop_ids=renderer.stop_ids())
    engine = _engine(model, tok, max_len)
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        sys.stdout.write("model> ")
        start = time.perf_counter()
        answer, req = _stream(engine, renderer.prompt(messages), params)
        secs = time.perf_counter() - start
        sys.stdout.write(f"\n  ({len(req.output)} tokens, {len(req.output) / secs:.1f} tokens/s)\n")
        messages.append({"role": "assistant", "content": answer})
