"""What `trulyopen eval` can evaluate, loaded the same way whatever it is:

a run directory           its newest post-training checkpoint, else its newest pretraining one
a trulyopen checkpoint    full weights, or an adapter merged into its base
a Hugging Face model      a local directory or a hub name (the same from_pretrained call)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from trulyopen.train import checkpoint


@dataclass
class EvalModel:
    model: torch.nn.Module
    tokenizer: object
    name: str  # what was asked for, as given
    source: str  # the checkpoint or model directory actually loaded

    @property
    def max_len(self) -> int:
        config = getattr(self.model, "module", self.model).config  # (DDP keeps the model in .module)
        return min(int(getattr(config, "max_position_embeddings", 2048) or 2048), 4096)


def newest_in_run(run_dir: Path) -> Path | None:
    for stage in ("finetune", "pretrain"):
        found = checkpoint.newest(run_dir / "checkpoints" / stage)
        if found is not None:
            return found
    return None


def load(target: str | Path) -> EvalModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(target)
    if path.is_dir() and (path / "ledger.jsonl").exists():
        ckpt = newest_in_run(path)
        if ckpt is None:
            raise FileNotFoundError(f"{path}: a run directory with no checkpoint to evaluate")
        path = ckpt
    if path.is_dir() and (path / "state.json").exists():
        if (path / "adapter.safetensors").exists():
            from trulyopen.finetune.base import base_of, merged

            model = merged(path, base_of(path)).eval()
        else:
            model = checkpoint.load_for_inference(path)
        tok_dir = checkpoint.tokenizer_dir(path)
        if tok_dir is None:
            raise FileNotFoundError(f"{path}: no tokenizer found for this checkpoint")
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(str(target))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return EvalModel(model, tok, str(target), str(path))
