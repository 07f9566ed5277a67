"""Choosing the next token: greedy, or sampled with temperature, top-k and top-p; a repetition
penalty; and one random generator per request, so a request's text depends on its seed only, not
on which other requests share its batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 is greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 makes tokens already in the prompt or output less likely
    stop_ids: tuple[int, ...] = ()  # tokens that end a completion (kept in its token ids)
    stop_strings: tuple[str, ...] = ()  # text that ends a completion (cut off, not returned)
    seed: int | None = None  # None: drawn at random
    # None: no log-probabilities; k: each sampled token's, and the k most likely tokens' (OpenAI's
    # top_logprobs), from the model's own distribution (before temperature, top-k/p and penalty)
    logprobs: int | None = None


def penalise(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The CTRL paper's penalty, as transformers applies it: a seen token's positive logit is
    divided by the penalty, a negative one multiplied."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    return logits.scatter(-1, seen, torch.where(picked > 0, picked / penalty, picked * penalty))


def sample_next(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of `logits` [B, V]: greedy at temperature 0, else top-k / top-p sampling."""
    if p.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > p.top_p  # keep the token that crosses top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
