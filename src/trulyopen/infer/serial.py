"""Engines that decode one request at a time, behind the interface of `infer.engine.Engine`
(submit, cancel, start, stop, step, running, waiting, max_len, vocab_size), so that the server and
the terminal cannot tell them from ours: llama.cpp's (serve/llamacpp.py) and transformers'
`generate()` for vision-language models (vlm/generate.py).

    submit() ─► waiting ─► one thread: _run(req) samples tokens ─► emit(req, token) per token
                                                                      │
            text, stop strings, stop tokens, max tokens, grammar  ◄───┘  (the same `take` and
            and cancellation, as in our engine                           `grammar_refuses`)

A subclass writes `_run(req)`: it samples the request's tokens and hands each to `emit`, stopping
when `emit` says the request is done. A request that fails fails alone; the engine goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from trulyopen.infer.engine import Event, Queue, Request, check_prompt, grammar_refuses, logprobs_of, take
from trulyopen.infer.text import TextStream


class SerialEngine(Queue):
    thread_name = "trulyopen-serial"

    def __init__(self, decode: Callable[[list[int]], str], max_len: int, vocab_size: int):
        super().__init__()
        self.decode, self.max_len, self.vocab_size = decode, max_len, vocab_size

    def _run(self, req: Request) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ from any thread
    def submit(self, req: Request) -> Request:
        check_prompt(req.prompt, self.max_len)
        req.stream = TextStream(self.decode, req.params.stop_strings)
        return self.enqueue(req)

    def cancel(self, req: Request) -> None:
        req.cancelled = True  # seen before the next token

    # ------------------------------------------------------------------ the engine's thread
    def step(self) -> bool:
        """Run the next waiting request to its end. Returns whether any work is left."""
        with self._lock:
            if not self.waiting:
                return False
            req = self.waiting.popleft()
            self.running.append(req)
        try:
            if req.cancelled:
                self.finish(req, "cancelled")
            else:
                req.length = len(req.prompt)
                self._run(req)
                if req.finish_reason is None:  # the sampler stopped on its own: the cache's end
                    self.finish(req, "length", req.stream.flush() if req.stream is not None else "")
        except Exception as e:  # a failed request fails alone; the engine goes on
            if req.finish_reason is None:
                self.finish(req, "error", error=f"{type(e).__name__}: {e}")
        finally:
            with self._lock:
                self.running.remove(req)
        return bool(self.waiting)

    def emit(self, req: Request, token: int, raw: torch.Tensor | None = None) -> bool:
        """Hand a sampled token to request `req` (`raw`: the model's logits [vocab] it was sampled
        from, for logprobs): its text is streamed, and True comes back when the request is done
        (stopped, at its length, refused by its grammar, or cancelled)."""
        if req.cancelled:
            self.finish(req, "cancelled")
            return True
        refused = grammar_refuses(req, token)
        if refused:
            self.finish(req, "error", error=refused)
            return True
        event = take(req, token, self.max_len, time.perf_counter())
        if raw is not None and req.params.logprobs is not None:
            event.logprobs = logprobs_of(raw[None], [req], {0: token})[0]
        req.length += 1
        req.finish_reason = event.finish_reason
        req.on_event(event)
        return event.finish_reason is not None

    @staticmethod
    def finish(req: Request, reason: str, text: str = "", error: str | None = None) -> None:
        req.finish_reason, req.error = reason, error
        req.on_event(Event(text, [], reason, error))
