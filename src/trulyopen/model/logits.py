"""Logits at chosen positions only.

The vocabulary projection is a large share of a small model's forward pass, and scoring or
sampling often needs only a few positions of each row (the last prompt token, a choice's tokens).
Models whose forward takes `logits_to_keep` (transformers' decoders do) project only those
positions; any other model gives logits everywhere and they are sliced afterwards.
"""

from __future__ import annotations

import inspect

import torch


def takes_logits_to_keep(model: torch.nn.Module) -> bool:
    forward = getattr(model, "module", model).forward  # (DDP keeps the model in .module)
    return "logits_to_keep" in inspect.signature(forward).parameters


def logits_at(model: torch.nn.Module, positions: list[int], **inputs) -> torch.Tensor:
    """[batch, len(positions), vocab]: the logits at `positions` (the same for every row)."""
    if takes_logits_to_keep(model):
        tokens = inputs["input_ids"] if "input_ids" in inputs else inputs["inputs_embeds"]
        keep = torch.tensor(positions, device=tokens.device)
        return model(**inputs, logits_to_keep=keep).logits
    return model(**inputs).logits[:, positions]
