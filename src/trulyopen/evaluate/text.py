"""Bits per byte on held-out text items, independent of the tokenizer.

Each text is scored from the end-of-text token on, in chunks of at most half the window, each
with as much of the preceding text as context as fits; the summed loss in bits is divided by the
text's UTF-8 bytes.
"""

from __future__ import annotations

import math

from trulyopen.evaluate.loglik import Request, score
from trulyopen.evaluate.stats import mean_and_stderr


def evaluate_text(model, tok, spec, instances: list, max_len: int) -> tuple[dict, list[dict]]:
    chunk = max(1, max_len // 2)
    requests, owner = [], []
    for n, inst in enumerate(instances):
        ids = tok(inst.text, add_special_tokens=False)["input_ids"]
        full = [tok.eos_token_id, *ids]
        for s in range(0, len(ids), chunk):
            piece = ids[s : s + chunk]
            requests.append(Request(full[: s + 1][-(max_len - len(piece)) :], [piece]))
            owner.append(n)
    nats = [0.0] * len(instances)
    for n, sc in zip(owner, score(model, requests, max_len), strict=True):
        nats[n] -= sc[0].logprob
    per_item = [
        nat / math.log(2) / max(len(i.text.encode("utf-8")), 1)
        for nat, i in zip(nats, instances, strict=True)
    ]
    total_bytes = sum(len(i.text.encode("utf-8")) for i in instances)
    records = [{"id": i.id, "bits_per_byte": b} for i, b in zip(instances, per_item, strict=True)]
    metrics = {
        "bits_per_byte": {**mean_and_stderr(per_item), "value": sum(nats) / math.log(2) / max(total_bytes, 1)}
    }
    return metrics, records
