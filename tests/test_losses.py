"""train/losses.py against TRL 1.16: each loss, on the same tensors (or the same tiny model and batch),
equals TRL's to 1e-5, and so do the gradients. TRL's losses are methods of trainers whose __init__
wants datasets and tokenizers, so each is called on a bare instance holding just the attributes the
method reads (`_bare`); where TRL needs a model, both sides run the same tiny Llama.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from tests.conftest import tiny_llama_config
from trulyopen.train.losses import (
    aggregate,
    bradley_terry_losses,
    generalized_jsd,
    grpo_advantages,
    informative_groups,
    kto_kl,
    kto_losses,
    orpo_losses,
    policy_token_losses,
    simpo_losses,
)

VOCAB = 64
ACCELERATOR = SimpleNamespace(  # one process on the CPU: gathers and reductions are the identity
    device=torch.device("cpu"),
    num_processes=1,
    process_index=0,
    sync_gradients=True,
    gather=lambda x: x,
    gather_for_metrics=lambda x: x,
    reduce=lambda x, reduction: x,
    unwrap_model=lambda m: m,
)


def _bare(cls, **attrs):
    """An instance of the TRL trainer `cls` without running its __init__, holding `attrs`."""
    trainer = object.__new__(cls)
    vars(trainer).update(
        accelerator=ACCELERATOR,
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        **attrs,
    )
    return trainer


def _tiny_lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(VOCAB)).train()


def _seq_logps(model, input_ids, attention_mask, completion_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log p over each row's completion tokens, how many) from the model's full logits."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    logp = logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = completion_mask[:, 1:].bool()
    return (logp * mask).sum(-1), mask.sum(-1)


def _assert_same(ours: torch.Tensor, theirs: torch.Tensor, params: list[torch.Tensor]) -> None:
    """The two losses agree to 1e-5, and so do their gradients with respect to `params`."""
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(theirs, params), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, VOCAB) for _ in range(n)]  # 0 is the padding


# ── KTO ─────────────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("kl_sign", [1.0, -1.0], ids=["kl-positive", "kl-clamped-to-0"])
def test_kto_matches_trl(kl_sign):
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference, KTOTrainer
    from trl.trainer.utils import add_fused_lm_head

    model = _tiny_lm()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits"))  # what KTOTrainer does
    rng = random.Random(1)
    labels = [True, True, False, True, False, False]
    completions = [_ids(rng, rng.randrange(2, 7)) for _ in labels]
    examples = [
        {
            "prompt_ids": _ids(rng, rng.randrange(1, 5)),
            "completion_ids": completions[i],
            "KL_completion_ids": completions[i - 1],  # the completion before it, as TRL pairs them
            "label": label,
        }
        for i, label in enumerate(labels)
    ]
    batch = DataCollatorForUnpairedPreference(pad_token_id=0)(examples)

    def logps(prefix: str) -> torch.Tensor:  # prefix "KL_": the mismatched pairs
        keys = ("input_ids", "attention_mask", "completion_mask")
        return _seq_logps(model, *(batch[prefix + k] for k in keys))[0]

    # reference log-probabilities that put the KL estimate on either side of 0
    batch["ref_KL_logps"] = logps("KL_").detach() - kl_sign * torch.rand(len(labels))
    batch["ref_logps"] = torch.randn(len(labels)) * 3 - 20

    beta, w_d, w_u = 0.3, 1.4, 0.6
    trainer = _bare(
        KTOTrainer,
        model=model,
        calculate_KL=True,
        precompute_ref_logps=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=w_d,
        undesirable_weight=w_u,
    )
    theirs = KTOTrainer._compute_loss(trainer, model, dict(batch), False)

    kl = kto_kl(logps("KL_"), batch["ref_KL_logps"])
    assert (kl > 0) == (kl_sign > 0)
    assert kl.item() == pytest.approx(trainer._metrics["train"]["kl"][0], abs=1e-5)
    policy = logps("")
    losses, rewards = kto_losses(policy, batch["ref_logps"], batch["label"], kl, beta, w_d, w_u)
    _assert_same(losses.mean(), theirs, list(model.parameters()))
    torch.testing.assert_close(rewards, beta * (policy - batch["ref_logps"]).detach())


# ── ORPO and SimPO: TRL's whole batch loss on the tiny model ────────────────────────────────────


def _pair_batch(prompt_len: int) -> dict[str, torch.Tensor]:
    """Five (prompt + chosen, prompt + rejected) pairs of different lengths, right-padded, in the
    layout of TRL's ORPO and CPO collators (labels are -100 on the prompt and the padding)."""
    rng = random.Random(2)
    rows: dict[str, list[list[int]]] = defaultdict(list)
    for _ in range(5):
        prompt = _ids(rng, prompt_len)
        for side in ("chosen", "rejected"):
            answer = _ids(rng, rng.randrange(2, 8))
            rows[f"{side}_input_ids"].append(prompt + answer)
            rows[f"{side}_attention_mask"].append([1] * (prompt_len + len(answer)))
            rows[f"{side}_labels"].append([-100] * prompt_len + answer)
    width = max(len(r) for r in rows["chosen_input_ids"] + rows["rejected_input_ids"])
    pad = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    return {
        key: torch.tensor([r + [pad[key.split("_", 1)[1]]] * (width - len(r)) for r in rs])
        for key, rs in rows.items()
    }


def _pair_logps(model, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """[chosen sum, rejected sum, chosen tokens, rejected tokens] over the completions."""
    out = {}
    for side in ("chosen", "rejected"):
        ids = batch[f"{side}_input_ids"]
        out[side] = _seq_logps(model, ids, batch[f"{side}_attention_mask"], batch[f"{side}_labels"] != -100)
    return [out["chosen"][0], out["rejected"][0], out["chosen"][1], out["rejected"][1]]


def test_orpo_matches_trl():
    """The whole ORPO loss (NLL + odds-ratio term) on the tiny model; a one-token prompt, since TRL's
    NLL covers the prompt too and a sequence's first token is never a target."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    model, batch, lam = _tiny_lm(), _pair_batch(prompt_len=1), 0.25
    trainer = _bare(ORPOTrainer, beta=lam, is_encoder_decoder=False, padding_value=0)
    theirs, metrics = ORPOTrainer.get_batch_loss_metrics(trainer, model, batch)

    chosen, rejected, n_chosen, n_rejected = _pair_logps(model, batch)
    nll, odds, log_odds = orpo_losses(chosen, rejected, n_chosen, n_rejected, lam)
    ours = nll.sum() / n_chosen.sum() + odds.mean()
    _assert_same(ours, theirs, list(model.parameters()))
    assert log_odds.mean().item() == pytest.approx(metrics["log_odds_chosen"], abs=1e-5)


def test_orpo_odds_term_matches_trl_near_certainty():
    """Average log-probabilities from -8 to -1e-4, where log(1 − eˣ) needs its accurate branch."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    torch.manual_seed(3)
    tokens = torch.randint(1, 20, (2, 64)).float()
    avg = -torch.logspace(-4, math.log10(8), 128)[torch.randperm(128)].view(2, 64)
    sums = (avg * tokens).requires_grad_()
    lam = 0.5
    _, odds, _ = orpo_losses(sums[0], sums[1], tokens[0], tokens[1], lam)
    trainer = _bare(ORPOTrainer, beta=lam)
    theirs, *_ = ORPOTrainer.odds_ratio_loss(trainer, sums[0] / tokens[0], sums[1] / tokens[1])
    _assert_same(odds.sum(), -theirs.sum(), [sums])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_matches_trl(label_smoothing):
    """TRL's CPO trainer with loss_type="simpo" and cpo_alpha=0 (no NLL term) is SimPO."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    model, batch = _tiny_lm(), _pair_batch(prompt_len=3)
    beta, gamma = 2.0, 0.7
    trainer = _bare(
        CPOTrainer,
        loss_type="simpo",
        beta=beta,
        simpo_gamma=gamma,
        cpo_alpha=0.0,
        alpha=0.0,
        label_smoothing=label_smoothing,
        is_encoder_decoder=False,
        pad_token_id=0,
    )
    theirs, metrics = CPOTrainer.get_batch_loss_metrics(trainer, model, batch)

    pair = _pair_logps(model, batch)
    losses, chosen_reward, rejected_reward = simpo_losses(*pair, beta, gamma, label_smoothing)
    _assert_same(losses.mean(), theirs, list(model.parameters()))
    assert chosen_reward.mean().item() == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert rejected_reward.mean().item() == pytest.approx(metrics["rewards/rejected"], abs=1e-5)


# ── Reward model ────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("with_margin", "center"), [(False, None), (True, None), (True, 0.01)], ids=["plain", "margin", "centred"]
)
def test_bradley_terry_matches_trl_reward_trainer(with_margin, center):
    from trl.trainer.reward_trainer import RewardTrainer

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_llama_config(VOCAB, num_labels=1, pad_token_id=0)).train()
    rng = random.Random(4)
    rows = [_ids(rng, rng.randrange(3, 10)) for _ in range(8)]  # 4 chosen, then their 4 rejected
    width = max(map(len, rows))
    inputs = {
        "input_ids": torch.tensor([r + [0] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
    }
    margin = torch.tensor([0.0, 0.5, 1.0, 2.0]) if with_margin else None
    if margin is not None:
        inputs["margin"] = margin
    trainer = _bare(RewardTrainer, model=model, args=SimpleNamespace(center_rewards_coefficient=center))
    theirs = RewardTrainer.compute_loss(trainer, model, dict(inputs))

    rewards = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.squeeze(-1)
    losses, diff = bradley_terry_losses(rewards[:4], rewards[4:], margin, center)
    _assert_same(losses.mean(), theirs, list(model.parameters()))
    assert (diff > 0).float().mean().item() == pytest.approx(trainer._metrics["train"]["accuracy"][0])


# ── Distillation ────────────────────────────────────────────────────────────────────────────────


def _logits_and_labels() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(5)
    student = (torch.randn(3, 7, VOCAB) * 2).requires_grad_()
    teacher = torch.randn(3, 7, VOCAB) * 3
    labels = torch.randint(0, VOCAB, (3, 7))
    labels[0, :2] = labels[1, 5:] = labels[2, :] = -100  # a prompt, padding, and a row with nothing to learn
    labels[2, 3] = 7
    return student, teacher, labels


@pytest.mark.parametrize(("beta", "temperature"), [(0.0, 1.0), (0.5, 1.0), (0.3, 2.0), (1.0, 0.7)])
def test_generalized_jsd_matches_trl_gkd(beta, temperature):
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    student, teacher, labels = _logits_and_labels()
    mask = labels != -100
    per_token = generalized_jsd(student, teacher, mask, beta, temperature)
    assert per_token[~mask].abs().sum() == 0 and (per_token[mask] > 0).all()
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=beta, temperature=temperature)
    _assert_same(per_token.sum() / mask.sum(), theirs, [student])


# ── GRPO and its variants ───────────────────────────────────────────────────────────────────────


def _rollout(seed: int) -> dict[str, torch.Tensor]:
    """Eight completions of up to 6 tokens with their policy, old-policy and reference log-probs:
    the old ones off by up to ±0.4 nats, so ratios fall outside the clip range on both sides."""
    torch.manual_seed(seed)
    b, t = 8, 6
    lengths = torch.tensor([6, 2, 5, 1, 6, 3, 4, 6])
    logp = -torch.rand(b, t) * 3
    return {
        "logp": logp,
        "old": logp + (torch.rand(b, t) - 0.5) * 0.8,
        "ref": logp + (torch.rand(b, t) - 0.5) * 0.6,
        "mask": (torch.arange(t) < lengths[:, None]).long(),
        "advantages": torch.randn(b),
    }


def _trl_grpo_loss(
    kind: str, kl_coef: float, r: dict, logp: torch.Tensor, rows: slice, max_len: int, micros: int
) -> tuple[torch.Tensor, dict]:
    """TRL's GRPOTrainer._compute_loss on the completions `rows` (one of `micros` micro-batches of
    the step), the model's log-probabilities replaced by `logp`'s rows."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    mask = r["mask"][rows]
    trainer = _bare(
        GRPOTrainer,
        model=SimpleNamespace(training=True),
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=micros),
        loss_type=kind,
        beta=kl_coef,
        epsilon_low=0.2,
        epsilon_high=0.28,
        max_completion_length=max_len,
        current_gradient_accumulation_steps=micros,
        importance_sampling_level="token",
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        use_vllm=False,
        _entropy_bonus_enabled=False,
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp[rows], torch.zeros(mask.shape), None),
    )
    inputs = {
        "prompt_ids": torch.ones(mask.shape[0], 2, dtype=torch.long),
        "prompt_mask": torch.ones(mask.shape[0], 2, dtype=torch.long),
        "completion_ids": torch.ones_like(mask),
        "completion_mask": mask,
        "advantages": r["advantages"][rows],
        "old_per_token_logps": r["old"][rows],
        "ref_per_token_logps": r["ref"][rows],
        "num_items_in_batch": r["mask"].sum(),  # the step's tokens (the generation batch is the step)
    }
    return GRPOTrainer._compute_loss(trainer, None, inputs), trainer._metrics["train"]


@pytest.mark.parametrize("kind", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.05], ids=["no-kl", "kl"])
def test_policy_losses_match_trl_grpo_in_two_micro_batches(kind, kl_coef):
    """A step of two micro-batches of four completions (TRL's are all the same size): TRL's
    per-micro losses (already scaled for accumulation) add up to Σ total / Σ count of `aggregate`,
    and the gradients agree. The halves hold 14 and 19 tokens, so bnpo's mean of per-micro token
    means is not dapo's token mean over the step."""
    r, max_len = _rollout(6), 8
    logp = r["logp"].clone().requires_grad_()
    halves = [slice(0, 4), slice(4, 8)]
    theirs = sum(_trl_grpo_loss(kind, kl_coef, r, logp, rows, max_len, micros=2)[0] for rows in halves)

    totals, counts = [], 0.0
    for rows in halves:
        ref = r["ref"][rows] if kl_coef else None
        token_losses, *_ = policy_token_losses(
            logp[rows], r["old"][rows], r["advantages"][rows], 0.2, 0.28, ref, kl_coef
        )
        total, count = aggregate(token_losses, r["mask"][rows], kind, max_len)
        totals.append(total)
        counts += count
    _assert_same(sum(totals) / counts, theirs, [logp])


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "dapo"])
def test_aggregate_does_not_depend_on_the_cut(kind):
    """Micro-batches of 3 and 5 completions (a packed loop's may differ in size) give the loss of the
    step taken whole."""
    r = _rollout(8)
    token_losses, *_ = policy_token_losses(r["logp"], r["old"], r["advantages"], 0.2, 0.28)
    whole, count = aggregate(token_losses, r["mask"], kind, 6)
    parts = [aggregate(token_losses[rows], r["mask"][rows], kind, 6) for rows in (slice(0, 3), slice(3, 8))]
    cut = sum(t for t, _ in parts) / sum(c for _, c in parts)
    assert cut.item() == pytest.approx((whole / count).item())


def test_policy_metrics_match_trl_and_both_clips_happen():
    r = _rollout(7)
    _, metrics = _trl_grpo_loss("grpo", 0.1, r, r["logp"], slice(None), 6, micros=1)
    _, kl, low, high = policy_token_losses(r["logp"], r["old"], r["advantages"], 0.2, 0.28, r["ref"], 0.1)
    m = r["mask"].bool()
    assert low[m].any() and high[m].any()
    assert kl[m].mean().item() == pytest.approx(metrics["kl"][0], abs=1e-6)
    assert low[m].float().mean().item() == pytest.approx(metrics["clip_ratio/low_mean"][0], abs=1e-6)
    assert high[m].float().mean().item() == pytest.approx(metrics["clip_ratio/high_mean"][0], abs=1e-6)


def test_clip_higher_keeps_the_gradient_of_a_token_growing_past_1_plus_eps_low():
    """DAPO's point: a ratio of 1.25 with A > 0 is clipped at ε = 0.2 (no gradient) but not at
    ε_high = 0.28, where the gradient is ratio · (−A)."""
    logp = torch.tensor([[math.log(1.25)]], requires_grad=True)
    old, adv = torch.zeros(1, 1), torch.tensor([2.0])
    symmetric, *_ = policy_token_losses(logp, old, adv, 0.2, 0.2)
    (grad,) = torch.autograd.grad(symmetric.sum(), logp)
    assert grad.item() == 0
    higher, *_ = policy_token_losses(logp, old, adv, 0.2, 0.28)
    (grad,) = torch.autograd.grad(higher.sum(), logp)
    assert grad.item() == pytest.approx(-1.25 * 2.0)


def test_aggregations_by_hand():
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # sequence means 2 and 4, over 2 sequences; 10 over the 4 tokens; over 2 × 5; over 4 tokens
    assert aggregate(losses, mask, "grpo") == (pytest.approx(2.0 + 4.0), 2.0)
    assert aggregate(losses, mask, "bnpo") == (pytest.approx(10 / 4), 1.0)
    assert aggregate(losses, mask, "dr_grpo", max_completion_length=5) == (pytest.approx(10.0), 10.0)
    assert aggregate(losses, mask, "dapo") == (pytest.approx(10.0), 4.0)
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate(losses, mask, "dr_grpo")
    with pytest.raises(ValueError, match="unknown loss aggregation 'gspo'"):
        aggregate(losses, mask, "gspo")


REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0]])


def test_advantages_by_hand():
    group = grpo_advantages(REWARDS, "group")
    # group 0: mean 1/2, unbiased std √(1/3); group 1: all equal, so 0; group 2: mean 3/4, std 3/2
    s0 = math.sqrt(1 / 3) + 1e-4
    torch.testing.assert_close(group[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / s0)
    torch.testing.assert_close(group[1], torch.zeros(4))
    torch.testing.assert_close(group[2], torch.tensor([-0.75, -0.75, -0.75, 2.25]) / 1.5001)
    # batch: group means, one std over all twelve rewards: Σx = 13, Σx² = 27, var = (27 − 13²/12) / 11
    batch = grpo_advantages(REWARDS, "batch")
    sb = math.sqrt((27 - 169 / 12) / 11) + 1e-4
    torch.testing.assert_close(batch[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / sb)
    torch.testing.assert_close(batch[2], torch.tensor([-0.75, -0.75, -0.75, 2.25]) / sb)
    # none (Dr. GRPO): only the group mean comes off
    torch.testing.assert_close(grpo_advantages(REWARDS, "none")[2], torch.tensor([-0.75, -0.75, -0.75, 2.25]))
    torch.testing.assert_close(grpo_advantages(torch.tensor([[3.0], [5.0]]), "group"), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="unknown reward scaling"):
        grpo_advantages(REWARDS, "rank")


def test_dynamic_sampling_keeps_groups_that_disagree():
    assert informative_groups(REWARDS).tolist() == [True, False, True]
    assert informative_groups(torch.tensor([[0.5], [1.0]])).tolist() == [False, False]
