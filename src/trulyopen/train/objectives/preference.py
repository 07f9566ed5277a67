"""Learning from preferences: (chosen, rejected) replies to one prompt.

    dpo / ipo   against a reference policy's log-probabilities (computed once, cached)     per pair

A pair's two replies are packed together (chosen at even, rejected at odd item numbers), so one
forward pass gives both sequence log-probabilities.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trulyopen.finetune.losses import RefLogps, dpo_losses, per_item, token_logps
from trulyopen.recipe import FinetuneConfig
from trulyopen.train.objectives import Micro, StepBatch, chunks, cycle
from trulyopen.train.packing import IGNORE, Batch, Item, collate, pack_rows


class DPO:
    name = "dpo"

    """Direct preference optimisation; the reference's log-probabilities are computed once and
    cached (full fine-tuning) or read from the base with the adapter switched off (LoRA)."""

    def __init__(
        self,
        cfg: FinetuneConfig,
        pairs: list[tuple[Item, Item]],
        val: list[tuple[Item, Item]],
        pad_id: int,
        cache: Path,
    ):
        self.cfg, self.pairs, self.val, self.pad_id, self.cache = cfg, pairs, val, pad_id, cache
        self.ref: dict[str, torch.Tensor] = {}

    def _packed(self, pairs: list[tuple[Item, Item]]) -> Batch:
        items = [it for pair in pairs for it in pair]  # chosen 0, rejected 0, chosen 1, ...
        return collate(
            items,
            pack_rows([len(i) for i in items], list(range(len(items))), self.cfg.seq_len),
            self.cfg.seq_len,
            self.pad_id,
        )

    @staticmethod
    def _split(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return values[0::2], values[1::2]

    @torch.no_grad()
    def prepare(self, reference: RefLogps, device: torch.device) -> None:
        """Reference log-probabilities of every pair (train and val), computed once into a file."""
        from safetensors.torch import load_file, save_file

        if self.cache.exists():
            self.ref = load_file(str(self.cache))
            return
        out = {}
        for name, pairs in (("train", self.pairs), ("val", self.val)):
            c, r = [], []
            for chunk in chunks(pairs, self.cfg.micro_batch_size):
                b = self._packed(chunk)
                lc, lr = self._split(per_item(reference(b, device), b, 2 * len(chunk)))
                c.append(lc.cpu())
                r.append(lr.cpu())
            out[f"{name}_chosen"] = torch.cat(c) if c else torch.zeros(0)
            out[f"{name}_rejected"] = torch.cat(r) if r else torch.zeros(0)
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache.with_name(self.cache.name + ".tmp")
        save_file(out, str(tmp))
        tmp.rename(self.cache)
        self.ref = out

    def batch(self, step: int, model: torch.nn.Module) -> StepBatch:
        idx = cycle(len(self.pairs), self.cfg.seed, step * self.cfg.batch_size, self.cfg.batch_size)
        micros = []
        for chunk in chunks(idx, self.cfg.micro_batch_size):
            pairs = [self.pairs[i] for i in chunk]
            ref = (self.ref["train_chosen"][chunk], self.ref["train_rejected"][chunk])
            b = self._packed(pairs)
            micros.append(Micro(b, {"ref": ref, "n": len(pairs)}, tokens=b.real_tokens))
        return StepBatch(micros, len(idx))

    def _pair_losses(self, model, b: Batch, ref, n, device):
        logps = per_item(token_logps(model, b, device), b, 2 * n)
        counts = per_item((b.targets != IGNORE).float().to(device), b, 2 * n)
        c, r = self._split(logps)
        nc, nr = self._split(counts)
        losses, rc, rr = dpo_losses(
            c, r, ref[0].to(device), ref[1].to(device), self.cfg.dpo.beta, self.cfg.dpo.loss, nc, nr
        )
        return losses, rc, rr, c.detach(), r.detach()

    def loss(self, model, micro: Micro, device) -> tuple[torch.Tensor, dict]:
        losses, rc, rr, c, r = self._pair_losses(
            model, micro.batch, micro.extra["ref"], micro.extra["n"], device
        )
        stats = {
            "loss": losses.sum().item(),
            "reward_margin": (rc - rr).sum().item(),
            "reward_accuracy": (rc > rr).float().sum().item(),
            "reward_chosen": rc.sum().item(),
            "reward_rejected": rr.sum().item(),
            "logp_chosen": c.sum().item(),
            "logp_rejected": r.sum().item(),
        }
        return losses.sum(), stats

    def summary(self, sums: dict, sb: StepBatch) -> dict:
        return {k: v / sb.denominator for k, v in sums.items()}

    @torch.no_grad()
    def validate(self, model, device) -> dict:
        if not self.val:
            return {}
        sums = {"val_loss": 0.0, "val_reward_margin": 0.0, "val_reward_accuracy": 0.0}
        for start in range(0, len(self.val), self.cfg.micro_batch_size):
            chunk = list(range(start, min(start + self.cfg.micro_batch_size, len(self.val))))
            b = self._packed([self.val[i] for i in chunk])
            ref = (self.ref["val_chosen"][chunk], self.ref["val_rejected"][chunk])
            losses, rc, rr, _, _ = self._pair_losses(model, b, ref, len(chunk), device)
            sums["val_loss"] += losses.sum().item()
            sums["val_reward_margin"] += (rc - rr).sum().item()
            sums["val_reward_accuracy"] += (rc > rr).float().sum().item()
        return {k: v / len(self.val) for k, v in sums.items()}
