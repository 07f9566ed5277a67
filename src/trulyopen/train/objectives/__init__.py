"""Objectives: what a training step optimises. The loop (train/loop.py) is the same for all of them.

An objective is a small class with four methods:

    batch(step, model)          the step's micro-batches, every rank's: a pure function of (seed, step)
                                and of the model at that step, so a resumed run sees what an unbroken
                                one does, and the data of a step does not depend on the world size
    loss(model, micro, device)  (a SUM over the micro-batch's units, the stats to log as sums)
    summary(sums, step_batch)   the step's metrics from the stats summed over micro-batches and ranks
    validate(model, device)     held-out metrics

The loop divides each micro-batch's summed loss by the step's `denominator` (tokens, pairs,
sequences), so the gradient does not depend on how a step is cut into micro-batches or over ranks.

    objective        batch                                          loss per
    causal_lm        rows of the packed token shards (pretraining)  token
    sft              packed conversations, assistant tokens          trained token
    dpo / ipo        (chosen, rejected) pairs against a reference    pair
    kto              desirable / undesirable replies                 reply
    orpo / simpo     (chosen, rejected) pairs, no reference          pair
    reward           a scalar head on (chosen, rejected): Bradley-Terry   pair
    distill / gkd    the teacher's logits on data or on the student's samples   trained token
    grpo (dr_grpo, dapo)   sampled groups scored by verifiers            completion token
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from trulyopen.train.packing import epoch_order


@dataclass
class Micro:
    batch: Any  # what one forward pass takes: a packed Batch, or rows of tokens
    extra: dict = field(default_factory=dict)  # what the loss needs beside it
    tokens: int = 0  # tokens the forward pass really processes (padding not counted): for throughput
    weight: float = 1.0  # 0 for the filler pass a rank makes when it has no micro-batch left


@dataclass
class StepBatch:
    micros: list[Micro]
    denominator: float  # the loss of the step is sum(micro losses) / denominator
    stats: dict = field(default_factory=dict)  # figures known before the forward passes (rewards...)


class Objective(Protocol):
    name: str

    def batch(self, step: int, model: torch.nn.Module) -> StepBatch: ...

    def loss(
        self, model: torch.nn.Module, micro: Micro, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float]]: ...

    def summary(self, sums: dict[str, float], sb: StepBatch) -> dict: ...

    def validate(self, model: torch.nn.Module, device: torch.device) -> dict: ...


class Summed:
    """The usual summary, for an objective to inherit: every stat its micro-batches summed, divided
    by the step's denominator, then the figures its batch knew beforehand."""

    def summary(self, sums: dict[str, float], sb: StepBatch) -> dict:
        return {**{k: v / sb.denominator for k, v in sums.items()}, **sb.stats}


def chunks(xs: list, n: int) -> list[list]:
    return [xs[i : i + n] for i in range(0, len(xs), n)]


def seed_of(*parts: int) -> int:
    """A seed from integers (seed, step, ...) that does not depend on Python's hash randomisation."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def cycle(n: int, seed: int, first: int, count: int) -> list[int]:
    """Items first .. first+count-1 of the endless sequence of shuffled epochs of range(n)."""
    return [epoch_order(n, seed, k // n)[k % n] for k in range(first, first + count)]
