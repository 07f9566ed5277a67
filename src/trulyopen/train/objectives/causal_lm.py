"""Causal language modelling on the packed token shards: the pretraining objective.

A step is `batch_seqs` rows of seq_len + 1 tokens chosen by the BatchPlan (a pure function of seed,
data fingerprint and step); micro-batches are consecutive rows, read from the memory-mapped shards
only by the rank that runs them. The loss is the mean cross-entropy over tokens (+ z-loss).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from trulyopen.train.attention import document_attention
from trulyopen.train.loader import BatchPlan
from trulyopen.train.objectives import Micro, StepBatch, Summed


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to optimise, cross-entropy alone), both means over tokens; logits in fp32 for stability."""
    logits = logits.float().flatten(0, 1)
    ce = F.cross_entropy(logits, targets.flatten())
    if z_loss:
        return ce + z_loss * torch.logsumexp(logits, dim=-1).pow(2).mean(), ce
    return ce, ce


class CausalLM(Summed):
    name = "causal_lm"

    def __init__(
        self,
        plan: BatchPlan,
        micro_batch_size: int,
        z_loss: float = 0.0,
        eot_id: int | None = None,  # with it, attention stays inside each packed document
        validate: Callable[[torch.nn.Module], dict] | None = None,  # held-out metrics (bits per byte...)
    ):
        self.plan, self.micro, self.z_loss, self.eot_id = plan, micro_batch_size, z_loss, eot_id
        self._validate = validate

    def batch(self, step: int, model: torch.nn.Module) -> StepBatch:
        n, per_row = self.plan.batch, self.plan.seq_len
        micros = [
            Micro((step, lo, min(lo + self.micro, n)), tokens=(min(lo + self.micro, n) - lo) * per_row)
            for lo in range(0, n, self.micro)
        ]
        return StepBatch(micros, n, {"tokens_seen": (step + 1) * n * per_row})

    def loss(self, model: torch.nn.Module, micro: Micro, device: torch.device) -> tuple[torch.Tensor, dict]:
        step, lo, hi = micro.batch
        rows = torch.from_numpy(self.plan.batch_tokens(step, lo, hi))
        x, y = rows[:, :-1].to(device), rows[:, 1:].to(device)
        if self.eot_id is not None:
            mask, positions = document_attention(x, self.eot_id)
            logits = model(input_ids=x, attention_mask=mask, position_ids=positions).logits
        else:
            logits = model(input_ids=x).logits
        loss, ce = lm_loss(logits, y, self.z_loss)
        return loss * len(rows), {"loss": ce.item() * len(rows)}  # sums over rows: the loop divides

    @torch.no_grad()
    def validate(self, model: torch.nn.Module, device: torch.device) -> dict:
        return self._validate(model) if self._validate else {}
