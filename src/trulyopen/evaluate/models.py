"""What `trulyopen eval` can evaluate, loaded the same way whatever it is:

a run directory           its newest post-training checkpoint, else its newest pretraining one
a trulyopen checkpoint    full weights, or an adapter merged into its base
a Hugging Face model      a local directory or a hub name (the same from_pretrained call)

A vision-language model (its config has a vision tower) comes with its processor, which evaluation
uses to show it the images of multiple-choice and generation items (evaluate/vision.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from trulyopen.errors import UserError, missing, reading
from trulyopen.locate import loading, locate
from trulyopen.train import checkpoint


@dataclass
class EvalModel:
    model: torch.nn.Module
    tokenizer: object
    name: str  # what was asked for, as given
    source: str  # the checkpoint or model directory actually loaded
    processor: object | None = None  # a vision-language model's processor (images and text)

    @property
    def max_len(self) -> int:
        config = getattr(self.model, "module", self.model).config  # (DDP keeps the model in .module)
        return min(int(getattr(config, "max_position_embeddings", 2048) or 2048), 4096)


def load(target: str | Path) -> EvalModel:
    """Load any of what `trulyopen.locate` accepts; bad or corrupt files are named, one line each."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trulyopen.vlm.model import is_vlm_config, is_vlm_model, load_model, load_processor

    found = locate(target)
    path = Path(found.path)
    processor = None
    if found.kind == "checkpoint":
        with reading(path, "checkpoint"):
            if (path / "adapter.safetensors").exists():
                from trulyopen.finetune.base import base_of, merged

                model = merged(path, base_of(path)).eval()
            else:
                model = checkpoint.load_for_inference(path)
        tok_dir = checkpoint.tokenizer_dir(path)
        if tok_dir is None:
            raise missing(f"{path}: tokenizer", "tokenizer", "the run's tokenizer/ folder is gone")
        with reading(tok_dir, "tokenizer"):
            tok = AutoTokenizer.from_pretrained(str(tok_dir))
            processor = load_processor(tok_dir) if is_vlm_config(model.config) else None
    elif is_vlm_model(found.path):
        with loading(found.path, "Hugging Face model"):
            model = load_model(found.path).eval()
            processor = load_processor(found.path)
            tok = processor.tokenizer
    else:
        with loading(found.path, "Hugging Face model"):
            model = AutoModelForCausalLM.from_pretrained(found.path, dtype=torch.float32).eval()
            tok = AutoTokenizer.from_pretrained(found.path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tok) > vocab:
        raise UserError(
            f"{target}: the tokenizer has {len(tok):,} tokens but the model's embeddings only {vocab:,}; "
            "use the tokenizer the model was trained with"
        )
    return EvalModel(model, tok, str(target), str(path), processor)
