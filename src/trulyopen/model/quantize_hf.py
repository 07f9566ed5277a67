"""Quantized Hugging Face exports: int8 (LLM.int8) or 4-bit NF4, through bitsandbytes.

For GPU users short of memory: a plain `AutoModelForCausalLM.from_pretrained(dir)` loads these,
since config.json holds the quantization config and the weights on disk are already quantized (a
quarter, or an eighth, of fp32's bytes). bitsandbytes quantizes on its CPU backend too, so the
export needs no GPU (it uses one when present).

Layers other than the linear ones of the decoder blocks (embeddings, norms, the output layer) stay
unquantized, in bf16: bitsandbytes skips the output layer to keep the logits accurate.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import torch

from trulyopen.errors import UserError, missing

QUANTS = ("int8", "nf4")
DTYPE = torch.bfloat16  # unquantized layers and NF4 compute: as QLoRA; the range of fp32 at half the size
WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".index.json")  # weight files and shard indexes


def export_hf_quantized(hf_dir: Path, out: Path, quant: str) -> Path:
    """Write the Hugging Face model in `hf_dir` to `out`, its linear layers quantized to `quant`
    (int8 or nf4), with `hf_dir`'s tokenizer and generation config; returns `out`."""
    if quant not in QUANTS:
        raise UserError(f"--quant {quant}: unknown quantization; choose one of {', '.join(QUANTS)}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            f"--quant {quant}: needs bitsandbytes, which is not installed; "
            "pip install 'trulyopen[qlora]' (or pip install bitsandbytes)"
        )
    hf_dir, out = Path(hf_dir), Path(out)
    if not (hf_dir / "config.json").is_file():
        raise missing(hf_dir / "config.json", "Hugging Face model config", "export the checkpoint first")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), quantization_config=_config(quant), dtype=DTYPE)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    # Tokenizer files, chat template and generation config, as they are: everything but the
    # weights and config.json, which are the quantized model's own now. Not `adapter/`: its base is
    # the unquantized model.
    for f in hf_dir.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.endswith(WEIGHTS):
            shutil.copy2(f, tmp / f.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _config(quant: str):
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,  # quantize the per-block scales too: ~0.4 bit per weight less
        bnb_4bit_compute_dtype=DTYPE,
    )
