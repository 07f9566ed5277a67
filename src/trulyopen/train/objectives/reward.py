"""A reward model: the language model with a scalar head, trained on (chosen, rejected) pairs so
that the chosen reply scores higher (Bradley-Terry), then used as a GRPO reward beside the verifiers.

    tokens of prompt + reply ─► backbone ─► hidden state of the reply's last token ─► score head ─► r
    loss per pair: −log σ(r_chosen − r_rejected) (+ coef · (r_chosen + r_rejected)²)

The model is transformers' *ForSequenceClassification of the base architecture (num_labels 1); the
score is read at each packed item's last position, so pairs pack like every other objective's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trulyopen.train.losses import bradley_terry_losses
from trulyopen.train.objectives.preference import Pairs, packed
from trulyopen.train.packing import IGNORE, Batch, Item


def rewards_of(model: torch.nn.Module, b: Batch, n: int, device: torch.device) -> torch.Tensor:
    """The score of items 0..n-1 of a packed batch: the head on each item's last hidden state."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a peft adapter
    hidden = getattr(m, m.base_model_prefix)(**b.model_inputs(device)).last_hidden_state
    scores = m.score(hidden).squeeze(-1).float().flatten()
    owner = b.owner.to(device).flatten()
    keep = owner >= 0
    where = torch.arange(owner.numel(), device=device)
    last = torch.full((n,), -1, device=device).scatter_reduce(0, owner[keep], where[keep], "amax")
    return scores[last]


class RewardModel(Pairs):
    name = "reward"

    def pair_losses(self, model, b: Batch, extra: dict, device) -> tuple[torch.Tensor, dict]:
        r = rewards_of(model, b, 2 * extra["n"], device)
        losses, margin = bradley_terry_losses(
            r[0::2], r[1::2], center_rewards_coefficient=self.cfg.reward.center_rewards_coefficient
        )
        return losses, {"reward_margin": margin, "reward_accuracy": (margin > 0).float()}


class RewardScorer:
    """A trained reward model (a checkpoint of finetune method reward, or a Hugging Face sequence
    classifier with one label) scoring whole sequences, for GRPO."""

    def __init__(self, path: str | Path, device: torch.device, pad_id: int):
        from transformers import AutoModelForSequenceClassification

        from trulyopen.locate import loading

        with loading(str(path), "reward model", "finetune.grpo.reward_model"):
            self.model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1)
        self.model.to(device).eval().requires_grad_(False)
        self.device, self.pad_id = device, pad_id

    @torch.no_grad()
    def __call__(self, sequences: list[list[int]], micro: int = 8) -> list[float]:
        out = []
        for lo in range(0, len(sequences), micro):
            items = [Item(s, [IGNORE] * len(s)) for s in sequences[lo : lo + micro]]
            b = packed(items, max(len(i) for i in items), self.pad_id)
            out += rewards_of(self.model, b, len(items), self.device).tolist()
        return out
