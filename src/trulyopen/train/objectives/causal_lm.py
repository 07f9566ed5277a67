"""Causal language modelling on the packed token shards: the pretraining objective.

A step is `batch_seqs` rows of seq_len + 1 tokens chosen by the BatchPlan (a pure function of seed,
data fingerprint and step); micro-batches are consecutive rows, read from the memory-mapped shards
only by the rank that runs them. The loss is the mean cross-entropy over tokens (+ z-loss).

The cross-entropy is computed in fp32 a block of rows at a time, from logits in the model's dtype:
no fp32 copy of all the logits (B x T x vocabulary) is made, nor its log-softmax, nor their
gradients; the backward pass writes the logits' gradient directly (softmax - one-hot), once.

    logits [N, V] bf16 ──► per block of 32 rows: fp32 ─► log-sum-exp ─► loss_i = lse_i - logit_i[target_i]
    backward:              per block: exp(logits - lse) · g_i, minus g_i at the target ─► grad [N, V] bf16

With `pretrain.compile` the same sums are written plainly and torch.compile fuses them instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from trulyopen.train.attention import document_attention
from trulyopen.train.loader import BatchPlan
from trulyopen.train.objectives import Micro, StepBatch, Summed
from trulyopen.train.router_balance import RouterBalance

ROWS = 32  # rows of logits per fp32 block: 32 x a 32k vocabulary is 4 MB, about what a core's L2 holds


class _TokenCrossEntropy(torch.autograd.Function):
    """Per token: (cross-entropy, log-sum-exp), fp32, from logits [N, V] of any dtype, a block at a time."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for i in range(0, logits.shape[0], ROWS):
            lse[i : i + ROWS] = torch.logsumexp(logits[i : i + ROWS].float(), dim=-1)
        picked = logits.gather(1, targets[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, targets, lse)
        return lse - picked, lse

    @staticmethod
    def backward(ctx, g_ce: torch.Tensor, g_lse: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        g = g_ce if g_lse is None else g_ce + g_lse  # d(lse)/d(logits) = softmax, for both outputs
        grad = torch.empty_like(logits)
        for i in range(0, logits.shape[0], ROWS):
            # out of place: in fp32, .float() is the saved logits themselves
            block = (logits[i : i + ROWS].float() - lse[i : i + ROWS, None]).exp_()
            grad[i : i + ROWS] = block.mul_(g[i : i + ROWS, None])
        grad.scatter_add_(1, targets[:, None], -g_ce.to(grad.dtype)[:, None])  # the one-hot: cross-entropy's
        return grad, None


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, log-sum-exp) of each token [N], fp32, from logits [N, V] and targets [N]."""
    return _TokenCrossEntropy.apply(logits, targets)


def _plain_token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same sums as plain operations: what torch.compile fuses into one pass forward, one backward."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    return lse - logits.gather(1, targets[:, None]).squeeze(1), lse


PerToken = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def compiled_cross_entropy() -> PerToken:
    """token_cross_entropy's sums compiled by torch.compile (once per process)."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(_plain_token_cross_entropy))
    return _COMPILED[0]


_COMPILED: list[PerToken] = []


def lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, z_loss: float, per_token: PerToken = token_cross_entropy
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to optimise, cross-entropy alone), both means over tokens, in fp32 for stability."""
    ce_tokens, lse = per_token(logits.flatten(0, 1), targets.flatten())
    ce = ce_tokens.mean()
    if z_loss:
        return ce + z_loss * lse.pow(2).mean(), ce
    return ce, ce


class CausalLM(Summed):
    name = "causal_lm"

    def __init__(
        self,
        plan: BatchPlan,
        micro_batch_size: int,
        z_loss: float = 0.0,
        eot_id: int | None = None,  # with it, attention stays inside each packed document
        validate: Callable[[torch.nn.Module], dict] | None = None,  # held-out metrics (bits per byte...)
        compile: bool = False,  # the loss too, beside the model (pretrain.compile)
        router_balance: RouterBalance | None = None,  # a mixture of experts' load-balancing loss
    ):
        self.plan, self.micro, self.z_loss, self.eot_id = plan, micro_batch_size, z_loss, eot_id
        self.router_balance = router_balance
        self._validate = validate
        self.per_token = compiled_cross_entropy() if compile else token_cross_entropy

    def batch(self, step: int, model: torch.nn.Module) -> StepBatch:
        n, per_row = self.plan.batch, self.plan.seq_len
        micros = [
            Micro((step, lo, min(lo + self.micro, n)), tokens=(min(lo + self.micro, n) - lo) * per_row)
            for lo in range(0, n, self.micro)
        ]
        return StepBatch(micros, n, {"tokens_seen": (step + 1) * n * per_row})

    def loss(self, model: torch.nn.Module, micro: Micro, device: torch.device) -> tuple[torch.Tensor, dict]:
        step, lo, hi = micro.batch
        rows = torch.from_numpy(self.plan.batch_tokens(step, lo, hi))
        x, y = rows[:, :-1].to(device), rows[:, 1:].to(device)
        if self.router_balance:
            self.router_balance.start()
        if self.eot_id is not None:
            mask, positions = document_attention(x, self.eot_id)
            logits = model(input_ids=x, attention_mask=mask, position_ids=positions).logits
        else:
            logits = model(input_ids=x).logits
        loss, ce = lm_loss(logits, y, self.z_loss, self.per_token)
        stats = {"loss": ce.item() * len(rows)}  # sums over rows: the loop divides
        if self.router_balance:
            weighted, aux = self.router_balance.loss()  # (aux: experts per token when uniform)
            loss, stats["router_aux"] = loss + weighted, aux * len(rows)
        return loss * len(rows), stats

    @torch.no_grad()
    def validate(self, model: torch.nn.Module, device: torch.device) -> dict:
        return self._validate(model) if self._validate else {}
