"""Packing variable-length examples into fixed-length rows, so no compute goes to padding.

Each example becomes (inputs, targets): its tokens but the last, and the next token at each
position, with -100 (no loss) where the next token is not trained. Examples are laid one after
another in rows of `seq_len` positions, a new row starting when the next one does not fit:

    row 0   [ ex 3 ......... | ex 0 ...... | ex 7 ... | pad ]     segments  0 0 0 1 1 1 2 2 3
    row 1   [ ex 5 ............... | ex 1 .......... | pad  ]

Segment ids keep attention and positions inside each example (see train/attention.py), so an
example gives the same loss packed as alone. The order of examples is a pure function of (seed,
epoch), and rows are numbered across epochs, so the rows of any step can be rebuilt from the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trulyopen.train.attention import segment_attention

IGNORE = -100


@dataclass
class Item:
    """One example as the model sees it: its tokens but the last, and the next token at each
    position (IGNORE where that token is not trained)."""

    inputs: list[int]
    targets: list[int]  # IGNORE where not trained

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def trained_tokens(self) -> int:
        return sum(t != IGNORE for t in self.targets)


@dataclass
class Batch:
    """Rows of packed items; `owner` says which item each position belongs to (-1: padding)."""

    inputs: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T]
    segments: torch.Tensor  # [B, T]
    owner: torch.Tensor  # [B, T]

    def model_inputs(self, device: torch.device) -> dict:
        mask, positions = segment_attention(self.segments)
        return {
            "input_ids": self.inputs.to(device),
            "attention_mask": mask.to(device),
            "position_ids": positions.to(device),
        }

    @property
    def real_tokens(self) -> int:
        """Positions that hold an item's token (padding not counted)."""
        return int((self.owner >= 0).sum())

    @property
    def trained_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())


def pack_rows(lengths: list[int], order: list[int], seq_len: int) -> list[list[int]]:
    """Greedy packing in `order`: a list of rows, each a list of item indices."""
    rows: list[list[int]] = []
    used = seq_len  # forces a new row for the first item
    for i in order:
        if lengths[i] > seq_len:
            raise ValueError(f"item {i} has {lengths[i]} tokens, more than seq_len {seq_len}")
        if used + lengths[i] > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += lengths[i]
    return rows


def collate(items: list[Item], rows: list[list[int]], seq_len: int, pad_id: int) -> Batch:
    B = len(rows)
    inputs = torch.full((B, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    segments = torch.zeros((B, seq_len), dtype=torch.long)
    owner = torch.full((B, seq_len), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for seg, i in enumerate(row):
            n = len(items[i])
            inputs[b, at : at + n] = torch.tensor(items[i].inputs)
            targets[b, at : at + n] = torch.tensor(items[i].targets)
            segments[b, at : at + n] = seg
            owner[b, at : at + n] = i
            at += n
        segments[b, at:] = len(row)  # padding is a segment of its own
    return Batch(inputs, targets, segments, owner)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


class RowPlan:
    """The packed rows of every epoch, numbered globally: step s takes rows s*B .. s*B+B-1.
    (Each epoch packs in its own order, so epochs may hold different numbers of rows.)"""

    def __init__(self, items: list[Item], seq_len: int, seed: int):
        self.items, self.seq_len, self.seed = items, seq_len, seed
        self.lengths = [len(it) for it in items]
        self._epochs: list[list[list[int]]] = []

    def _epoch(self, epoch: int) -> list[list[int]]:
        while len(self._epochs) <= epoch:
            order = epoch_order(len(self.items), self.seed, len(self._epochs))
            self._epochs.append(pack_rows(self.lengths, order, self.seq_len))
        return self._epochs[epoch]

    def rows(self, first: int, count: int) -> list[list[int]]:
        out, epoch, start = [], 0, 0  # start: global number of the epoch's first row
        for r in range(first, first + count):
            while r >= start + len(self._epoch(epoch)):
                start += len(self._epoch(epoch))
                epoch += 1
            out.append(self._epoch(epoch)[r - start])
        return out

    def epoch_of(self, row: int) -> float:
        """How many epochs `row` is into the data (for progress lines)."""
        epoch, start = 0, 0
        while row >= start + len(self._epoch(epoch)):
            start += len(self._epoch(epoch))
            epoch += 1
        return epoch + (row - start) / len(self._epoch(epoch))
