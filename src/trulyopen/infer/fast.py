"""A lean forward pass for the Llama family (llama, mistral, qwen2, qwen3), for decoding.

Decoding feeds one token per request per step, so the work per step is small and the fixed cost of
a forward pass dominates: transformers' modules, keyword plumbing, mask preparation and output
objects cost several milliseconds per step on a CPU, more than the arithmetic of a small model.
This is the same computation written as one loop over the model's own weights:

    x = embed(tokens)
    for each layer:   x += o_proj(attention(rope(q_proj(norm(x))), rope(k_proj(..)), v_proj(..)))
                      x += down_proj(act(gate_proj(norm(x))) * up_proj(norm(x)))
    logits = lm_head(norm(x))          (only at the positions asked for)

Rotary angles come from the model's own rotary module (so any rope scaling it was trained with
applies), computed once for every position of the cache. Models outside the family, or with
adapters or quantised layers, run through transformers' forward instead (`supports`).
tests/test_infer.py checks that both give the same logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FAMILY = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}


def supports(model: torch.nn.Module) -> bool:
    if type(model).__name__ not in FAMILY:
        return False
    config = model.config
    windowed = getattr(config, "sliding_window", None) is not None and getattr(
        config, "use_sliding_window", True
    )
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    plain = all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    return plain and not windowed and layer_types == {"full_attention"}


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As transformers' RMSNorm: normalised in float32, cast back, then scaled."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half's minus sign folded into the sine table."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * signed_sin


class FastDecoder:
    def __init__(self, model: torch.nn.Module, max_len: int):
        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.norm = (inner.norm.weight, inner.norm.variance_epsilon)
        self.lm_head = model.lm_head
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(
                dict(
                    in_norm=(layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
                    post_norm=(
                        layer.post_attention_layernorm.weight,
                        layer.post_attention_layernorm.variance_epsilon,
                    ),
                    q=a.q_proj,
                    k=a.k_proj,
                    v=a.v_proj,
                    o=a.o_proj,
                    q_norm=(a.q_norm.weight, a.q_norm.variance_epsilon) if hasattr(a, "q_norm") else None,
                    k_norm=(a.k_norm.weight, a.k_norm.variance_epsilon) if hasattr(a, "k_norm") else None,
                    head_dim=a.head_dim,
                    scaling=a.scaling,
                    gate=m.gate_proj,
                    up=m.up_proj,
                    down=m.down_proj,
                    act=m.act_fn,
                )  # fmt: skip
            )
        positions = torch.arange(max_len, device=self.embed.device)[None]
        probe = torch.zeros((1, 1, 1), dtype=self.embed.dtype, device=self.embed.device)
        cos, sin = inner.rotary_emb(probe, positions)
        half = sin.shape[-1] // 2
        self.cos, self.sin = cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)

    @torch.inference_mode()
    def __call__(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache,
        keep: list[int],
    ) -> torch.Tensor:
        B, T = input_ids.shape
        x = F.embedding(input_ids, self.embed)
        if attention_mask is not None:  # once per step, not once per layer inside attention
            attention_mask = torch.zeros(attention_mask.shape, dtype=x.dtype).masked_fill_(
                ~attention_mask, float("-inf")
            )
        cos, sin = self.cos[position_ids][:, None], self.sin[position_ids][:, None]  # [B, 1, T, D]
        for i, p in enumerate(self.layers):
            D = p["head_dim"]
            h = _rms(x, *p["in_norm"])
            q = F.linear(h, p["q"].weight, p["q"].bias).view(B, T, -1, D)
            k = F.linear(h, p["k"].weight, p["k"].bias).view(B, T, -1, D)
            v = F.linear(h, p["v"].weight, p["v"].bias).view(B, T, -1, D).transpose(1, 2)
            if p["q_norm"] is not None:  # qwen3 normalises each head's queries and keys
                q, k = _rms(q, *p["q_norm"]), _rms(k, *p["k_norm"])
            q, k = _rotate(q.transpose(1, 2), cos, sin), _rotate(k.transpose(1, 2), cos, sin)
            k, v = cache.update(k, v, i)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_mask, scale=p["scaling"], enable_gqa=k.shape[1] != q.shape[1]
            )
            x = x + F.linear(y.transpose(1, 2).reshape(B, T, -1), p["o"].weight, p["o"].bias)
            h = _rms(x, *p["post_norm"])
            mlp = p["act"](F.linear(h, p["gate"].weight, p["gate"].bias)) * F.linear(
                h, p["up"].weight, p["up"].bias
            )
            x = x + F.linear(mlp, p["down"].weight, p["down"].bias)
        x = _rms(x[:, keep], *self.norm)
        return F.linear(x, self.lm_head.weight, self.lm_head.bias)
