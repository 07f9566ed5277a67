"""Sampling from a causal language model: batched, with a key-value cache, reproducible by seed.

    prompts (token ids) ─► left-pad into one batch ─► prefill: one forward over every prompt
        ─► decode loop: sample one token per row, feed it back with the cache, until each row
           has produced a stop token or max_new_tokens

Left padding puts every prompt's last token in the last column, so one step decodes all rows at
once; the attention mask hides the padding and position ids count only real tokens, so a prompt
gives the same logits alone or in a batch. GRPO samples its groups with this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 is greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()  # text that ends a completion (it is cut off, not returned)


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
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) > p.top_p  # keep the token that crosses top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    params: SamplingParams,
    seed: int = 0,
    pad_id: int = 0,
    decode=None,
) -> list[list[int]]:
    """The completion of each prompt: its sampled token ids, ending with the stop token when one
    was sampled (so a trainer can teach the model to stop). With `params.stop_strings`, `decode`
    (token ids -> text) tells when a completion's text contains one; the row then stops."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, L), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, L - len(p) :] = torch.tensor(p, device=device)
        mask[i, L - len(p) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    was_training = model.training
    model.eval()
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1]
    stop = torch.tensor(params.stop_ids or [-1], device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    completions: list[list[int]] = [[] for _ in range(B)]
    next_pos = positions[:, -1:] + 1
    for _ in range(params.max_new_tokens):
        token = sample_next(logits, params, generator)
        for i in torch.nonzero(~done).flatten().tolist():
            completions[i].append(int(token[i]))
            if params.stop_strings and any(s in decode(completions[i][-16:]) for s in params.stop_strings):
                done[i] = True  # (the last 16 tokens hold any stop string that just completed)
        done |= torch.isin(token, stop)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=next_pos,
            past_key_values=cache,
            use_cache=True,
        )
        cache, logits, next_pos = out.past_key_values, out.logits[:, -1], next_pos + 1
    model.train(was_training)
    return completions
