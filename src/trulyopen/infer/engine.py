"""The inference engine: many requests decoded together, joining and leaving between steps.

    submit() ─► waiting ─► (free slot) prefill: one forward over the new prompts, first token
                               │
                 running ◄─────┘    each step: one forward over every running request
                    │               (one token each), sample, stream the new text
                    └─► finished (stop token, stop string, max tokens, cancelled) frees its slot

A long answer never holds up a short one: the short one finishes and leaves, and a waiting request
takes its slot at the next step (continuous batching). Each request samples with its own seeded
generator, so its text does not depend on the other requests in the batch. `generate()` (below)
runs a list of prompts to completion with the same engine; GRPO and evaluation sample with it.
A vision-language model's prompts with images join the same prefill as embeddings, image features
in place of image tokens (the `embed` hook, vlm/embed.py), and decode as text.

Threads: `submit` and `cancel` may be called from any thread; `step` runs on one (the server runs
it in a background thread with `start()`); events reach each request's `on_event` from there.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from trulyopen.infer import constrain, fast
from trulyopen.infer.cache import SlotCache
from trulyopen.infer.sampling import SamplingParams, penalise, sample_next
from trulyopen.infer.text import TextStream
from trulyopen.model.logits import logits_at


@dataclass
class Logprob:
    """A sampled token's log-probability, and the `top` most likely tokens' (id, log-probability)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    text: str  # new text, safe to show (no half characters, no partial stop strings)
    token_ids: list[int]  # new tokens
    finish_reason: str | None = None  # stop | length | cancelled | error, on the last event
    error: str | None = None
    logprobs: list[Logprob] | None = None  # one per new token, when the request asked for them


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None] = lambda e: None
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None  # when the first token was sampled (time to first token)
    # set by the engine
    length: int = 0  # tokens of this request in the cache
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    # a grammar's matcher (infer/constrain.py): each token is sampled from those it allows, and
    # the request stops once the grammar is complete
    matcher: object | None = None
    # the model's inputs beyond the prompt's ids (a vision-language model's image tensors, with
    # the ids they go with): for an engine that takes them (ours with `embed`, vlm/generate.py's)
    inputs: dict | None = None


class Queue:
    """Requests waiting and running, and the background thread that steps them (`start`, `stop`):
    ours, and the engines that decode one request at a time (infer/serial.py)."""

    thread_name = "trulyopen-engine"

    def __init__(self) -> None:
        self.running: list[Request] = []
        self.waiting: deque[Request] = deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def step(self) -> bool:
        raise NotImplementedError

    def enqueue(self, req: Request) -> Request:
        with self._lock:
            self.waiting.append(req)
            self._lock.notify()
        return req

    def start(self) -> None:
        """Run steps in a background thread until stop()."""
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self.running and not self.waiting:
                    self._lock.wait()
                if self._stopping:
                    return
            self.step()


class Engine(Queue):
    def __init__(
        self,
        model: torch.nn.Module,
        decode: Callable[[list[int]], str] | None = None,
        slots: int = 32,
        max_len: int | None = None,
        prefill_tokens: int = 4096,
        embed: Callable[[torch.Tensor, list[dict | None]], torch.Tensor] | None = None,
    ):
        """decode: token ids -> text (needed for streamed text and stop strings); slots: requests
        decoded at once; max_len: prompt + output tokens of one request (the cache's length);
        prefill_tokens: prompt tokens admitted per step (bounds the pause a prefill causes);
        embed: for a vision-language model (vlm/embed.py), the input embeddings [k, T, width] of a
        prefill's ids [k, T] given each row's `inputs` (its images, or None): image features in
        place of image tokens. Requests with `inputs` are taken only with it."""
        self.model, self.decode, self.embed = model, decode, embed
        config = getattr(model, "config", None)
        if hasattr(config, "get_text_config"):  # (a VLM's positions are its language model's)
            config = config.get_text_config()
        self.max_len = max_len or min(int(getattr(config, "max_position_embeddings", 2048) or 2048), 4096)
        self.slots, self.prefill_tokens = slots, prefill_tokens
        self.device = next(model.parameters()).device
        self.vocab_size = model.get_input_embeddings().num_embeddings  # token ids a prompt may hold
        self.cache = SlotCache(slots, self.max_len)
        self.fast = fast.FastDecoder(model, self.max_len) if fast.supports(model) else None
        super().__init__()  # (running[i] lives in slot i)

    # ------------------------------------------------------------------ from any thread
    def submit(self, req: Request) -> Request:
        check_prompt(req.prompt, self.max_len)
        if req.inputs is not None and self.embed is None:
            raise ValueError("this engine takes token ids only, not images")
        seed = req.params.seed if req.params.seed is not None else random.randrange(2**63)
        req.generator = torch.Generator(device=self.device).manual_seed(seed)
        if req.params.stop_strings or self.decode is not None:
            if self.decode is None:
                raise ValueError("stop strings need a decode function")
            req.stream = TextStream(self.decode, req.params.stop_strings)
        return self.enqueue(req)

    def cancel(self, req: Request) -> None:
        req.cancelled = True  # acted on at the next step, before any more compute is spent on it
        with self._lock:
            self._lock.notify()

    # ------------------------------------------------------------------ the engine's thread
    @torch.inference_mode()
    def step(self) -> bool:
        """Admit waiting requests, then decode one token for every running one. Returns whether
        any work is left."""
        for req in [r for r in self.running if r.cancelled]:
            self._finish(req, "cancelled")
        new = self._admit()
        try:
            if new:
                self._prefill(new)
            if self.running:
                self._decode()
        except Exception as e:  # a failed forward fails the requests in it, not the engine
            message = f"{type(e).__name__}: {e}"
            for req in list(self.running):
                self._finish(req, "error", error=message)
            for req in new:
                if req.finish_reason is None:  # failed in its prefill, before it held a slot
                    req.finish_reason, req.error = "error", message
                    req.on_event(Event("", [], "error", message))
        return bool(self.running or self.waiting)

    def _admit(self) -> list[Request]:
        new, budget = [], self.prefill_tokens
        with self._lock:
            while self.waiting and len(self.running) + len(new) < self.slots:
                req = self.waiting[0]
                if req.cancelled:
                    self.waiting.popleft()
                    req.finish_reason = "cancelled"
                    req.on_event(Event("", [], "cancelled"))
                    continue
                if new and len(req.prompt) > budget:
                    break
                new.append(self.waiting.popleft())
                budget -= len(req.prompt)
        return new

    def _prefill(self, new: list[Request]) -> None:
        """One forward over the new prompts (right-padded), written into slots n..n+k-1."""
        n, k, T = len(self.running), len(new), max(len(r.prompt) for r in new)
        ids = torch.zeros((k, T), dtype=torch.long)
        lengths = torch.tensor([len(r.prompt) for r in new])
        for i, r in enumerate(new):
            ids[i, : len(r.prompt)] = torch.tensor(r.prompt)
        j = torch.arange(T)
        mask = (j[None, :, None] >= j[None, None, :]) & (j[None, None, :] < lengths[:, None, None])
        self.cache.prefill(first=n, rows=k, length=T)
        last = sorted({int(x) - 1 for x in lengths})
        images = [r.inputs for r in new]
        embeds = self.embed(ids.to(self.device), images) if self.embed is not None and any(images) else None
        logits = self._forward(ids, j.expand(k, T), mask[:, None], last, embeds)
        column = torch.tensor([last.index(int(x) - 1) for x in lengths])
        for r in new:
            r.length = len(r.prompt)
        self.running += new
        self._sample(new, logits[torch.arange(k), column].float())

    def _decode(self) -> None:
        reqs = self.running
        tokens = torch.tensor([[r.output[-1]] for r in reqs])
        positions = torch.tensor([r.length for r in reqs])
        span = int(positions.max()) + 1
        self.cache.decode(positions.to(self.device), span)
        mask = torch.arange(span)[None, :] <= positions[:, None]
        logits = self._forward(tokens, positions[:, None], mask[:, None, None], [0])[:, 0]
        for r in reqs:
            r.length += 1
        self._sample(list(reqs), logits.float())

    def _forward(self, ids, positions, mask, keep: list[int], embeds=None) -> torch.Tensor:
        """Logits [rows, len(keep), vocab] at positions `keep`, writing the keys and values of
        `ids` (or of their `embeds`, a prefill with images) into the cache as set up by the caller."""
        ids, positions, mask = ids.to(self.device), positions.to(self.device), mask.to(self.device)
        if self.fast is not None:
            return self.fast(ids, positions, mask, self.cache, keep, embeds)
        tokens = {"input_ids": ids} if embeds is None else {"inputs_embeds": embeds}
        return logits_at(
            self.model,
            keep,
            **tokens,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        )

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> None:
        """Pick each request's next token, stream it, and finish the requests that are done."""
        plain = [
            i for i, r in enumerate(reqs) if r.params.temperature == 0 and r.params.repetition_penalty == 1.0
        ]
        raw = logits
        if any(r.matcher is not None for r in reqs):  # (the log-probabilities stay the model's own)
            logits = logits.clone()
            constrain.mask(logits, [r.matcher for r in reqs])
        greedy = logits[plain].argmax(dim=-1).tolist() if plain else []
        chosen = dict(zip(plain, greedy, strict=True))
        for i, r in enumerate(reqs):
            if i not in chosen:
                row = logits[i : i + 1]
                seen = torch.tensor([r.prompt + r.output], device=row.device)
                row = penalise(row, seen, r.params.repetition_penalty)
                chosen[i] = int(sample_next(row, r.params, r.generator)[0])
        scored = logprobs_of(raw, reqs, chosen)
        now = time.perf_counter()
        for i, r in enumerate(reqs):
            refused = grammar_refuses(r, chosen[i])
            if refused:
                self._finish(r, "error", error=refused)
                continue
            event = take(r, chosen[i], self.max_len, now)
            event.logprobs = scored.get(i)
            if event.finish_reason is None:
                r.on_event(event)
            else:
                self._finish(r, event.finish_reason, event.text, event.token_ids, logprobs=event.logprobs)

    def _finish(
        self,
        req: Request,
        reason: str,
        text: str = "",
        tokens=(),
        error: str | None = None,
        logprobs: list[Logprob] | None = None,
    ) -> None:
        """Free the request's slot: the last running request moves into it."""
        i = self.running.index(req)
        last = self.running.pop()
        if last is not req:
            self.cache.move(len(self.running), i, last.length)
            self.running[i] = last
        req.finish_reason, req.error = reason, error
        req.on_event(Event(text, list(tokens), reason, error, logprobs))


def logprobs_of(
    logits: torch.Tensor, reqs: list[Request], chosen: dict[int, int]
) -> dict[int, list[Logprob]]:
    """Row i's sampled token's log-probability under the model (log-softmax of its raw logits, as
    a scorer computes it), with its top-k, for the requests that asked for them."""
    rows = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
    if not rows:
        return {}
    logp = torch.log_softmax(logits[rows].float(), dim=-1)
    k = max(reqs[i].params.logprobs for i in rows)
    top_p, top_i = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    out = {}
    for row, i in enumerate(rows):
        n = reqs[i].params.logprobs
        top = list(zip(top_i[row, :n].tolist(), top_p[row, :n].tolist(), strict=True))
        out[i] = [Logprob(chosen[i], float(logp[row, chosen[i]]), top)]
    return out


def grammar_refuses(r: Request, token: int) -> str | None:
    """Feed a sampled token to the request's grammar: why it refused it, or None (also when there
    is no grammar). Any engine that samples under a matcher (ours, llama.cpp's) checks through this."""
    if r.matcher is None or r.matcher.consume_token(token):
        return None
    return f"the grammar refused a token: {r.matcher.get_error()}"


class PromptTooLong(ValueError):
    """A prompt that leaves no room to generate in the engine's context."""


def check_prompt(prompt: list[int], max_len: int) -> None:
    """What every engine refuses before it takes a request: no prompt, or one too long."""
    if not prompt:
        raise ValueError("an empty prompt: give at least one token")
    if len(prompt) >= max_len:
        raise PromptTooLong(f"a prompt of {len(prompt)} tokens does not fit this engine's {max_len}")


def take(r: Request, token: int, max_len: int, now: float) -> Event:
    """Append a sampled token to request `r`: the event to send, whose finish_reason says whether
    the request is done (a stop token or string, its max tokens, or the cache's end). Any engine
    that samples tokens (ours, llama.cpp's) streams and stops through this."""
    r.output.append(token)
    r.first_token = r.first_token or now
    text, stopped = r.stream.push(token) if r.stream is not None else ("", False)
    if stopped or token in r.params.stop_ids or (r.matcher is not None and r.matcher.is_stopped()):
        reason = "stop"
    elif len(r.output) >= r.params.max_new_tokens or r.length + 1 >= max_len:
        reason = "length"
    else:
        return Event(text, [token])
    tail = r.stream.flush() if r.stream is not None and not stopped else ""
    return Event(text + tail, [token], reason)


def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    params: SamplingParams,
    seed: int = 0,
    decode: Callable[[list[int]], str] | None = None,
    slots: int = 64,
) -> list[list[int]]:
    """The completion of each prompt: its sampled token ids, ending with the stop token when one
    was sampled (so a trainer can teach the model to stop). Prompt i samples with its own seed,
    (seed * 1_000_003 + i) mod 2**63, so that calls with nearby seeds share no streams. With
    `params.stop_strings`, `decode` (token ids -> text) tells when a completion's text contains
    one; the completion then stops after the token that completed it."""
    from dataclasses import replace

    max_len = max(map(len, prompts)) + params.max_new_tokens
    engine = Engine(model, decode if params.stop_strings else None, min(slots, len(prompts)), max_len)
    was_training = model.training
    model.eval()
    try:
        reqs = [
            engine.submit(Request(p, replace(params, seed=(seed * 1_000_003 + i) % 2**63)))
            for i, p in enumerate(prompts)
        ]
        while engine.step():
            pass
    finally:
        model.train(was_training)
    failed = [r for r in reqs if r.finish_reason == "error"]
    if failed:
        raise RuntimeError(f"generation failed: {failed[0].error}")
    return [r.output for r in reqs]
