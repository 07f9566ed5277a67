"""The losses of post-training, on packed batches: per-token log-probabilities, then per objective.

Every loss returns a sum (over tokens or pairs); the loop divides by the step's total, so the
gradient does not depend on how a step is cut into micro-batches.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F

from trulyopen.train.packing import IGNORE, Batch

RefLogps = Callable[[Batch, torch.device], torch.Tensor]


def token_logps(model: torch.nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """log p(target) at every position [B, T] in fp32; 0 where there is no target."""
    logits = model(**batch.model_inputs(device)).logits.float()
    targets = batch.targets.to(device)
    logp = -F.cross_entropy(logits.flatten(0, 1), targets.clamp(min=0).flatten(), reduction="none")
    return logp.view(targets.shape) * (targets != IGNORE)


def per_item(values: torch.Tensor, batch: Batch, n_items: int) -> torch.Tensor:
    """Sum of `values` [B, T] over each item's positions: a vector of n_items."""
    owner = batch.owner.to(values.device).flatten()
    keep = owner >= 0
    return torch.zeros(n_items, device=values.device, dtype=values.dtype).index_add(
        0, owner[keep], values.flatten()[keep]
    )


def dpo_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    kind: str,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen reward, rejected reward) from summed sequence log-probabilities.

    sigmoid: -log σ(β · [(log π_c − log π_ref,c) − (log π_r − log π_ref,r)])         (DPO)
    ipo:     ((Δ_c / n_c − Δ_r / n_r) − 1 / 2β)²  on log-ratios averaged per token    (IPO, as TRL)
    """
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif kind == "ipo":
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {kind!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def grpo_token_losses(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float,
    ref_logp: torch.Tensor | None,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per token, KL per token, clipped or not per token) of the clipped policy objective:

        ratio = π / π_old;   loss = −min(ratio · A, clip(ratio, 1 ± ε) · A) + kl_coef · KL(π ‖ π_ref)

    with the unbiased, positive KL estimate exp(ref − logp) − (ref − logp) − 1 (GRPO paper, k3)."""
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        diff = ref_logp - logp
        kl = torch.exp(diff) - diff - 1
        loss = loss + kl_coef * kl
    return loss, kl.detach(), (ratio.detach() - clipped.detach()).abs() > 0


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(r − mean of its group) / (std of its group + 1e-4): which completions beat their siblings."""
    r = rewards.view(-1, group_size)
    return ((r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + 1e-4)).flatten()


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
