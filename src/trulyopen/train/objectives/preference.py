"""Learning from preferences: (chosen, rejected) replies to one prompt, or replies marked good or bad.

    dpo / ipo   pairs, against a reference's log-probabilities (computed once, cached)      per pair
    orpo        pairs, no reference: NLL on the chosen + λ · odds-ratio term                per pair
    simpo       pairs, no reference: length-normalised margin                              per pair
    kto         single replies marked desirable or not, against a reference                 per reply

A pair's two replies are packed together (chosen at even, rejected at odd item numbers), so one
forward pass gives both sequence log-probabilities. The losses are in train/losses.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trulyopen.recipe import FinetuneConfig
from trulyopen.train.losses import (
    RefLogps,
    dpo_losses,
    kto_kl,
    kto_losses,
    orpo_losses,
    per_item,
    simpo_losses,
    token_logps,
)
from trulyopen.train.objectives import Micro, StepBatch, Summed, chunks, cycle
from trulyopen.train.packing import IGNORE, Batch, Item, collate, pack_rows

Pair = tuple[Item, Item]


def packed(items: list[Item], seq_len: int, pad_id: int) -> Batch:
    return collate(
        items, pack_rows([len(i) for i in items], list(range(len(items))), seq_len), seq_len, pad_id
    )


def sequence_logps(model: torch.nn.Module, b: Batch, n: int, device: torch.device):
    """(Σ log π over each item's trained tokens, how many trained tokens) for items 0..n-1 of b."""
    logps = per_item(token_logps(model, b, device), b, n)
    counts = per_item((b.targets != IGNORE).float().to(device), b, n)
    return logps, counts


class Pairs(Summed):
    """What every pair objective shares: the step's pairs, packing, and validation; a subclass says
    what the losses of a micro-batch's pairs are (`pair_losses`)."""

    name = "pairs"

    def __init__(self, cfg: FinetuneConfig, pairs: list[Pair], val: list[Pair], pad_id: int):
        self.cfg, self.pairs, self.val, self.pad_id = cfg, pairs, val, pad_id

    def _packed(self, pairs: list[Pair]) -> Batch:
        return packed([it for pair in pairs for it in pair], self.cfg.seq_len, self.pad_id)

    def _logps(self, model, b: Batch, n: int, device):
        """(chosen Σ log π, rejected Σ log π, chosen tokens, rejected tokens) of n pairs."""
        logps, counts = sequence_logps(model, b, 2 * n, device)
        return logps[0::2], logps[1::2], counts[0::2], counts[1::2]

    def _extra(self, split: str, idx: list[int], pairs: list[Pair]) -> dict:
        return {"split": split, "idx": idx, "n": len(idx)}

    def pair_losses(self, model, b: Batch, extra: dict, device) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def batch(self, step: int, model: torch.nn.Module) -> StepBatch:
        idx = cycle(len(self.pairs), self.cfg.seed, step * self.cfg.batch_size, self.cfg.batch_size)
        step_pairs = [self.pairs[i] for i in idx]
        extra = self._extra("train", idx, step_pairs)
        micros = []
        for lo in range(0, len(idx), self.cfg.micro_batch_size):
            part = idx[lo : lo + self.cfg.micro_batch_size]
            b = self._packed([self.pairs[i] for i in part])
            micros.append(Micro(b, {**extra, "idx": part, "n": len(part)}, tokens=b.real_tokens))
        return StepBatch(micros, len(idx))

    def loss(self, model, micro: Micro, device) -> tuple[torch.Tensor, dict]:
        losses, stats = self.pair_losses(model, micro.batch, micro.extra, device)
        return losses.sum(), {"loss": losses.sum().item(), **{k: v.sum().item() for k, v in stats.items()}}

    @torch.no_grad()
    def validate(self, model, device) -> dict:
        if not self.val:
            return {}
        sums: dict[str, float] = {}
        extra = self._extra("val", list(range(len(self.val))), self.val)
        for part in chunks(list(range(len(self.val))), self.cfg.micro_batch_size):
            b = self._packed([self.val[i] for i in part])
            losses, stats = self.pair_losses(model, b, {**extra, "idx": part, "n": len(part)}, device)
            for k, v in {"loss": losses, **stats}.items():
                sums[f"val_{k}"] = sums.get(f"val_{k}", 0.0) + float(v.sum())
        return {k: v / len(self.val) for k, v in sums.items()}


def _reward_stats(rc: torch.Tensor, rr: torch.Tensor) -> dict:
    return {
        "reward_margin": rc - rr,
        "reward_accuracy": (rc > rr).float(),
        "reward_chosen": rc,
        "reward_rejected": rr,
    }


class DPO(Pairs):
    """Direct preference optimisation; the reference's log-probabilities are computed once and
    cached (full fine-tuning) or read from the base with the adapter switched off (LoRA)."""

    name = "dpo"

    def __init__(self, cfg: FinetuneConfig, pairs: list[Pair], val: list[Pair], pad_id: int, cache: Path):
        super().__init__(cfg, pairs, val, pad_id)
        self.cache = cache
        self.ref: dict[str, torch.Tensor] = {}

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
                logps = per_item(reference(b, device), b, 2 * len(chunk))
                c.append(logps[0::2].cpu())
                r.append(logps[1::2].cpu())
            out[f"{name}_chosen"] = torch.cat(c) if c else torch.zeros(0)
            out[f"{name}_rejected"] = torch.cat(r) if r else torch.zeros(0)
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache.with_name(self.cache.name + ".tmp")
        save_file(out, str(tmp))
        tmp.rename(self.cache)
        self.ref = out

    def pair_losses(self, model, b: Batch, extra: dict, device) -> tuple[torch.Tensor, dict]:
        c, r, nc, nr = self._logps(model, b, extra["n"], device)
        split, idx = extra["split"], extra["idx"]
        ref_c, ref_r = (
            self.ref[f"{split}_chosen"][idx].to(device),
            self.ref[f"{split}_rejected"][idx].to(device),
        )
        losses, rc, rr = dpo_losses(c, r, ref_c, ref_r, self.cfg.dpo.beta, self.cfg.dpo.loss, nc, nr)
        return losses, {**_reward_stats(rc, rr), "logp_chosen": c.detach(), "logp_rejected": r.detach()}


class ORPO(Pairs):
    """Odds-ratio preference optimisation: SFT on the chosen reply and a push of its odds over the
    rejected one's, in one loss with no reference model. The NLL is a token mean over the step's
    chosen replies (as TRL), so each micro-batch's NLL is scaled by pairs / the step's chosen tokens."""

    name = "orpo"

    def _extra(self, split: str, idx: list[int], pairs: list[Pair]) -> dict:
        chosen_tokens = sum(c.trained_tokens for c, _ in pairs)
        return {**super()._extra(split, idx, pairs), "nll_scale": len(pairs) / max(chosen_tokens, 1)}

    def pair_losses(self, model, b: Batch, extra: dict, device) -> tuple[torch.Tensor, dict]:
        c, r, nc, nr = self._logps(model, b, extra["n"], device)
        nll, odds, log_odds = orpo_losses(c, r, nc, nr, self.cfg.orpo.lam)
        nll = nll * extra["nll_scale"]
        return nll + odds, {"nll": nll.detach(), "odds_ratio_loss": odds.detach(), "log_odds": log_odds}


class SimPO(Pairs):
    """Simple preference optimisation: the length-normalised log-probability is the reward, and the
    chosen must beat the rejected by a margin; no reference model."""

    name = "simpo"

    def pair_losses(self, model, b: Batch, extra: dict, device) -> tuple[torch.Tensor, dict]:
        c, r, nc, nr = self._logps(model, b, extra["n"], device)
        s = self.cfg.simpo
        losses, rc, rr = simpo_losses(c, r, nc, nr, s.beta, s.gamma, s.label_smoothing)
        return losses, _reward_stats(rc, rr)


def with_completion_of(prompt_of: Item, reply_of: Item, seq_len: int) -> Item:
    """`prompt_of`'s prompt followed by `reply_of`'s reply (KTO's mismatched pair), cut to seq_len."""
    k = next(i for i, t in enumerate(prompt_of.targets) if t != IGNORE)  # prompt = inputs[: k + 1]
    j = next(i for i, t in enumerate(reply_of.targets) if t != IGNORE)
    inputs = prompt_of.inputs[: k + 1] + reply_of.inputs[j + 1 :]
    targets = prompt_of.targets[:k] + reply_of.targets[j:]
    return Item(inputs[:seq_len], targets[:seq_len])


class KTO(Summed):
    """Kahneman-Tversky optimisation on single replies marked desirable or undesirable. The
    reference point z0 is the policy's KL from the reference, estimated on mismatched pairs (each
    prompt with the reply before it in the micro-batch, as TRL)."""

    name = "kto"

    def __init__(
        self,
        cfg: FinetuneConfig,
        replies: list[tuple[Item, bool]],
        val: list[tuple[Item, bool]],
        pad_id: int,
        reference: RefLogps,
    ):
        self.cfg, self.replies, self.val, self.pad_id, self.reference = cfg, replies, val, pad_id, reference

    def _micro(self, replies: list[tuple[Item, bool]]) -> Micro:
        items = [it for it, _ in replies]
        mismatched = [with_completion_of(items[i], items[i - 1], self.cfg.seq_len) for i in range(len(items))]
        b = packed(items, self.cfg.seq_len, self.pad_id)
        extra = {
            "kl_batch": packed(mismatched, self.cfg.seq_len, self.pad_id),
            "desirable": torch.tensor([d for _, d in replies]),
        }
        return Micro(b, extra, tokens=b.real_tokens)

    def batch(self, step: int, model: torch.nn.Module) -> StepBatch:
        B = self.cfg.batch_size
        idx = cycle(len(self.replies), self.cfg.seed, step * B, B)
        micros = [
            self._micro([self.replies[i] for i in part]) for part in chunks(idx, self.cfg.micro_batch_size)
        ]
        return StepBatch(micros, len(idx))

    def _losses(self, model, micro: Micro, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, kl_b, n = micro.batch, micro.extra["kl_batch"], len(micro.extra["desirable"])
        logps = per_item(token_logps(model, b, device), b, n)
        ref = per_item(self.reference(b, device), b, n)
        with torch.no_grad():  # z0 carries no gradient
            kl = kto_kl(
                per_item(token_logps(model, kl_b, device), kl_b, n),
                per_item(self.reference(kl_b, device), kl_b, n),
            )
        k = self.cfg.kto
        losses, rewards = kto_losses(
            logps,
            ref,
            micro.extra["desirable"].to(device),
            kl,
            k.beta,
            k.desirable_weight,
            k.undesirable_weight,
        )
        return losses, rewards, kl

    def loss(self, model, micro: Micro, device) -> tuple[torch.Tensor, dict]:
        losses, rewards, kl = self._losses(model, micro, device)
        good = micro.extra["desirable"].to(device)
        return losses.sum(), {
            "loss": losses.sum().item(),
            "kl": float(kl) * len(losses),
            "reward_desirable": float((rewards * good).sum()),
            "reward_undesirable": float((rewards * ~good).sum()),
        }

    @torch.no_grad()
    def validate(self, model, device) -> dict:
        if not self.val:
            return {}
        total = 0.0
        for part in chunks(self.val, self.cfg.micro_batch_size):
            losses, _, _ = self._losses(model, self._micro(part), device)
            total += float(losses.sum())
        return {"val_loss": total / len(self.val)}
