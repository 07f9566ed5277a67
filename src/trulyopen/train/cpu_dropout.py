"""Dropout for training on a CPU: the same Bernoulli mask, drawn from a fast generator.

On a CPU, torch draws a dropout mask one element at a time from its Mersenne Twister: about 25 ms
for one 4,096 x 512 activation on the benchmark machine. LoRA draws one for the input of every
adapted layer (7 a block), which made dropout a third of a LoRA step. Here the random bits come from
numpy's PCG64 in bulk, 64 bits a draw cut into four 16-bit lanes (about 5 ms for the same mask):

    seed  <- torch's generator (one draw)        so a run stays a function of torch's RNG state,
    bits  <- PCG64(seed), 16 bits per element     which checkpoints hold: resuming draws the same masks
    keep  =  bits >= round(p * 65536)             p is off by less than 1 / 131072
    out   =  x * 65536 / (65536 - round(p * 65536)) * keep     (exact expectation; the 0/1 mask is
                                                              made as bf16 bits, not from bools, for speed)

`install` swaps every nn.Dropout of a model for this one (same p); they hold no weights, so the
model's state dict, checkpoints and exports do not change. The mask is a custom op, opaque to
torch.compile, so a compiled model draws the same masks: inductor's own dropout draws one element at
a time too (a compiled LoRA step ran at 0.65x eager with it, and at 1.0x with this).
"""

from __future__ import annotations

import numpy as np
import torch

LANES = 1 << 16
ONE_BITS = {torch.bfloat16: 0x3F80, torch.float16: 0x3C00}  # 1.0 as 16 bits: the mask straight from numpy


@torch.library.custom_op(
    "trulyopen::dropout_mask", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,)
)
def dropout_mask(x: torch.Tensor, drop: int, site: int = 0) -> torch.Tensor:
    """The 0/1 mask for x, in x's dtype. An opaque op under torch.compile: inductor would otherwise
    draw the mask from its own generator, one element at a time (70 ms for a 4,096 x 512 activation,
    fused into the norm before it, on a 2-core EPYC). `site` numbers the module that draws: compiled
    graphs merge calls with equal arguments (AOT autograd's CSE ignores the op's nondeterministic tag),
    which would give LoRA's q, k and v, all fed the same input, one mask instead of three."""
    seed = int(torch.randint(0, 2**62, (1,)).item())  # torch's generator: checkpoints hold its state
    n = x.numel()
    bits = np.random.PCG64([seed, site]).random_raw(-(-n // 4)).view(np.uint16)[:n]
    keep = bits >= drop
    if x.dtype in ONE_BITS:
        mask = torch.from_numpy(keep * np.uint16(ONE_BITS[x.dtype])).view(x.dtype)
    else:
        mask = torch.from_numpy(keep).to(x.dtype)
    return mask.view(x.shape).to(x.device)


@dropout_mask.register_fake
def _(x: torch.Tensor, drop: int, site: int = 0) -> torch.Tensor:
    return torch.empty_like(x)


def keep_scale(drop: int) -> float:
    """What a kept unit is multiplied by when `drop` of LANES are dropped: the exact expectation."""
    return LANES / (LANES - drop)


class FastDropout(torch.nn.Dropout):
    site = 0  # numbered by `install`: see dropout_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        drop = round(self.p * LANES)
        return x.mul(keep_scale(drop)).mul_(dropout_mask(x.detach(), drop, self.site))


def install(model: torch.nn.Module) -> int:
    """Replace each torch.nn.Dropout with p > 0 in `model` by FastDropout; returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Dropout and child.p > 0:
                setattr(parent, name, FastDropout(child.p))
                swapped += 1
                getattr(parent, name).site = swapped
    return swapped
