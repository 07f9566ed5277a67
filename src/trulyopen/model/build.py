"""Building a model: from a preset and the run's tokenizer, or from a Hugging Face checkpoint.

A local checkpoint directory and a hub name take the same path (`from_pretrained`), so continuing
pretraining from `./my-llama` or from `org/model` is one code path; only the hub needs a network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from trulyopen.locate import loading, locate
from trulyopen.model.presets import Dims, ModelSpecError, build_config


@dataclass(frozen=True)
class ParamCount:
    embedding: int
    non_embedding: int
    active_non_embedding: int  # what one token passes through (mixture-of-experts use a few experts)

    @property
    def total(self) -> int:
        return self.embedding + self.non_embedding


def from_preset(arch: str, dims: Dims, vocab: int, max_len: int, seed: int = 0, extra: dict | None = None):
    """A freshly initialised model; the same seed gives the same weights."""
    from transformers import AutoModelForCausalLM

    config = build_config(arch, dims, vocab, max_len, extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def from_pretrained(name_or_dir: str | Path, vocab: int | None = None):
    """A Hugging Face checkpoint (local directory or hub name); checks it fits the tokenizer."""
    from transformers import AutoModelForCausalLM

    found = locate(name_or_dir, "model.init_from")
    with loading(found.path, "model", "model.init_from"):
        model = AutoModelForCausalLM.from_pretrained(found.path, dtype=torch.float32)
    have = model.get_input_embeddings().weight.shape[0]
    if vocab is not None and vocab > have:
        raise ModelSpecError(
            f"model.init_from: {name_or_dir} has {have} token embeddings but the tokenizer has "
            f"{vocab} tokens; use the checkpoint's own tokenizer (tokenizer.path) or one no larger"
        )
    return model


def count_params(model: torch.nn.Module) -> ParamCount:
    """Embedding and non-embedding parameters (tied weights counted once), and those active per token."""
    emb_ids = {
        id(p)
        for m in (model.get_input_embeddings(), model.get_output_embeddings())
        if m
        for p in m.parameters()
    }
    config = model.config
    experts = getattr(config, "num_experts", None) or getattr(config, "n_routed_experts", None)
    per_token = getattr(config, "num_experts_per_tok", None)
    embedding = non_embedding = active = 0
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in emb_ids:
            embedding += p.numel()
            continue
        non_embedding += p.numel()
        routed = experts and per_token and ".experts." in f".{name}." and "shared" not in name
        active += p.numel() * per_token // experts if routed else p.numel()
    return ParamCount(embedding, non_embedding, active)


def flops_per_token(model: torch.nn.Module, seq_len: int) -> int:
    """Training FLOPs per token: 6 x active non-embedding parameters plus attention, as in
    Chinchilla and nanochat (the output projection is included, the embedding lookup is not)."""
    config = model.config
    params = count_params(model)
    out_proj = model.get_output_embeddings().weight.numel()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * seq_len
    return 6 * (params.active_non_embedding + out_proj) + attention
