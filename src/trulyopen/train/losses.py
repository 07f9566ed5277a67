"""The losses of training, as pure functions of tensors: log-probabilities (summed per sequence, or
per token) or logits in; losses per example or per token out, with the figures worth logging. Each
post-training loss matches TRL 1.16 to 1e-5 (tests/test_losses.py and test_finetune.py compute both).

No function here averages over its batch. The loop sums what a micro-batch returns, adds the
micro-batches of a step, and divides once by the step's count, so the gradient does not depend on
how a step is cut:

    loss                      per        the step's sum is divided by
    token_logps (SFT: −Σ)     token      trained tokens
    dpo_losses                pair       pairs
    kto_losses                example    examples (desirable and undesirable together)
    orpo_losses   nll         pair       chosen tokens
                  odds        pair       pairs
    simpo_losses              pair       pairs
    bradley_terry_losses      pair       pairs
    generalized_jsd           token      trained tokens (mask.sum())
    policy_token_losses       token      `aggregate` says: it returns (total, count) per micro-batch,
                                         and the step's loss is Σ total / Σ count

`logps` of a sequence is Σ_t log π(y_t | x, y_<t) over a completion's tokens (token_logps, then
per_item) and `tokens` how many there were; the length-normalised losses (ORPO, SimPO) divide here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from trulyopen.train.packing import IGNORE, Batch

RefLogps = Callable[[Batch, torch.device], torch.Tensor]

# ── Log-probabilities of packed batches, and the reference policy's ─────────────────────────────


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


# ── Paired preferences with a reference ────────────────────────────────────────────────────────


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


# ── Unpaired preferences ────────────────────────────────────────────────────────────────────────


def kto_kl(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z₀ = max(0, mean over mismatched pairs of log π(y'|x) − log π_ref(y'|x)).

    y' is another example's completion under x (TRL pairs each prompt with the completion before it
    in the batch), so z₀ estimates KL(π ‖ π_ref) without favouring any one answer. It is detached:
    no gradient flows through the reference point, so the policy's pass over the mismatched pairs
    may run under no_grad. TRL takes the mean over a device's micro-batch (gathered across ranks);
    the loop may as well take it over the whole step's pairs."""
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_losses(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per example, reward per example) of KTO (Ethayarajh et al. 2024, eq. 7), with
    r = log π(y|x) − log π_ref(y|x) and z₀ = `kto_kl(...)`:

        desirable y:     λ_D · (1 − σ(β · (r − z₀)))
        undesirable y:   λ_U · (1 − σ(β · (z₀ − r)))

    `desirable` is a bool per example; the reward logged is β · r."""
    ratio = logps - ref_logps
    loss = torch.where(
        desirable.bool(),
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )
    return loss, beta * ratio.detach()


# ── Paired preferences without a reference model ────────────────────────────────────────────────


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, accurate at both ends (Mächler 2012: split at −ln 2, as TRL does)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_losses(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(NLL per pair, odds-ratio loss per pair, log odds ratio per pair) of ORPO (Hong et al. 2024).

    On the average per-token log-probabilities c and r of the chosen and rejected completions,
    odds(y) = p / (1 − p), so

        log_odds = (c − r) − (log(1 − eᶜ) − log(1 − eʳ))
        loss     = NLL(chosen) − λ · log σ(log_odds)

    The NLL is returned as −chosen_logps, a sum over the chosen tokens: the step divides it by the
    chosen tokens, and the odds term by the pairs (TRL takes the token mean of one and the pair
    mean of the other). TRL's λ is its `beta`; TRL's NLL also covers the prompt's tokens."""
    c = chosen_logps / chosen_tokens.clamp(min=1)
    r = rejected_logps / rejected_tokens.clamp(min=1)
    log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
    return -chosen_logps, -lam * F.logsigmoid(log_odds), log_odds.detach()


def simpo_losses(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen reward, rejected reward) of SimPO (Meng et al. 2024): the reward is the
    length-normalised log-probability β · (log π(y|x) / |y|), no reference model, and the chosen
    must beat the rejected by a margin γ:

        loss = −log σ(β · (c − r) − γ)        c, r: average per-token log-probabilities

    with label smoothing ε: (1 − ε) · that + ε · (−log σ(−(β · (c − r) − γ))), as TRL's CPO trainer."""
    c = chosen_logps / chosen_tokens.clamp(min=1)
    r = rejected_logps / rejected_tokens.clamp(min=1)
    z = beta * (c - r) - gamma
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return loss, beta * c.detach(), beta * r.detach()


# ── Reward model ────────────────────────────────────────────────────────────────────────────────


def bradley_terry_losses(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per pair, r_c − r_r per pair) of a Bradley–Terry reward model: the probability that the
    chosen is preferred is σ(r_c − r_r), so

        loss = −log σ(r_c − r_r − margin) + coef · (r_c + r_r)²

    The margin (per pair, optional) asks for a wider gap where annotators were surer (Llama 2); the
    second term (Eisenstein et al. 2023) keeps rewards centred on zero, since the first sees only
    differences."""
    diff = chosen_rewards - rejected_rewards
    loss = -F.logsigmoid(diff if margin is None else diff - margin)
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return loss, diff.detach()


# ── Distillation ────────────────────────────────────────────────────────────────────────────────


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ_v p · (log p − log q) over the last axis, from log-probabilities."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The generalised Jensen–Shannon divergence of GKD (Agarwal et al. 2024, eq. 1) per token [B, T],
    0 where `mask` is False; divide the step's sum by its trained tokens (TRL's "batchmean" with labels).
    β = 0 is forward KL(teacher ‖ student): mass-covering, the student is pushed to put mass wherever
    the teacher does. Not scaled by τ² (Hinton et al. scale it; TRL's GKD trainer does not):

        m   = β · p_t + (1 − β) · p_s
        JSD = β · KL(p_t ‖ m) + (1 − β) · KL(p_s ‖ m)

    At β = 0 TRL takes it to be forward KL(p_t ‖ p_s) and at β = 1 reverse KL(p_s ‖ p_t)
    (the formula itself goes to 0 at both ends), and so does this."""
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = _kl(t, s)
    elif beta == 1:
        jsd = _kl(s, t)
    else:
        m = torch.logsumexp(torch.stack([s + math.log1p(-beta), t + math.log(beta)]), dim=0)
        jsd = beta * _kl(t, m) + (1 - beta) * _kl(s, m)
    return torch.where(mask.bool(), jsd, 0.0)


# ── GRPO and its variants ───────────────────────────────────────────────────────────────────────
#
#   rewards [groups × G] ─► grpo_advantages ─► A per completion
#   log π, log π_old, log π_ref per token ─► policy_token_losses ─► loss per token
#   loss per token, completion mask ─► aggregate ─► (total, count) per micro-batch; Σ total / Σ count


def grpo_advantages(rewards: torch.Tensor, scale: str = "group") -> torch.Tensor:
    """A = r − mean of its group, divided by (std + 1e-4) where std is, by `scale`:

        "group"   the group's std (GRPO)
        "batch"   the std of every reward in the batch (a steadier scale; TRL's scale_rewards="batch")
        "none"    no division (Dr. GRPO: dividing by a small std over-weights groups that barely differ)

    `rewards` is [groups, G]; the result has its shape. Stds are unbiased (n − 1), as TRL's; a
    single completion per group has std 0."""
    mean = rewards.mean(dim=1, keepdim=True)
    if scale == "none":
        return rewards - mean
    if scale == "group":
        std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    elif scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
    else:
        raise ValueError(f"unknown reward scaling {scale!r} (group, batch or none)")
    return (rewards - mean) / (std + 1e-4)


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """DAPO's dynamic sampling: True for each group [groups, G] whose rewards are not all equal.
    A group whose completions all scored the same has zero advantage everywhere, so it adds no
    gradient, only dilutes the batch: the sampler drops it and samples more prompts."""
    return (rewards != rewards[:, :1]).any(dim=1)


def policy_token_losses(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, KL, clipped low, clipped high) per token [B, T] of the clipped policy objective:

        ratio = π / π_old
        loss  = −min(ratio · A, clip(ratio, 1 − ε_low, 1 + ε_high) · A) + kl_coef · KL(π ‖ π_ref)

    ε_high > ε_low is DAPO's clip-higher: room for unlikely tokens to grow, against entropy collapse.
    KL is the k3 estimate exp(ref − logp) − (ref − logp) − 1 (unbiased, never negative), 0 without a
    reference. `advantages` is per completion [B] or per token [B, T]. A token is clipped low when
    ratio < 1 − ε_low with A < 0, high when ratio > 1 + ε_high with A > 0 (where the clip cuts the
    gradient): the fractions TRL logs."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        diff = ref_logp - logp
        kl = torch.exp(diff) - diff - 1
        loss = loss + kl_coef * kl
    low = (ratio < 1 - epsilon_low) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return loss, kl.detach(), low.detach(), high.detach()


def aggregate(
    token_losses: torch.Tensor,
    mask: torch.Tensor,
    kind: str,
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, float]:
    """(total, count) of a micro-batch's per-token losses [B, T] over its completion `mask`; the step's
    loss is Σ total / Σ count over its micro-batches. By `kind`, as TRL's GRPO `loss_type`:

        kind     total                               count              the step's loss
        grpo     Σ_seq (mean over its tokens)        sequences          mean over sequences of their
                                                                        token means (long answers
                                                                        weigh less per token)
        bnpo     Σ_tokens / the micro's tokens       1                  mean over micro-batches of their
                                                                        token means (depends on the cut,
                                                                        as TRL's does)
        dr_grpo  Σ_tokens                            sequences × max_completion_length     (Dr. GRPO)
        dapo     Σ_tokens                            tokens             token mean over the whole step

    TRL divides grpo and dr_grpo per micro-batch and then by the accumulation steps: the same when
    micro-batches are the same size (TRL's always are); here each sequence weighs the same even
    when they are not."""
    m = mask.to(token_losses.dtype)
    summed = token_losses * m
    if kind == "grpo":
        return (summed.sum(-1) / m.sum(-1).clamp(min=1)).sum(), float(m.shape[0])
    if kind == "bnpo":
        return summed.sum() / m.sum().clamp(min=1), 1.0
    if kind == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("dr_grpo needs max_completion_length")
        return summed.sum(), float(m.shape[0] * max_completion_length)
    if kind == "dapo":
        return summed.sum(), float(m.sum())
    raise ValueError(f"unknown loss aggregation {kind!r} (grpo, bnpo, dr_grpo or dapo)")
