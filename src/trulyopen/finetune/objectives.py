"""The three objectives the post-training loop can optimise; each says what a step's batch is and
what its loss is, and the loop (loop.py) does the rest the same way for all of them.

    sft    packed conversations; cross-entropy on assistant tokens            per trained token
    dpo    (chosen, rejected) pairs packed together; DPO or IPO loss against
           the reference's log-probabilities                                  per pair
    grpo   a group of sampled completions per prompt, scored by verifiers;
           clipped policy gradient with group-normalised advantages           per completion token

An objective's batch for step s is a pure function of (seed, s) and the model at that step, so a
resumed run sees exactly what an uninterrupted one does.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trulyopen.finetune.losses import dpo_losses, group_advantages, grpo_token_losses, per_item, token_logps
from trulyopen.finetune.packing import IGNORE, Batch, Item, RowPlan, collate, epoch_order, item_of, pack_rows
from trulyopen.finetune.records import Example
from trulyopen.finetune.render import ChatRenderer
from trulyopen.recipe import FinetuneConfig

RefLogps = Callable[[Batch, torch.device], torch.Tensor]


@dataclass
class Micro:
    batch: Batch
    extra: dict = field(default_factory=dict)  # what the loss needs beside the tokens


@dataclass
class StepBatch:
    micros: list[Micro]
    denominator: float  # the loss of the step is sum(micro losses) / denominator
    stats: dict = field(default_factory=dict)  # figures known before the forward passes (rewards...)


def _chunks(xs: list, n: int) -> list[list]:
    return [xs[i : i + n] for i in range(0, len(xs), n)]


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def _cycle(n: int, seed: int, first: int, count: int) -> list[int]:
    """Items first .. first+count-1 of the endless sequence of shuffled epochs of range(n)."""
    out = []
    for k in range(first, first + count):
        out.append(epoch_order(n, seed, k // n)[k % n])
    return out


class SFT:
    """Supervised fine-tuning on packed conversations."""

    def __init__(self, cfg: FinetuneConfig, items: list[Item], val: list[Item], pad_id: int):
        self.cfg, self.items, self.val, self.pad_id = cfg, items, val, pad_id
        self.plan = RowPlan(items, cfg.seq_len, cfg.seed)

    def batch(self, step: int, model: torch.nn.Module) -> StepBatch:
        rows = self.plan.rows(step * self.cfg.batch_size, self.cfg.batch_size)
        micros = [
            Micro(collate(self.items, r, self.cfg.seq_len, self.pad_id))
            for r in _chunks(rows, self.cfg.micro_batch_size)
        ]
        tokens = sum(m.batch.trained_tokens for m in micros)
        epoch = self.plan.epoch_of(step * self.cfg.batch_size)
        return StepBatch(micros, tokens, {"trained_tokens": tokens, "epoch": round(epoch, 4)})

    def loss(self, model: torch.nn.Module, micro: Micro, device: torch.device) -> tuple[torch.Tensor, dict]:
        nll = -token_logps(model, micro.batch, device).sum()
        return nll, {"loss": nll.item()}

    def summary(self, sums: dict, sb: StepBatch) -> dict:
        return {"loss": sums["loss"] / sb.denominator, **sb.stats}

    @torch.no_grad()
    def validate(self, model: torch.nn.Module, device: torch.device) -> dict:
        if not self.val:
            return {}
        rows = pack_rows([len(it) for it in self.val], list(range(len(self.val))), self.cfg.seq_len)
        total = tokens = 0.0
        for chunk in _chunks(rows, self.cfg.micro_batch_size):
            b = collate(self.val, chunk, self.cfg.seq_len, self.pad_id)
            total -= float(token_logps(model, b, device).sum())
            tokens += b.trained_tokens
        return {"val_loss": total / tokens}


class DPO:
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
            for chunk in _chunks(pairs, self.cfg.micro_batch_size):
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
        idx = _cycle(len(self.pairs), self.cfg.seed, step * self.cfg.batch_size, self.cfg.batch_size)
        micros = []
        for chunk in _chunks(idx, self.cfg.micro_batch_size):
            pairs = [self.pairs[i] for i in chunk]
            ref = (self.ref["train_chosen"][chunk], self.ref["train_rejected"][chunk])
            micros.append(Micro(self._packed(pairs), {"ref": ref, "n": len(pairs)}))
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


@dataclass
class Prompt:
    ids: list[int]
    verifier: object  # a trulyopen.rewards.verifiers.Verifier


class GRPO:
    """Group relative policy optimisation with verifiable rewards."""

    def __init__(
        self,
        cfg: FinetuneConfig,
        prompts: list[Prompt],
        val: list[Prompt],
        renderer: ChatRenderer,
        pad_id: int,
        reference: RefLogps | None,
    ):
        from trulyopen.infer.sampling import SamplingParams

        self.cfg, self.prompts, self.val, self.pad_id = cfg, prompts, val, pad_id
        self.renderer, self.reference = renderer, reference
        g = cfg.grpo
        self.params = SamplingParams(
            max_new_tokens=g.max_new_tokens,
            temperature=g.temperature,
            top_k=g.top_k,
            top_p=g.top_p,
            stop_ids=renderer.stop_ids(),
        )
        self._cached: tuple[int, StepBatch] | None = None

    def _complete(
        self, model, prompts: list[Prompt], params, seed: int
    ) -> tuple[list[list[int]], list[float]]:
        from trulyopen.infer.engine import generate
        from trulyopen.rewards.verifiers import score_all

        completions = generate(model, [p.ids for p in prompts], params, seed=seed)
        stop = set(params.stop_ids)
        texts = [self.renderer.tok.decode([t for t in c if t not in stop]) for c in completions]
        return completions, score_all([(p.verifier, t) for p, t in zip(prompts, texts, strict=True)])

    def batch(self, step: int, model: torch.nn.Module) -> StepBatch:
        u = self.cfg.grpo.updates_per_batch
        group = step // u
        if self._cached is not None and self._cached[0] == group:
            return self._cached[1]
        G, B, device = self.cfg.grpo.group_size, self.cfg.batch_size, next(model.parameters()).device
        chosen = [self.prompts[i] for i in _cycle(len(self.prompts), self.cfg.seed, group * B, B)]
        asked = [p for p in chosen for _ in range(G)]
        completions, rewards = self._complete(model, asked, self.params, _seed(self.cfg.seed, group))
        reward = torch.tensor(rewards)
        adv = group_advantages(reward, G)
        items = [
            Item(p.ids + c[:-1], [IGNORE] * (len(p.ids) - 1) + c)
            for p, c in zip(asked, completions, strict=True)
        ]
        too_long = [i for i, it in enumerate(items) if len(it) > self.cfg.seq_len]
        if too_long:
            raise ValueError(
                f"a prompt plus {self.cfg.grpo.max_new_tokens} new tokens exceeds finetune.seq_len"
            )
        micros = []
        for chunk in _chunks(list(range(len(items))), self.cfg.micro_batch_size):
            sub = [items[i] for i in chunk]
            b = collate(
                sub,
                pack_rows([len(i) for i in sub], list(range(len(sub))), self.cfg.seq_len),
                self.cfg.seq_len,
                self.pad_id,
            )
            extra = {"adv": adv[chunk]}
            with torch.no_grad():
                if u > 1:
                    extra["old"] = token_logps(model, b, device).cpu()
                if self.reference is not None:
                    extra["ref"] = self.reference(b, device).cpu()
            micros.append(Micro(b, extra))
        lengths = [len(c) for c in completions]
        stats = {
            "reward": reward.mean().item(),
            "reward_std": reward.view(-1, G).std(dim=1).mean().item(),
            "solved_groups": (reward.view(-1, G).max(dim=1).values > 0).float().mean().item(),
            "completion_tokens": sum(lengths) / len(lengths),
        }
        sb = StepBatch(micros, float(sum(lengths)), stats)
        self._cached = (group, sb)
        return sb

    def loss(self, model, micro: Micro, device) -> tuple[torch.Tensor, dict]:
        b = micro.batch
        logp = token_logps(model, b, device)
        trained = (b.targets != IGNORE).to(device)
        owner = b.owner.clamp(min=0).to(device)
        adv = micro.extra["adv"].to(device)[owner] * trained
        old = micro.extra["old"].to(device) if "old" in micro.extra else logp.detach()
        ref = micro.extra["ref"].to(device) if "ref" in micro.extra else None
        losses, kl, clipped = grpo_token_losses(
            logp, old, adv, self.cfg.grpo.clip_eps, ref, self.cfg.grpo.kl_coef
        )
        losses, kl, clipped = losses * trained, kl * trained, clipped & trained
        return losses.sum(), {
            "loss": losses.sum().item(),
            "kl": kl.sum().item(),
            "clipped": clipped.sum().item(),
        }

    def summary(self, sums: dict, sb: StepBatch) -> dict:
        return {**{k: v / sb.denominator for k, v in sums.items()}, **sb.stats}

    @torch.no_grad()
    def validate(self, model, device) -> dict:
        if not self.val:
            return {}
        from dataclasses import replace

        greedy = replace(self.params, temperature=0.0)
        _, rewards = self._complete(model, self.val, greedy, seed=0)
        return {"val_reward": sum(rewards) / len(rewards)}


def reference_logps(model: torch.nn.Module, frozen_copy: bool) -> RefLogps:
    """The reference policy's per-token log-probabilities: the base with the adapter switched off
    (LoRA), a frozen copy of the starting model (`frozen_copy`), or the model itself (for DPO's
    cache, computed before the first step, when the model still is the reference)."""
    if hasattr(model, "disable_adapter"):

        def off(b: Batch, device: torch.device) -> torch.Tensor:
            with torch.no_grad(), model.disable_adapter():
                return token_logps(model, b, device)

        return off
    ref = copy.deepcopy(model).eval().requires_grad_(False) if frozen_copy else model
    return lambda b, device: token_logps(ref, b, device)


def build_items(renderer: ChatRenderer, examples: list[Example], method: str, seq_len: int):
    """Tokenised items per example (None for one longer than seq_len) for the objective."""
    out = []
    for ex in examples:
        if method == "sft":
            it = item_of(renderer.conversation(ex.messages, ex.tools))
            out.append(it if len(it) <= seq_len else None)
        elif method == "dpo":
            pair = (
                item_of(renderer.reply(ex.messages, ex.chosen)),
                item_of(renderer.reply(ex.messages, ex.rejected)),
            )
            out.append(pair if max(len(pair[0]), len(pair[1])) <= seq_len else None)
        else:
            from trulyopen.rewards.verifiers import parse_verifier

            ids = renderer.prompt(ex.messages)
            out.append(Prompt(ids, parse_verifier(ex.verifier)) if len(ids) < seq_len else None)
    return out
