"""Supervised fine-tuning: packed conversations, cross-entropy on the assistant's tokens only.

A step is `batch_size` packed rows of the RowPlan (rows of every epoch numbered globally, so a step's
rows are a pure function of seed and step); the loss is the mean over the step's trained tokens.
"""

from __future__ import annotations

import torch

from trulyopen.recipe import FinetuneConfig
from trulyopen.train.losses import token_logps
from trulyopen.train.objectives import Micro, StepBatch, Summed, chunks
from trulyopen.train.packing import Batch, Item, RowPlan, collate, pack_rows


class SFT(Summed):
    name = "sft"

    def __init__(self, cfg: FinetuneConfig, items: list[Item], val: list[Item], pad_id: int):
        self.items, self.val, self.seq_len, self.pad_id = items, val, cfg.seq_len, pad_id
        self.batch_size, self.micro = cfg.batch_size, cfg.micro_batch_size
        self.plan = RowPlan(items, cfg.seq_len, cfg.seed)

    def _micro(self, items: list[Item], rows: list[list[int]]) -> Micro:
        b = collate(items, rows, self.seq_len, self.pad_id)
        return Micro(b, tokens=b.real_tokens)

    def batch(self, step: int, model: torch.nn.Module) -> StepBatch:
        rows = self.plan.rows(step * self.batch_size, self.batch_size)
        micros = [self._micro(self.items, r) for r in chunks(rows, self.micro)]
        tokens = sum(m.batch.trained_tokens for m in micros)
        epoch = self.plan.epoch_of(step * self.batch_size)
        return StepBatch(micros, tokens, {"trained_tokens": tokens, "epoch": round(epoch, 4)})

    def loss(self, model: torch.nn.Module, micro: Micro, device: torch.device) -> tuple[torch.Tensor, dict]:
        nll = -token_logps(model, micro.batch, device).sum()
        return nll, {"loss": nll.item()}

    @torch.no_grad()
    def validate(self, model: torch.nn.Module, device: torch.device) -> dict:
        if not self.val:
            return {}
        total = tokens = 0.0
        for b in self.val_batches():
            total -= float(token_logps(model, b, device).sum())
            tokens += b.trained_tokens
        return {"val_loss": total / tokens}

    def val_batches(self) -> list[Batch]:
        rows = pack_rows([len(it) for it in self.val], list(range(len(self.val))), self.seq_len)
        return [collate(self.val, chunk, self.seq_len, self.pad_id) for chunk in chunks(rows, self.micro)]
