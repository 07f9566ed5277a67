"""Group relative policy optimisation: sample a group of completions per prompt with our engine,
score them with verifiers, and push up the ones that beat their siblings.

    per prompt: G completions ─► rewards ─► advantages (r − group mean) / group std
    loss per completion token: clipped ratio π/π_old · A  (+ β · KL to the reference)

A step's completions are sampled from the model at the first step of its batch (seeded by step),
and reused for `updates_per_batch` optimizer steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from trulyopen.finetune.losses import RefLogps, group_advantages, grpo_token_losses, token_logps
from trulyopen.recipe import FinetuneConfig
from trulyopen.train.objectives import Micro, StepBatch, chunks, cycle, seed_of
from trulyopen.train.packing import IGNORE, Item, collate, pack_rows


@dataclass
class Prompt:
    ids: list[int]
    verifier: object  # a trulyopen.rewards.verifiers.Verifier


class GRPO:
    """Group relative policy optimisation with verifiable rewards."""

    name = "grpo"

    def __init__(
        self,
        cfg: FinetuneConfig,
        prompts: list[Prompt],
        val: list[Prompt],
        decode: Callable[[list[int]], str],  # completion tokens to text, for the verifiers
        stop_ids: tuple[int, ...],
        pad_id: int,
        reference: RefLogps | None,
    ):
        from trulyopen.infer.sampling import SamplingParams

        self.cfg, self.prompts, self.val, self.pad_id = cfg, prompts, val, pad_id
        self.decode, self.reference = decode, reference
        g = cfg.grpo
        self.params = SamplingParams(
            max_new_tokens=g.max_new_tokens,
            temperature=g.temperature,
            top_k=g.top_k,
            top_p=g.top_p,
            stop_ids=stop_ids,
        )
        self._cached: tuple[int, StepBatch] | None = None

    def _complete(
        self, model, prompts: list[Prompt], params, seed: int
    ) -> tuple[list[list[int]], list[float]]:
        from trulyopen.infer.engine import generate
        from trulyopen.rewards.verifiers import score_all

        completions = generate(model, [p.ids for p in prompts], params, seed=seed)
        stop = set(params.stop_ids)
        texts = [self.decode([t for t in c if t not in stop]) for c in completions]
        return completions, score_all([(p.verifier, t) for p, t in zip(prompts, texts, strict=True)])

    def batch(self, step: int, model: torch.nn.Module) -> StepBatch:
        u = self.cfg.grpo.updates_per_batch
        group = step // u
        if self._cached is not None and self._cached[0] == group:
            return self._cached[1]
        G, B, device = self.cfg.grpo.group_size, self.cfg.batch_size, next(model.parameters()).device
        chosen = [self.prompts[i] for i in cycle(len(self.prompts), self.cfg.seed, group * B, B)]
        asked = [p for p in chosen for _ in range(G)]
        completions, rewards = self._complete(model, asked, self.params, seed_of(self.cfg.seed, group))
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
        for chunk in chunks(list(range(len(items))), self.cfg.micro_batch_size):
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
            micros.append(Micro(b, extra, tokens=b.real_tokens))
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
