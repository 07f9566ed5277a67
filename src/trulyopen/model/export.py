"""Export to the Hugging Face format: what `AutoModelForCausalLM.from_pretrained(dir)` loads (a
vision-language model: `AutoModelForImageTextToText` and `AutoProcessor`, whose files it gets too).

The directory gets config.json, safetensors weights, generation_config.json and the tokenizer files,
written into a temporary directory that is renamed into place once complete. An adapter checkpoint
(LoRA, QLoRA) exports as the merged model, with the adapter alone in `adapter/` in the peft format
(`PeftModel.from_pretrained(base, dir / "adapter")`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from trulyopen.errors import UserError, reading
from trulyopen.locate import locate

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def export_hf(model: torch.nn.Module, tokenizer_dir: Path | None, out: Path) -> Path:
    """Write `model` to `out` in the Hugging Face format; a peft model is merged, and its adapter
    written on its own to `out/adapter`."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(model, "merge_and_unload"):  # a peft model
        model.save_pretrained(str(tmp / "adapter"))
        model = model.merge_and_unload()
    model.save_pretrained(str(tmp), safe_serialization=True)
    if tokenizer_dir is not None:
        write_tokenizer(tokenizer_dir, tmp)
        if any((Path(tokenizer_dir) / f).exists() for f in PROCESSOR_FILES):  # a VLM: its processor too
            from trulyopen.vlm.model import load_processor, save_processor

            save_processor(load_processor(tokenizer_dir), tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def write_tokenizer(tokenizer_dir: Path, out: Path) -> None:
    """The tokenizer's files in `out`, and a generation config whose end tokens are the tokenizer's
    end of text and, where it has one, its end of turn (so that generation stops after an answer)."""
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.save_pretrained(str(out))
    end_of_turn = [i for i in tok.convert_tokens_to_ids(["<|end|>"]) if i != tok.unk_token_id]
    gen = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, *end_of_turn] if end_of_turn else tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    gen.save_pretrained(str(out))


def export_checkpoint(ckpt: Path, out: Path) -> Path:
    """Export a trulyopen checkpoint of any stage: full weights, or an adapter merged into its base."""
    from trulyopen.train.checkpoint import load_for_inference, tokenizer_dir

    found = locate(ckpt)
    if found.kind != "checkpoint":
        raise UserError(f"{ckpt}: already a Hugging Face model; export takes a checkpoint or a run directory")
    if Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out {out}: an existing file; give a directory to write the model into")
    ckpt = Path(found.path)
    if (ckpt / "adapter.safetensors").exists():
        from trulyopen.finetune.base import base_of, with_adapter

        with reading(ckpt, "adapter checkpoint"):
            model = with_adapter(ckpt, base_of(ckpt)).eval()
        return export_hf(model, tokenizer_dir(ckpt), out)
    return export_hf(load_for_inference(ckpt), tokenizer_dir(ckpt), out)
