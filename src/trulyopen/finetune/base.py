"""The model post-training starts from, its tokenizer, and the adapter (LoRA, QLoRA) trained on it.

`finetune.base` may be:
    null                   this run's newest pretraining checkpoint
    a trulyopen checkpoint a directory with config.json + model.safetensors (+ state.json)
    an adapter checkpoint  a LoRA run's checkpoint: its base is loaded and the adapter merged in
    a Hugging Face model   a local directory, or a hub name: the same `from_pretrained` call

LoRA freezes the base and learns a low-rank update beside each adapted linear layer:

        x ──► W (frozen) ──────────────┐
        │                              (+) ──► y = W x + (alpha / r) · B A x
        └──► A (r × in) ──► B (out × r)┘        A random, B zero: training starts at the base

QLoRA keeps W in 4-bit NF4 (bitsandbytes) and computes in bf16 or fp32; only A and B train.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from trulyopen.locate import loading, locate
from trulyopen.recipe import FinetuneConfig
from trulyopen.train import TrainingError, checkpoint


@dataclass(frozen=True)
class BaseRef:
    model: str  # what from_pretrained loads: a directory or a hub name
    tokenizer: str  # a directory or a hub name
    adapter: Path | None = None  # an adapter checkpoint whose weights are merged into `model`


def resolve(cfg: FinetuneConfig, run_dir: Path) -> BaseRef:
    if cfg.base is None:
        vlm = checkpoint.newest(run_dir / "checkpoints" / "vlm")  # the run built a VLM: tune that
        if vlm is not None:
            return resolve(cfg.model_copy(update={"base": str(vlm)}), run_dir)
        ckpt = checkpoint.newest(run_dir / "checkpoints" / "pretrain")
        if ckpt is None:
            raise TrainingError(
                f"finetune.base is not set and {run_dir} has no pretraining checkpoint: "
                "pretrain first, or name a model in finetune.base"
            )
        return BaseRef(str(ckpt), str(run_dir / "tokenizer"))
    found = locate(cfg.base, "finetune.base")
    if found.kind == "hub":
        return BaseRef(cfg.base, cfg.base)
    path = Path(found.path)
    if found.kind == "hf-dir":  # a Hugging Face directory, or a release's model/
        return BaseRef(str(path), str(path))
    if (path / "adapter.safetensors").exists():
        state = checkpoint.read_state(path)
        inner = resolve(cfg.model_copy(update={"base": state["base"]}), run_dir)
        return BaseRef(inner.model, str(checkpoint.tokenizer_dir(path) or inner.tokenizer), adapter=path)
    tokenizer = checkpoint.tokenizer_dir(path) if (path / "state.json").exists() else path
    if tokenizer is None:
        raise TrainingError(f"finetune.base: no tokenizer found for checkpoint {path}")
    return BaseRef(str(path), str(tokenizer))


def load_tokenizer(ref: BaseRef):
    from transformers import AutoTokenizer

    with loading(ref.tokenizer, "tokenizer", "finetune.base"):
        tok = AutoTokenizer.from_pretrained(ref.tokenizer)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def default_targets(model: torch.nn.Module) -> list[str]:
    """Every linear layer of attention and MLP blocks, by leaf name: not the output layer, and not
    mixture-of-experts routers (adapting a router changes which experts run, not what they do)."""
    out_layer = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is out_layer:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("mlp.gate") or "router" in leaf:
            continue
        names.add(leaf)
    return sorted(names)


class _Auto:
    """transformers' Auto class for the head: the causal LM, or a one-label sequence classifier."""

    def __init__(self, head: str):
        self.head = head

    def from_pretrained(self, name: str, **kw) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        if self.head == "vlm":
            from trulyopen.vlm.model import load_model as load_vlm

            return load_vlm(name, **kw)
        if self.head == "reward":
            return AutoModelForSequenceClassification.from_pretrained(name, num_labels=1, **kw)
        return AutoModelForCausalLM.from_pretrained(name, **kw)


def load_model(
    ref: BaseRef, cfg: FinetuneConfig, compute_dtype: torch.dtype, device: torch.device, head: str = "lm"
) -> torch.nn.Module:
    """The base (fp32 master weights, or 4-bit NF4 for QLoRA), with an adapter when asked, on `device`.
    head "reward": the same backbone with a new scalar head (a sequence classifier of one label);
    "vlm": a vision-language model, its parts trained or adapted as `finetune.vision` says."""
    auto = _Auto(head)
    kwargs: dict = {"dtype": torch.float32, "device_map": {"": device}}
    if cfg.adapter == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            # a VLM's vision tower and projector stay in full precision (and the head, as it does anyway)
            llm_int8_skip_modules=vlm_skip_modules(ref.model) if head == "vlm" else None,
        )
    if ref.adapter is not None:  # merge the earlier adapter in full precision, then quantise if asked
        with loading(ref.model, "model", "finetune.base"):
            model = merged(ref.adapter, auto.from_pretrained(ref.model, dtype=torch.float32))
        if cfg.adapter == "qlora":
            raise TrainingError(
                "finetune.base: QLoRA on an adapter checkpoint: export it first, then use that"
            )
    else:
        with loading(ref.model, "model", "finetune.base"):
            model = auto.from_pretrained(ref.model, **kwargs)
    if cfg.adapter == "none":
        if head == "vlm":
            from trulyopen.vlm.model import set_trainable

            set_trainable(model, list(cfg.vision.train))
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.adapter == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = cfg.lora
    if head == "vlm":
        from trulyopen.vlm.model import lora_target_modules

        targets = lora.target_modules or lora_target_modules(model, list(cfg.vision.lora_targets))
    else:
        targets = lora.target_modules or default_targets(model)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type="SEQ_CLS" if head == "reward" else "CAUSAL_LM",  # SEQ_CLS also trains the new head
    )
    return get_peft_model(model, config)


def vlm_skip_modules(name: str) -> list[str]:
    """The modules of a VLM that 4-bit quantisation leaves alone, found on an empty copy of it."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from trulyopen.vlm.model import skip_modules

    with torch.device("meta"):
        return skip_modules(AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(name)))


def with_adapter(adapter_ckpt: Path, base_model: torch.nn.Module) -> torch.nn.Module:
    """A peft model: `base_model` with the adapter of a trulyopen adapter checkpoint loaded."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    state = checkpoint.read_state(adapter_ckpt)
    model = get_peft_model(base_model, LoraConfig(**state["lora_config"]))
    result = model.load_state_dict(load_file(str(adapter_ckpt / "adapter.safetensors")), strict=False)
    if result.unexpected_keys:
        raise TrainingError(
            f"{adapter_ckpt}: adapter weights do not fit the base: {result.unexpected_keys[:3]}"
        )
    model.peft_config["default"].base_model_name_or_path = state["base"]
    return model


def base_of(adapter_ckpt: Path) -> torch.nn.Module:
    """The full-precision model an adapter checkpoint was trained on (merging earlier adapters)."""
    from transformers import AutoModelForCausalLM

    from trulyopen.vlm.model import is_vlm_model, load_model

    base = checkpoint.read_state(adapter_ckpt)["base"]
    if (Path(base) / "adapter.safetensors").exists():
        return merged(Path(base), base_of(Path(base)))
    if is_vlm_model(base):
        return load_model(base, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def merged(adapter_ckpt: Path, base_model: torch.nn.Module) -> torch.nn.Module:
    """`base_model` with the adapter of a trulyopen adapter checkpoint merged into its weights."""
    return with_adapter(adapter_ckpt, base_model).merge_and_unload()


def lora_config_dict(model: torch.nn.Module) -> dict:
    """The adapter's peft LoraConfig as plain JSON (what `merged` rebuilds it from)."""
    config = model.peft_config["default"].to_dict()
    keep = ("r", "lora_alpha", "lora_dropout", "target_modules", "task_type", "bias")
    out = {k: config[k] for k in keep if k in config}
    out["target_modules"] = sorted(out["target_modules"])
    return out


def load_teacher(name: str, student_tok, device: torch.device) -> torch.nn.Module:
    """A distillation teacher (a checkpoint, Hugging Face directory or hub name), frozen, refused
    unless its tokenizer is the student's: the losses compare distributions token id by token id."""
    from transformers import AutoModelForCausalLM

    found = locate(name, "finetune.distill.teacher")
    path = Path(found.path) if found.kind != "hub" else None
    if path is not None and (path / "adapter.safetensors").exists():
        raise TrainingError(f"finetune.distill.teacher: {path} is an adapter checkpoint; export it first")
    tok_dir = (checkpoint.tokenizer_dir(path) if path and (path / "state.json").exists() else None) or name
    teacher_tok = load_tokenizer(BaseRef(name, str(tok_dir)))
    ours, theirs = student_tok.get_vocab(), teacher_tok.get_vocab()
    if ours != theirs:
        diff = next((t for t in sorted(set(ours) | set(theirs)) if ours.get(t) != theirs.get(t)), None)
        raise TrainingError(
            f"finetune.distill.teacher: {name} has another tokenizer than the student "
            f"({len(theirs):,} tokens against {len(ours):,}; {diff!r} is {theirs.get(diff)} against "
            f"{ours.get(diff)}); distillation compares distributions token by token, so both must be one"
        )
    with loading(name, "teacher model", "finetune.distill.teacher"):
        model = AutoModelForCausalLM.from_pretrained(str(path or name), dtype=torch.float32)
    return model.to(device).eval().requires_grad_(False)
