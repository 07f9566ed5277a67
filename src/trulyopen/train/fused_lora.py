"""LoRA's forward and backward as one autograd function, for training on a CPU.

peft computes an adapted Linear as separate modules, each its own pass over memory:

    y = W x  +  s * B (A (dropout(x)))          peft: base, dropout, A, B, scale, add
                                                each a full pass over an M x in or M x out tensor

On a CPU those passes, not the rank-16 products, are what LoRA costs: on a 2-core EPYC one adapted
8,192 x 512 -> 1,536 layer took 65-94 ms forward and backward against 28 ms for its base matmuls
alone. Here the same arithmetic is arranged so that the big tensors are touched as few times as the
math allows, with the scale and the add folded into the GEMM (addmm's alpha and its output):

    forward    xd = dropout(x)                            the same mask peft would draw (FastDropout's)
               h  = xd A^T                                M x r
               y  = x W^T  ;  y += s * h B^T              one addmm into the base's output
    backward   gh = s * g B                               M x r
               gB = s * g^T h ,  gA = gh^T xd             r-wide: small
               gx = (gh A) * mask  ;  gx += g W           one addmm into the adapter's input gradient

That measured 38 ms for the layer above. The parameters, the state dict, checkpoints, merging and
export are peft's: only the forward of each adapted Linear changes, and only while training a plain
LoRA (one adapter, no DoRA or other variant, no bias in the adapter, an unquantised frozen base);
anything else takes peft's own forward. Installed on the CPU, where the dropout mask is
`cpu_dropout`'s; a run draws the same masks, in the same order, as with peft's forward.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import torch

from trulyopen.train.cpu_dropout import LANES, dropout_mask, keep_scale


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling: float, drop: int, site: int):  # noqa: ANN001, ANN205
        flat = x.reshape(-1, x.shape[-1])
        if drop:
            keep = dropout_mask(flat, drop, site)
            dropped = flat.mul(keep_scale(drop)).mul_(keep)  # FastDropout's arithmetic
        else:
            keep, dropped = None, flat
        h = dropped @ a.t()
        y = flat @ weight.t() if bias is None else torch.addmm(bias, flat, weight.t())
        y.addmm_(h, b.t(), alpha=scaling)
        ctx.save_for_backward(weight, a, b, dropped, h, keep)
        ctx.scaling, ctx.drop, ctx.shape = scaling, drop, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        weight, a, b, dropped, h, keep = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gh = (g @ b).mul_(ctx.scaling)
        grad_b = (g.t() @ h).mul_(ctx.scaling) if ctx.needs_input_grad[4] else None
        grad_a = gh.t() @ dropped if ctx.needs_input_grad[3] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = gh @ a
            if keep is not None:  # the mask's backward, in the order autograd does FastDropout's
                grad_x.mul_(keep).mul_(keep_scale(ctx.drop))
            grad_x = grad_x.addmm_(g, weight).view(ctx.shape)
        return grad_x, None, None, grad_a, grad_b, None, None, None


def _plain(module: Any) -> str | None:
    """The one active adapter if `module` can take the fused path now, else None."""
    if not module.training or module.disable_adapters or module.merged or module.fan_in_fan_out:
        return None
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1 or active[0] in module.lora_variant:
        return None
    name = active[0]
    base = module.base_layer
    if type(base) is not torch.nn.Linear or base.weight.requires_grad:
        return None
    if base.bias is not None and base.bias.requires_grad:
        return None
    if module.lora_B[name].bias is not None or not isinstance(
        module.lora_dropout[name], torch.nn.Dropout | torch.nn.Identity
    ):
        return None
    return name


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = None if args or kwargs else _plain(self)
    if name is None:
        return type(self).__base__.forward(self, x, *args, **kwargs)  # peft's own
    base, a, b = self.base_layer, self.lora_A[name].weight, self.lora_B[name].weight
    dropout = self.lora_dropout[name]
    drop = round(dropout.p * LANES) if isinstance(dropout, torch.nn.Dropout) else 0
    site = getattr(dropout, "site", 0)
    # autocast does not reach inside an autograd function's own ops: cast here, as it would
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    with torch.autocast("cpu", enabled=False):
        x, weight, a, b = (t.to(dtype) for t in (x, base.weight, a, b))
        bias = None if base.bias is None else base.bias.to(dtype)
        return _LoRALinear.apply(x, weight, bias, a, b, self.scaling[name], drop, site)


@functools.cache
def _fused_class(linear: type) -> type:
    return type("FusedLoRALinear", (linear,), {"forward": _fused_forward, "__module__": __name__})


def install(model: torch.nn.Module) -> int:
    """Give every peft LoRA Linear of `model` the fused training path; returns how many. The modules
    become a subclass of peft's (their class is swapped, nothing else), so copies keep the path."""
    if "peft" not in sys.modules:  # nothing made a peft model (and importing peft costs seconds)
        return 0
    from peft.tuners.lora.layer import Linear

    fused = _fused_class(Linear)
    count = 0
    for module in model.modules():
        if type(module) is Linear:
            module.__class__ = fused
            count += 1
    return count
