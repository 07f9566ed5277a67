"""Distillation: the student learns the teacher's whole next-token distribution, not just its
sampled token, on the data's replies or on its own samples (on-policy, GKD: Agarwal et al. 2024).

    conversation (data)  or  prompt + student's sample (with probability lmbda, on-policy)
        ─► student logits, teacher logits (frozen, no gradient)
        ─► generalised JSD per trained token (β = 0: forward KL(teacher ‖ student))

A step's choice between data and samples, and the samples themselves, are seeded by (seed, step),
so a resumed run makes the same choice. Teacher and student must share a tokenizer: the stage
refuses a teacher whose vocabulary differs.
"""

from __future__ import annotations

import random

import torch

from trulyopen.recipe import FinetuneConfig
from trulyopen.train.losses import generalized_jsd
from trulyopen.train.objectives import Micro, StepBatch, Summed, chunks, cycle, seed_of
from trulyopen.train.packing import IGNORE, Batch, Item, collate, pack_rows


class Distill(Summed):
    name = "distill"

    def __init__(
        self,
        cfg: FinetuneConfig,
        items: list[tuple[Item, list[int]]],  # (the conversation, the prompt of its last reply)
        val: list[tuple[Item, list[int]]],
        pad_id: int,
        teacher: torch.nn.Module,
        stop_ids: tuple[int, ...],
    ):
        self.cfg, self.items, self.val, self.pad_id, self.teacher = cfg, items, val, pad_id, teacher
        self.teacher.eval().requires_grad_(False)
        self.stop_ids = stop_ids

    def _sampled(self, model: torch.nn.Module, prompts: list[list[int]], seed: int) -> list[Item]:
        """The student's own replies to the prompts (on-policy), as items trained on the reply."""
        from trulyopen.infer.engine import generate
        from trulyopen.infer.sampling import SamplingParams

        d = self.cfg.distill
        room = min(d.max_new_tokens, self.cfg.seq_len + 1 - max(len(p) for p in prompts))
        params = SamplingParams(max_new_tokens=max(room, 1), temperature=1.0, stop_ids=self.stop_ids)
        was_training = model.training
        model.eval()
        replies = generate(model, prompts, params, seed=seed)
        model.train(was_training)
        return [Item(p + r[:-1], [IGNORE] * (len(p) - 1) + r) for p, r in zip(prompts, replies, strict=True)]

    def _batch_of(self, items: list[Item]) -> Batch:
        rows = pack_rows([len(i) for i in items], list(range(len(items))), self.cfg.seq_len)
        return collate(items, rows, self.cfg.seq_len, self.pad_id)

    def batch(self, step: int, model: torch.nn.Module) -> StepBatch:
        B = self.cfg.batch_size
        chosen = [self.items[i] for i in cycle(len(self.items), self.cfg.seed, step * B, B)]
        on_policy = random.Random(seed_of(self.cfg.seed, step)).random() < self.cfg.distill.lmbda
        if on_policy:
            items = self._sampled(model, [p for _, p in chosen], seed_of(self.cfg.seed, step, 1))
        else:
            items = [it for it, _ in chosen]
        micros = []
        for part in chunks(items, self.cfg.micro_batch_size):
            b = self._batch_of(part)
            micros.append(Micro(b, tokens=b.real_tokens))
        tokens = sum(m.batch.trained_tokens for m in micros)
        return StepBatch(micros, tokens, {"on_policy": float(on_policy), "trained_tokens": tokens})

    def _divergence(self, model, b: Batch, device) -> torch.Tensor:
        inputs = b.model_inputs(device)
        student = model(**inputs).logits.float()
        with torch.no_grad():
            teacher = self.teacher(**inputs).logits.float()
        mask = (b.targets != IGNORE).to(device)
        d = self.cfg.distill
        return generalized_jsd(student, teacher, mask, d.beta, d.temperature).sum()

    def loss(self, model, micro: Micro, device) -> tuple[torch.Tensor, dict]:
        loss = self._divergence(model, micro.batch, device)
        return loss, {"loss": loss.item()}

    @torch.no_grad()
    def validate(self, model, device) -> dict:
        if not self.val:
            return {}
        total = tokens = 0.0
        for part in chunks([it for it, _ in self.val], self.cfg.micro_batch_size):
            b = self._batch_of(part)
            total += float(self._divergence(model, b, device))
            tokens += b.trained_tokens
        return {"val_loss": total / max(tokens, 1)}
