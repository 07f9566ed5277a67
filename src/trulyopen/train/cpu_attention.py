"""Attention for training on a CPU: two batched matmuls around one softmax, instead of SDPA's flash kernel.

On a CPU, PyTorch's flash-attention kernel (what SDPA runs) is quick forward but slow backward: on a
Xeon with AMX, one layer of the benchmark model (8 sequences x 8 heads x 256 positions x 64, bf16)
takes about 40 ms forward and backward, against about 20 ms for the same attention written as

    scores = (q · scale) @ kᵀ + bias    one batched matmul (oneDNN, AMX); bias: 0, or the lowest
                                        number where masked (the causal triangle rides in the matmul)
    probs = softmax(scores)             one pass, bf16 in and out (fp32 inside)
    out = probs @ v                     one batched matmul

whose backward is four batched matmuls and one softmax-backward pass. Under `torch.compile` the
elementwise passes fuse further. The price is memory: the probabilities of every layer are kept for
the backward pass (B x heads x T x T), so calls larger than `MAX_SCORES` elements go to SDPA.

The loop switches a model to this attention only around a training step's forward and backward
passes on a CPU (`for_training`); validation, generation and checkpoints see the model as it was.
What it does not do (a cache, sliding windows, soft-capping, sinks, dropout) goes to SDPA too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

NAME = "trulyopen_cpu_matmul"
MAX_SCORES = 1 << 25  # B x heads x Tq x Tk per call: 64 MB of bf16 probabilities kept per layer

_bias: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _causal_bias(t: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[T, T]: 0 on and below the diagonal, the dtype's lowest number above it (added to the scores)."""
    key = (t, dtype, device)
    if key not in _bias:
        upper = torch.ones(t, t, dtype=torch.bool, device=device).triu(1)
        _bias[key] = torch.zeros(t, t, dtype=dtype, device=device).masked_fill(upper, torch.finfo(dtype).min)
    return _bias[key]


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True attends) as a bias to add to the scores: 0, or the dtype's lowest number
    (not -inf: a row masked whole gets uniform weights, not NaN). Every layer of a forward pass gets
    the same mask, so the last one's bias is kept; adding it is far faster than a masked fill."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    if _last_mask and _last_mask[0] is mask and _last_mask[1].dtype == dtype:
        return _last_mask[1]
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, torch.finfo(dtype).min
    )
    _last_mask[:] = [mask, bias]
    return bias


_last_mask: list = []  # [the boolean mask of the last call, its bias]


def matmul_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, heads, Tq, d]
    key: torch.Tensor,  # [B, kv_heads, Tk, d]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,  # None (causal), or [B, 1, Tq, Tk]: bool (True attends) or additive
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function (AttentionInterface): output [B, Tq, heads, d]."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    b, heads, tq, d = query.shape
    tk = key.shape[2]
    unusual = any(kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux", "position_bias"))
    if unusual or dropout or tq != tk or b * heads * tq * tk > MAX_SCORES:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = d**-0.5 if scaling is None else scaling
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and causal and tq > 1:  # pretraining: scale and mask fused into the matmul
        q3, k3 = query.reshape(b * heads, tq, d), key.reshape(b * heads, tk, d)
        bias = _causal_bias(tq, query.dtype, query.device).expand(b * heads, tq, tk)
        scores = torch.baddbmm(bias, q3, k3.transpose(1, 2), alpha=scale).view(b, heads, tq, tk)
    else:
        scores = torch.matmul(query * scale, key.transpose(2, 3))  # scaling the smaller tensor
        if attention_mask is not None:  # in place: neither the matmul's backward nor the add's needs it
            scores.add_(_additive(attention_mask, scores.dtype))
    probs = torch.softmax(scores, dim=-1)  # bf16 in and out; the kernel accumulates in fp32
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make NAME an attention implementation transformers knows, with SDPA's masks (None when causal)."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, matmul_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def _configs(model: torch.nn.Module) -> list:
    """The transformers configs the model's modules read their attention implementation from."""
    from transformers import PretrainedConfig

    seen: dict[int, PretrainedConfig] = {}
    for m in model.modules():
        c = getattr(m, "config", None)
        if isinstance(c, PretrainedConfig):
            seen.setdefault(id(c), c)
    return [c for c in seen.values() if getattr(c, "_attn_implementation_internal", None) == "sdpa"]


@contextlib.contextmanager
def for_training(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Inside: the model's SDPA attention is matmul attention, on a CPU in bf16 (in fp32 SDPA's kernel
    is as fast; elsewhere nothing changes)."""
    configs = _configs(model) if device.type == "cpu" and dtype == torch.bfloat16 else []
    if configs:
        register()
    for c in configs:  # each config on its own (the property's setter would recurse into sub-configs)
        c._attn_implementation_internal = NAME
    try:
        yield
    finally:
        for c in configs:
            c._attn_implementation_internal = "sdpa"
