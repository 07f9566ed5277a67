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
adapters or quantised layers, run through transformers' forward instead (`supports`). A LLaVA whose
language model is of the family decodes here too: after its prefill (given as embeddings, the image
features in place: vlm/embed.py) every token is text.
tests/test_infer.py checks that both give the same logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FAMILY = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
VISION = {"LlavaForConditionalGeneration"}  # a vision tower and projector before a language model


def language(model: torch.nn.Module) -> torch.nn.Module | None:
    """The decoder stack (embed_tokens, layers, norm, rotary_emb) that the lean forward runs: a
    causal LM's `model`, or a LLaVA's language model of the family; None for any other model."""
    name = type(model).__name__
    if name in FAMILY:
        return model.model
    inner = getattr(getattr(model, "model", None), "language_model", None)
    family = {n.replace("ForCausalLM", "Model") for n in FAMILY}
    return inner if name in VISION and type(inner).__name__ in family else None


def supports(model: torch.nn.Module) -> bool:
    if language(model) is None:
        return False
    config = model.config.get_text_config()
    windowed = getattr(config, "sliding_window", None) is not None and getattr(
        config, "use_sliding_window", True
    )
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    runs = [*language(model).modules(), model.lm_head]  # (a vision tower's layers are not run here)
    plain = all(type(m) is torch.nn.Linear for m in runs if isinstance(m, torch.nn.Linear))
    return plain and not windowed and layer_types == {"full_attention"}


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As transformers' RMSNorm: normalised in float32, cast back, then scaled (torch's fused
    rms_norm: one kernel for the five operations)."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    """F.linear, except for one row of bf16/fp16: then a matrix-vector product, which reads the
    weights nearly twice as fast on a CPU (F.linear takes a matrix-matrix kernel even for one row;
    BENCHMARKS.md). fp32 keeps F.linear: the same bits for one row as for a batch."""
    if x.dtype != torch.float32 and x.shape[:-1].numel() == 1:
        y = torch.mv(layer.weight, x.reshape(-1)).view(*x.shape[:-1], -1)
        return y if layer.bias is None else y + layer.bias
    return F.linear(x, layer.weight, layer.bias)


def _attend(q, k, v, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Attention of q [B, H, T, D] over the cache's k, v [B, KV, L, D]. One query of a reduced
    precision (a single stream decoding) takes three plain products: SDPA's fixed cost is several
    times the arithmetic of one query. fp32 always takes SDPA, so its bits never depend on the batch."""
    B, H, T, D = q.shape
    if q.dtype == torch.float32 or B * T != 1 or mask is not None:
        gqa = k.shape[1] != H
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    KV = k.shape[1]
    g = q.view(KV, H // KV, D)  # the query heads that share each key-value head
    w = torch.softmax((g @ k[0].transpose(1, 2)).float() * scale, dim=-1).to(q.dtype)
    return (w @ v[0]).view(1, H, 1, D)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half's minus sign folded into the sine table."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * signed_sin


class FastDecoder:
    def __init__(self, model: torch.nn.Module, max_len: int):
        inner = language(model)
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
        embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits at `keep`; `embeds` [B, T, width], when given, stand for the ids' embeddings."""
        B, T = input_ids.shape
        x = F.embedding(input_ids, self.embed) if embeds is None else embeds
        if B * T == 1:  # one request decoding: it sees its whole cache, so no mask at all
            attention_mask = None
        if attention_mask is not None:  # once per step, not once per layer inside attention
            attention_mask = torch.zeros(attention_mask.shape, dtype=x.dtype).masked_fill_(
                ~attention_mask, float("-inf")
            )
        cos, sin = self.cos[position_ids][:, None], self.sin[position_ids][:, None]  # [B, 1, T, D]
        for i, p in enumerate(self.layers):
            D = p["head_dim"]
            h = _rms(x, *p["in_norm"])
            q = _linear(h, p["q"]).view(B, T, -1, D)
            k = _linear(h, p["k"]).view(B, T, -1, D)
            v = _linear(h, p["v"]).view(B, T, -1, D).transpose(1, 2)
            if p["q_norm"] is not None:  # qwen3 normalises each head's queries and keys
                q, k = _rms(q, *p["q_norm"]), _rms(k, *p["k_norm"])
            q, k = _rotate(q.transpose(1, 2), cos, sin), _rotate(k.transpose(1, 2), cos, sin)
            k, v = cache.update(k, v, i)
            y = _attend(q, k, v, attention_mask, p["scaling"])
            x = x + _linear(y.transpose(1, 2).reshape(B, T, -1), p["o"])
            h = _rms(x, *p["post_norm"])
            x = x + _linear(p["act"](_linear(h, p["gate"])) * _linear(h, p["up"]), p["down"])
        x = _rms(x[:, keep], *self.norm)
        return _linear(x, self.lm_head)
