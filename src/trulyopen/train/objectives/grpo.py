"""Group relative policy optimisation: sample a group of completions per prompt with our engine,
score them (verifiers, and a reward model if given), and push up the ones that beat their siblings.

    per prompt: G completions ─► rewards ─► advantages  A = (r − group mean) [/ std]
    (DAPO dynamic sampling: groups whose rewards are all equal carry no gradient; they are dropped
     and more prompts sampled, up to MAX_ROUNDS times)
    loss per completion token: −min(ρ · A, clip(ρ, 1 − ε_low, 1 + ε_high) · A)  (+ β · KL to the reference)
    the step's loss, by loss_type:   grpo     mean per completion, then mean over completions
                                     dr_grpo  Σ tokens / (completions × max_new_tokens)   (Dr. GRPO)
                                     dapo     mean over every completion token of the step

With `tools`, a rollout is a conversation with a Python environment: when a completion ends in a
<tool_call> of `python`, the code runs in the sandbox, the tool turn (its output) is appended as
context, and the model goes on. The tool turn's tokens are never trained (masked out of the loss).

A step's completions are sampled from the model at the first step of its batch (seeded by step),
and reused for `updates_per_batch` optimizer steps. Each completion is its own row (no packing), so
the per-completion means of loss_type grpo are row means.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from trulyopen.recipe import FinetuneConfig
from trulyopen.train.losses import (
    RefLogps,
    aggregate,
    grpo_advantages,
    informative_groups,
    policy_token_losses,
    token_logps,
)
from trulyopen.train.objectives import Micro, StepBatch, chunks, cycle, seed_of
from trulyopen.train.packing import IGNORE, Item, collate

MAX_ROUNDS = 4  # dynamic sampling: batches of prompts sampled at most, to fill a step with informative groups
TOOL_TIMEOUT_S = 5.0
TOOL_OUTPUT_CHARS = 500


@dataclass
class Prompt:
    ids: list[int]
    verifier: object  # a trulyopen.rewards.verifiers.Verifier


@dataclass
class Rollout:
    tokens: list[int] = field(default_factory=list)  # everything after the prompt
    trained: list[bool] = field(default_factory=list)  # False on the environment's tool turns
    answer: str = ""  # the text of the last model turn: what the verifier reads
    tool_calls: int = 0


class GRPO:
    """Group relative policy optimisation with verifiable rewards (and its variants)."""

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
        tool_turn: Callable[[str], list[int]] | None = None,  # a tool's output as the turn's tokens
        reward_model: Callable[[list[list[int]]], list[float]] | None = None,
    ):
        from trulyopen.infer.sampling import SamplingParams

        self.cfg, self.prompts, self.val, self.pad_id = cfg, prompts, val, pad_id
        self.decode, self.reference, self.tool_turn, self.reward_model = (
            decode,
            reference,
            tool_turn,
            reward_model,
        )
        g = cfg.grpo
        self.params = SamplingParams(
            max_new_tokens=g.max_new_tokens,
            temperature=g.temperature,
            top_k=g.top_k,
            top_p=g.top_p,
            stop_ids=stop_ids,
            stop_strings=("</tool_call>",) if g.tools else (),
        )
        self._cached: tuple[int, StepBatch] | None = None

    # ── rollouts ────────────────────────────────────────────────────────────────────────────────

    def rollout(self, model, prompts: list[Prompt], params, seed: int) -> list[Rollout]:
        """Each prompt's completion; with tools, turns of model and sandbox until the model answers
        without a call (or has made max_tool_calls)."""
        from trulyopen.infer.engine import generate

        outs = [Rollout() for _ in prompts]
        active = list(range(len(prompts)))
        for turn in range(self.cfg.grpo.max_tool_calls + 1):
            if not active:
                break
            contexts = [prompts[i].ids + outs[i].tokens for i in active]
            room = self.cfg.seq_len + 1 - max(len(c) for c in contexts)
            if room < 1:
                break
            p = replace(params, max_new_tokens=min(params.max_new_tokens, room))
            made = generate(model, contexts, p, seed=seed_of(seed, turn), decode=self.decode)
            still = []
            for i, new in zip(active, made, strict=True):
                r = outs[i]
                r.tokens += new
                r.trained += [True] * len(new)
                r.answer = self.decode([t for t in new if t not in params.stop_ids])
                code = self._python_call(r.answer) if self.cfg.grpo.tools else None
                if code is not None and turn < self.cfg.grpo.max_tool_calls:
                    output = self._run(code)
                    turn_ids = self.tool_turn(output)
                    r.tokens += turn_ids
                    r.trained += [False] * len(turn_ids)
                    r.tool_calls += 1
                    still.append(i)
            active = still
        return outs

    @staticmethod
    def _python_call(text: str) -> str | None:
        """The code of a completed `python` tool call at the end of a turn, if there is one."""
        from trulyopen.infer.tool_calls import parse_calls

        if not text.rstrip().endswith("</tool_call>"):
            return None
        _, calls = parse_calls(text)
        if not calls or calls[-1][0] != "python" or not isinstance(calls[-1][1].get("code"), str):
            return None
        return calls[-1][1]["code"]

    @staticmethod
    def _run(code: str) -> str:
        from trulyopen.rewards.sandbox import run_python

        result = run_python(code, timeout_s=TOOL_TIMEOUT_S, max_output=TOOL_OUTPUT_CHARS)
        return result.stdout if result.ok else f"{result.stdout}{result.reason}"

    def _score(self, prompts: list[Prompt], rollouts: list[Rollout]) -> list[float]:
        from trulyopen.rewards.verifiers import score_all

        rewards = score_all([(p.verifier, r.answer) for p, r in zip(prompts, rollouts, strict=True)])
        if self.reward_model is not None:
            learned = self.reward_model([p.ids + r.tokens for p, r in zip(prompts, rollouts, strict=True)])
            w = self.cfg.grpo.reward_model_weight
            rewards = [a + w * b for a, b in zip(rewards, learned, strict=True)]
        return rewards

    # ── the objective ───────────────────────────────────────────────────────────────────────────

    def batch(self, step: int, model: torch.nn.Module) -> StepBatch:
        g, B = self.cfg.grpo, self.cfg.batch_size
        group = step // g.updates_per_batch
        if self._cached is not None and self._cached[0] == group:
            return self._cached[1]
        G, device = g.group_size, next(model.parameters()).device
        kept_prompts, kept_rollouts, kept_rewards, seen, dropped = [], [], [], [], 0
        for rnd in range(MAX_ROUNDS if g.dynamic_sampling else 1):
            first = (group * MAX_ROUNDS + rnd) * B
            asked = [
                self.prompts[i] for i in cycle(len(self.prompts), self.cfg.seed, first, B) for _ in range(G)
            ]
            rollouts = self.rollout(model, asked, self.params, seed_of(self.cfg.seed, group, rnd))
            rewards = torch.tensor(self._score(asked, rollouts)).view(-1, G)
            seen.append(rewards)
            keep = (
                informative_groups(rewards)
                if g.dynamic_sampling
                else torch.ones(len(rewards), dtype=torch.bool)
            )
            dropped += int((~keep).sum())
            for k in keep.nonzero().flatten().tolist():
                if len(kept_rewards) < B:
                    kept_prompts += asked[k * G : (k + 1) * G]
                    kept_rollouts += rollouts[k * G : (k + 1) * G]
                    kept_rewards.append(rewards[k])
            if len(kept_rewards) == B:
                break
        if not kept_rewards:  # every group scored alike: train on the first batch (all advantages 0)
            kept_prompts, kept_rollouts = asked, rollouts
            kept_rewards = list(seen[-1])
        reward = torch.stack(kept_rewards)
        adv = grpo_advantages(reward, g.scale_rewards).flatten()
        items = []
        for p, r in zip(kept_prompts, kept_rollouts, strict=True):
            targets = [t if keep else IGNORE for t, keep in zip(r.tokens, r.trained, strict=True)]
            items.append(Item(p.ids + r.tokens[:-1], [IGNORE] * (len(p.ids) - 1) + targets))
        if any(len(it) > self.cfg.seq_len for it in items):
            raise ValueError(f"a prompt plus {g.max_new_tokens} new tokens exceeds finetune.seq_len")
        micros = []
        for part in chunks(list(range(len(items))), self.cfg.micro_batch_size):
            b = collate(
                [items[i] for i in part], [[i] for i in range(len(part))], self.cfg.seq_len, self.pad_id
            )
            extra = {"adv": adv[part]}
            with torch.no_grad():
                if g.updates_per_batch > 1:
                    extra["old"] = token_logps(model, b, device).cpu()
                if self.reference is not None:
                    extra["ref"] = self.reference(b, device).cpu()
            micros.append(Micro(b, extra, tokens=b.real_tokens))
        trained = [sum(r.trained) for r in kept_rollouts]
        denominator = {
            "grpo": len(items),
            "dr_grpo": len(items) * g.max_new_tokens,
            "dapo": sum(trained),
        }[g.loss_type]
        all_rewards = torch.cat(seen)
        stats = {
            "reward": all_rewards.mean().item(),
            "reward_std": all_rewards.std(dim=1).mean().item() if G > 1 else 0.0,
            "solved_groups": (all_rewards.max(dim=1).values > 0).float().mean().item(),
            "completion_tokens": sum(trained) / len(trained),
        }
        if g.dynamic_sampling:
            stats["dropped_groups"] = dropped
        if g.tools:
            stats["tool_calls"] = sum(r.tool_calls for r in kept_rollouts) / len(kept_rollouts)
        sb = StepBatch(micros, float(max(denominator, 1)), stats)
        self._cached = (group, sb)
        return sb

    def loss(self, model, micro: Micro, device) -> tuple[torch.Tensor, dict]:
        b, g = micro.batch, self.cfg.grpo
        logp = token_logps(model, b, device)
        mask = (b.targets != IGNORE).to(device)
        old = micro.extra["old"].to(device) if "old" in micro.extra else logp.detach()
        ref = micro.extra["ref"].to(device) if "ref" in micro.extra else None
        eps_high = g.epsilon_high if g.epsilon_high is not None else g.clip_eps
        losses, kl, low, high = policy_token_losses(
            logp, old, micro.extra["adv"].to(device), g.clip_eps, eps_high, ref, g.kl_coef
        )
        total, _ = aggregate(losses, mask, "dapo" if g.loss_type == "dr_grpo" else g.loss_type)
        return total, {
            "loss": total.item(),
            "kl": float((kl * mask).sum()),
            "clipped": float(((low | high) & mask).sum()),
            "tokens": float(mask.sum()),
        }

    def summary(self, sums: dict, sb: StepBatch) -> dict:
        tokens = max(sums["tokens"], 1.0)
        return {
            "loss": sums["loss"] / sb.denominator,
            "kl": sums["kl"] / tokens,
            "clipped": sums["clipped"] / tokens,
            **sb.stats,
        }

    @torch.no_grad()
    def validate(self, model, device) -> dict:
        if not self.val:
            return {}
        greedy = replace(self.params, temperature=0.0)
        rollouts = self.rollout(model, self.val, greedy, seed=0)
        rewards = self._score(self.val, rollouts)
        return {"val_reward": sum(rewards) / len(rewards)}
