"""Architecture families and size presets, turned into `transformers` configurations.

We never write a model class: every architecture comes from `transformers`, so anything it defines
(its `model_type`, e.g. "llama", "qwen3", "olmo2", "qwen3_moe", "deepseek_v3", "gemma3_text", ...)
can be trained. A preset only fills in the dimensions; a family adapter maps them onto that
family's own config fields (mixture-of-experts and latent-attention fields differ per family).

    size preset ("tiny", "30m", ...) ─┐
    explicit dimensions (override) ───┼─► Dims ─► family adapter ─► transformers.PretrainedConfig
    vocabulary from the run's tokenizer┘
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from trulyopen.errors import UserError


@dataclass(frozen=True)
class Dims:
    """The dimensions every decoder shares, plus mixture-of-experts sizes (ignored by dense families)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    experts: int = 8
    experts_per_token: int = 2
    expert_intermediate: int | None = None  # default: intermediate / experts_per_token (same active FLOPs)


# Sizes are named by their total parameter count with an 8k-32k vocabulary. `tiny` is for tests;
# `quickstart` is sized so the quickstart trains in minutes on two CPU cores.
SIZES: dict[str, Dims] = {
    "tiny": Dims(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=192, experts=4),
    "quickstart": Dims(hidden=256, layers=4, heads=4, kv_heads=4, intermediate=768),
    "30m": Dims(hidden=384, layers=6, heads=6, kv_heads=6, intermediate=1536),
    "150m": Dims(hidden=768, layers=12, heads=12, kv_heads=12, intermediate=3072),
    "1b": Dims(hidden=2048, layers=16, heads=16, kv_heads=16, intermediate=8192),  # OLMo-1B's shape
    "7b": Dims(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=11008),
}


class ModelSpecError(UserError, ValueError):
    """Dimensions or names that cannot make a model; the message names the field."""


def check_dims(d: Dims) -> None:
    if d.hidden % d.heads:
        raise ModelSpecError(
            f"model.hidden_size ({d.hidden}) must be a multiple of model.num_heads ({d.heads})"
        )
    if d.heads % d.kv_heads:
        raise ModelSpecError(
            f"model.num_heads ({d.heads}) must be a multiple of model.num_kv_heads ({d.kv_heads})"
        )
    if d.experts_per_token > d.experts:
        raise ModelSpecError(
            f"model.experts_per_token ({d.experts_per_token}) cannot exceed model.num_experts ({d.experts})"
        )


def _common(d: Dims, vocab: int, max_len: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab,
        "hidden_size": d.hidden,
        "intermediate_size": d.intermediate,
        "num_hidden_layers": d.layers,
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads,
        "max_position_embeddings": max_len,
    }


def _expert_width(d: Dims) -> int:
    return d.expert_intermediate or max(d.intermediate // d.experts_per_token, 1)


def _qwen3_moe(d: Dims) -> dict[str, Any]:
    return {
        "num_experts": d.experts,
        "num_experts_per_tok": d.experts_per_token,
        "moe_intermediate_size": _expert_width(d),
        "head_dim": d.hidden // d.heads,
    }


def _deepseek_v3(d: Dims) -> dict[str, Any]:
    head = d.hidden // d.heads
    return {
        "n_routed_experts": d.experts,
        "num_experts_per_tok": d.experts_per_token,
        "moe_intermediate_size": _expert_width(d),
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,  # the first layer stays dense, as in DeepSeek-V3
        "n_group": 1,
        "topk_group": 1,
        # multi-head latent attention: keys and values go through a low-rank latent
        "kv_lora_rank": max(d.hidden // 4, 16),
        "q_lora_rank": max(d.hidden // 2, 16),
        "qk_rope_head_dim": max(head // 2, 8),
        "qk_nope_head_dim": max(head // 2, 8),
        "v_head_dim": head,
    }


FAMILY_FIELDS = {
    "qwen3": lambda d: {"head_dim": d.hidden // d.heads},
    "qwen3_moe": _qwen3_moe,
    "deepseek_v3": _deepseek_v3,
}
NAMED_FAMILIES = ["llama", "qwen3", "olmo2", "qwen3_moe", "deepseek_v3"]


def resolve_dims(size: str | None, overrides: dict[str, int | None]) -> Dims:
    """A preset's dimensions with any explicit ones laid over them."""
    if size is None:
        missing = [k for k in ("hidden", "layers", "heads", "intermediate") if overrides.get(k) is None]
        if missing:
            raise ModelSpecError(
                f"model.size is not set, so these dimensions are needed: {', '.join(missing)}"
            )
        base = Dims(hidden=0, layers=0, heads=1, kv_heads=1, intermediate=0)
        overrides = {
            "kv_heads": overrides.get("heads"),
            **{k: v for k, v in overrides.items() if v is not None},
        }
    elif size not in SIZES:
        raise ModelSpecError(f"model.size: unknown preset '{size}' (presets: {', '.join(SIZES)})")
    else:
        base = SIZES[size]
    dims = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    check_dims(dims)
    return dims


def build_config(arch: str, dims: Dims, vocab: int, max_len: int, extra: dict[str, Any] | None = None):
    """The `transformers` config of family `arch` with these dimensions."""
    from transformers import CONFIG_MAPPING, AutoConfig

    if arch not in CONFIG_MAPPING:
        known = ", ".join(NAMED_FAMILIES)
        raise ModelSpecError(f"model.arch: '{arch}' is not a transformers model type (e.g. {known})")
    fields = {**_common(dims, vocab, max_len), **FAMILY_FIELDS.get(arch, lambda d: {})(dims), **(extra or {})}
    return AutoConfig.for_model(arch, **fields)
