"""Bits per byte: the loss measured against the text's UTF-8 bytes instead of its tokens.

Nats per token depend on the tokenizer (a bigger vocabulary packs more text into each token), so
we divide the summed loss by the number of bytes the target tokens stand for, as nanochat and the
Pile papers do: models with different tokenizers become comparable. Special tokens (end of text)
stand for no bytes: their loss is not counted.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def token_bytes(tokenizer_file: Path) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens)."""
    from tokenizers import Tokenizer
    from tokenizers.pre_tokenizers import ByteLevel

    tok = Tokenizer.from_file(str(tokenizer_file))
    # byte-level BPE spells each byte as one printable character; invert that alphabet
    alphabet = {ch: 1 for ch in ByteLevel.alphabet()}
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    out = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    for piece, i in tok.get_vocab().items():
        if piece in special:
            continue
        if all(ch in alphabet for ch in piece):
            out[i] = len(piece)  # one character per byte
        else:
            out[i] = len(tok.decode([i]).encode("utf-8"))
    return out


@torch.no_grad()
def bits_per_byte(model: torch.nn.Module, batches: list[np.ndarray], nbytes: np.ndarray, autocast) -> float:
    """Bits per byte of `model` over rows of (seq_len + 1) tokens."""
    was_training = model.training
    model.eval()
    nats, total_bytes = 0.0, 0
    for rows in batches:
        x = torch.from_numpy(rows[:, :-1])
        y = torch.from_numpy(rows[:, 1:])
        with autocast():
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        weight = torch.from_numpy(nbytes)[y.flatten()]
        nats += float((loss * (weight > 0)).sum())
        total_bytes += int(weight.sum())
    model.train(was_training)
    return nats / math.log(2) / max(total_bytes, 1)
