"""Export to the Hugging Face format: what `AutoModelForCausalLM.from_pretrained(dir)` loads.

The directory gets config.json, safetensors weights, generation_config.json and the tokenizer files,
written into a temporary directory that is renamed into place once complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def export_hf(model: torch.nn.Module, tokenizer_dir: Path | None, out: Path) -> Path:
    from transformers import AutoTokenizer, GenerationConfig

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    if tokenizer_dir is not None:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        tok.save_pretrained(str(tmp))
        gen = GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )
        gen.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
