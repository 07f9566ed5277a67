"""How much of what a model writes it copied from its training data, measured with the trace index.

    held-out documents (the val shards) ─► prompts: `prompt_tokens` tokens at a seeded place
    model, greedy ─► `new_tokens` tokens each
    trace index ─► spans of each continuation found verbatim in training, at least `span` tokens
    share = continuation tokens inside such spans / all continuation tokens

The prompts come from documents the model never trained on, so a long verbatim span in a
continuation is recall of a training document, not of the prompt. 32 tokens is the length at which
work on memorisation (Carlini et al.; OLMo's model cards) starts to call a copy verbatim.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trulyopen.trace.spans import TraceOptions, Tracer


def held_out_prompts(shards_dir: Path, n: int, length: int, seed: int) -> list[list[int]]:
    """`n` prompts of `length` tokens from the val shards' documents (those long enough)."""
    from trulyopen.data.shards import read_documents

    meta = json.loads((shards_dir / "shards.json").read_text())
    docs = [
        doc
        for s in meta["splits"]["val"]["shards"]
        for doc in read_documents(shards_dir, s["name"], meta["dtype"])
        if len(doc) > length
    ]
    rng = random.Random(seed)
    out = []
    for _ in range(n if docs else 0):
        doc = docs[rng.randrange(len(docs))]
        at = rng.randrange(len(doc) - length)
        out.append([int(t) for t in doc[at : at + length]])
    return out


@torch.no_grad()
def memorisation(
    model: torch.nn.Module,
    tracer: Tracer,
    shards_dir: Path,
    prompts: int = 100,
    prompt_tokens: int = 32,
    new_tokens: int = 64,
    span: int = 32,
    seed: int = 0,
    examples: int = 3,
) -> dict[str, Any]:
    """The share of greedy continuation tokens inside verbatim training spans of >= `span` tokens."""
    from trulyopen.infer.engine import generate
    from trulyopen.infer.sampling import SamplingParams

    ids = held_out_prompts(shards_dir, prompts, prompt_tokens, seed)
    eot = tracer.meta["eot_id"]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, stop_ids=(eot,))
    outs = generate(model, ids, params, seed=seed, decode=tracer.tok.decode) if ids else []
    total, copied, found = 0, 0, []
    for prompt, out in zip(ids, outs, strict=True):
        text = tracer.tok.decode([t for t in out if t != eot])
        result = tracer.trace(text, TraceOptions(min_len=span, keep=1.0, docs_per_span=1, context_tokens=0))
        n = result["tokens"]
        inside = np.zeros(n, dtype=bool)
        for s in result["spans"]:
            inside[s["token_start"] : s["token_end"]] = True
        total += n
        copied += int(inside.sum())
        for s in result["spans"]:
            doc = s["docs"][0] if s["docs"] else {}
            found.append(
                {
                    "prompt": tracer.tok.decode(prompt),
                    "span": s["text"],
                    "tokens": s["length"],
                    "count": s["count"],
                    "doc": doc.get("id"),
                    "license": doc.get("license"),
                }
            )
    found.sort(key=lambda e: -e["tokens"])
    return {
        "prompts": len(ids),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "min_span_tokens": span,
        "generated_tokens": total,
        "tokens_in_spans": copied,
        "share": copied / total if total else 0.0,
        "continuations_with_a_span": len({e["prompt"] for e in found}),
        "examples": found[:examples],
    }
