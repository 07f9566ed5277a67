"""The post-training stage: the base model, the records and the objective, handed to the loop.

    resolve the base model and its tokenizer ─► read, check and tokenise the records
    build the model (full weights, or an adapter on a frozen or 4-bit base)
    the objective (train/objectives/): sft, dpo, kto, orpo, simpo, reward, distill or grpo, with what it
                   needs beside the records (a reference, a teacher, a reward model, a tool environment)
    a vision-language model (vlm/): its processor, records with images, sft or dpo on unpacked rows
    train/loop.py: resume, steps, metrics, checkpoints (DDP or FSDP2 under torchrun, as pretraining)

Checkpoints, metrics and ledger entries are written as in pretraining; an adapter run's
checkpoints hold the adapter only and name their base.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch

from trulyopen.data.sources import DataError
from trulyopen.errors import warn
from trulyopen.files import sha256_file, write_json
from trulyopen.finetune import base as bases
from trulyopen.finetune.records import Example, read_examples
from trulyopen.finetune.render import ChatRenderer, item_of
from trulyopen.ledger import config_hash
from trulyopen.recipe import FinetuneConfig, FinetuneDataConfig
from trulyopen.train import TrainingError, distributed
from trulyopen.train.layout import StagePaths
from trulyopen.train.loop import Job, train
from trulyopen.train.losses import reference_logps
from trulyopen.train.objectives.distill import Distill
from trulyopen.train.objectives.grpo import GRPO, Prompt
from trulyopen.train.objectives.preference import DPO, KTO, ORPO, SimPO
from trulyopen.train.objectives.reward import RewardModel, RewardScorer
from trulyopen.train.objectives.sft import SFT
from trulyopen.train.packing import IGNORE, Item
from trulyopen.train.precision import choose_dtype, dtype_name
from trulyopen.vlm import model as vlm_model
from trulyopen.vlm.images import Limits
from trulyopen.vlm.objectives import VlmDPO, VlmSFT
from trulyopen.vlm.render import METHODS as VLM_METHODS
from trulyopen.vlm.render import VlmRenderer, image_refs

PAIRS = "preference.jsonl"
TEXT_MODEL_IMAGES = "has images, but finetune.base is a text model (not a vision-language model)"
SYNTH_FILE = {"sft": "sft.jsonl", "distill": "sft.jsonl", "grpo": "grpo.jsonl"}  # the rest: PAIRS
SYNTH_EXTRA = {"sft": ("tools.jsonl",)}  # also trained with the method when the synth stage made them


@dataclass
class FinetunePaths(StagePaths):
    stage: ClassVar[str] = "finetune"

    @property
    def records(self) -> Path:
        return self.stage_dir / "records.json"  # counts, and every bad record with file and line

    @property
    def tokenizer(self) -> Path:
        return self.stage_dir / "tokenizer"

    @property
    def synth(self) -> Path:
        return self.run_dir / "synth"


def data_sources(cfg: FinetuneConfig, paths: FinetunePaths) -> list[FinetuneDataConfig]:
    """The recipe's data, or what the synth stage made for this method (for sft: its instruction
    pairs, and its tool-use conversations when it made them), and for sft the vlm stage's
    instructions about pictures of code lines when it made them."""
    if cfg.data:
        return cfg.data
    made = [
        paths.synth / name for name in (SYNTH_FILE.get(cfg.method, PAIRS), *SYNTH_EXTRA.get(cfg.method, ()))
    ]
    if cfg.method == "sft":
        made.append(paths.run_dir / "vlm" / "data" / "instructions.jsonl")
    if not any(p.exists() for p in made):
        raise DataError(
            f"finetune.data is empty and the synth stage has not made {made[0]}: "
            f"list files in finetune.data, or add a synth section that makes {cfg.method} data"
        )
    return [FinetuneDataConfig(path=p) for p in made if p.exists()]


def in_val(example_id: str, fraction: float) -> bool:
    """A record goes to validation by a hash of its id: stable across runs, machines and file order."""
    h = int.from_bytes(hashlib.sha256(example_id.encode()).digest()[:8], "little")
    return h / 2**64 < fraction


def finetune(
    cfg: FinetuneConfig,
    paths: FinetunePaths,
    fresh: bool = False,
    stop_at: int | None = None,
    recipe_hash: str | None = None,
) -> Path:
    """Post-train, checkpointing as it goes; return the final checkpoint's directory. `stop_at` ends
    it early with a checkpoint at that step (`verify --replay`). `recipe_hash` is what checkpoints
    record as their recipe's hash (default: cfg's): a stage that derives cfg from its own section
    (vlm) passes that section's, which its ledger entry records."""
    world = distributed.init()
    torch.manual_seed(cfg.seed)
    device = world.device
    say = print if world.main else (lambda *a, **k: None)
    dtype = choose_dtype(cfg.precision, device)
    if fresh and world.main:
        shutil.rmtree(paths.checkpoints, ignore_errors=True)
        paths.metrics.unlink(missing_ok=True)
        (paths.stage_dir / "reference_logps.safetensors").unlink(missing_ok=True)

    # The base model's tokenizer (a VLM's whole processor), kept with the run so its checkpoints
    # export on their own.
    ref = bases.resolve(cfg, paths.run_dir)
    processor = vlm_model.load_processor(ref.tokenizer) if vlm_model.is_vlm_model(ref.model) else None
    tok = processor.tokenizer if processor is not None else bases.load_tokenizer(ref)
    if not paths.tokenizer.exists() and world.main:
        tmp = paths.tokenizer.with_name("tokenizer.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if processor is not None:
            vlm_model.save_processor(processor, tmp)
        else:
            tok.save_pretrained(str(tmp))
        tmp.rename(paths.tokenizer)
    renderer = ChatRenderer(tok, cfg.chat_template or getattr(processor, "chat_template", None))
    vision = None
    if processor is not None:
        limits = Limits(max_bytes=cfg.vision.max_image_bytes, max_pixels=cfg.vision.max_image_pixels)
        vision = VlmRenderer(processor, renderer, limits)

    # Records: read and checked, then tokenised; too long is a bad record like any other.
    sources = data_sources(cfg, paths)
    examples, bad = read_examples(sources, cfg.method, cfg.on_bad_record)
    if cfg.method == "kto":
        examples = unpair(examples)
    n_records = len(examples) + len(bad)
    if vision is not None:
        if cfg.method not in VLM_METHODS:
            raise TrainingError(
                f"finetune.method {cfg.method}: a vision-language model (finetune.base) trains with "
                + " or ".join(VLM_METHODS)
            )
        items = vision.build(examples, cfg.method, cfg.seq_len)
    else:  # a text model: a record with images is a bad record, not a list printed into its text
        items = [
            TEXT_MODEL_IMAGES
            if image_refs(ex.messages)
            else build_items(renderer, [ex], cfg.method, cfg.seq_len)[0]
            for ex in examples
        ]
    for i, (ex, it) in enumerate(zip(examples, items, strict=True)):
        if it is None or isinstance(it, str):  # too long, or what is wrong with it (a bad image)
            why = it or f"longer than finetune.seq_len ({cfg.seq_len} tokens)"
            if cfg.on_bad_record == "stop":
                raise DataError(f"{ex.where}: {why} (finetune.on_bad_record is stop)")
            bad.append({"where": ex.where, "reason": why})
            items[i] = None
    first = "; ".join(f"{b['where']}: {b['reason']}" for b in bad[:3]) + ("; ..." if len(bad) > 3 else "")
    if bad and world.main:
        warn(f"finetune: {len(bad):,} bad records skipped ({first}); all of them in {paths.records}")
    kept = [(ex, it) for ex, it in zip(examples, items, strict=True) if it is not None]
    train_items = [it for ex, it in kept if not in_val(ex.id, cfg.val_fraction)]
    val = [it for ex, it in kept if in_val(ex.id, cfg.val_fraction)]
    if not train_items:
        raise DataError(
            f"finetune: no usable training records in {', '.join(str(s.path or s.dataset) for s in sources)}"
            + (f" (all {len(bad):,} bad: {first})" if bad else "")
            + "; fix the records or finetune.data"
        )
    if world.main:
        write_json(
            paths.records, {"records": n_records, "train": len(train_items), "val": len(val), "bad": bad}
        )
    data_files = [s.path for s in sources if s.path is not None and s.path.is_file()]
    fingerprint = hashlib.sha256("".join(sha256_file(p) for p in data_files).encode()).hexdigest()

    # The model: full weights, or a LoRA adapter on a frozen (QLoRA: 4-bit) base.
    head = "vlm" if vision is not None else "reward" if cfg.method == "reward" else "lm"
    model = bases.load_model(ref, cfg, dtype, device, head=head)
    model.train()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    say(
        f"finetune: {cfg.method}{'' if cfg.adapter == 'none' else ' + ' + cfg.adapter} on {ref.model}; "
        f"{len(train_items):,} train and {len(val):,} val records ({len(bad)} bad); "
        f"training {n_train / 1e6:.2f}M of {n_all / 1e6:.2f}M parameters, {dtype_name(dtype)}"
        + (f", {world.size} processes ({cfg.distributed})" if world.size > 1 else "")
    )
    objective = make_objective(cfg, model, tok, vision or renderer, train_items, val, paths, world)

    def state(step: int) -> dict:
        extra = {
            "method": cfg.method,
            "base": ref.model if ref.adapter is None else str(ref.adapter),
            "tokenizer": str(paths.tokenizer.relative_to(paths.run_dir)),
            "bad_records": len(bad),
        }
        if cfg.adapter != "none":
            extra["lora_config"] = bases.lora_config_dict(model)
        return extra

    job = Job(paths, cfg, model, objective, dtype, recipe_hash or config_hash(cfg), fingerprint, state)
    job.adapter, job.label = cfg.adapter != "none", f"finetune {cfg.method}"
    job.files = paths.tokenizer if vision is not None else None  # a VLM checkpoint loads on its own
    return train(job, world, stop_at)


def make_objective(
    cfg: FinetuneConfig, model, tok, renderer: ChatRenderer | VlmRenderer, train_items, val, paths, world
):
    """The objective of `cfg.method`, with what it needs beside the records (a reference, a teacher,
    a reward model, a tool environment); a VLM's (its renderer a VlmRenderer) takes rows with images."""
    pad_id, device = tok.pad_token_id, world.device
    method = cfg.method
    vision = isinstance(renderer, VlmRenderer)
    if method == "sft":
        return VlmSFT(cfg, train_items, val, renderer) if vision else SFT(cfg, train_items, val, pad_id)
    if method == "dpo":
        cache = paths.stage_dir / "reference_logps.safetensors"
        if vision:
            objective = VlmDPO(cfg, train_items, val, renderer, cache)
        else:
            objective = DPO(cfg, train_items, val, pad_id, cache)
        for turn in (True, False):  # before any update; rank 0 writes the cache, the others read it
            if world.main == turn:
                objective.prepare(reference_logps(model, frozen_copy=False), device)
            distributed.barrier(world)
        return objective
    if method in ("orpo", "simpo", "reward"):
        return {"orpo": ORPO, "simpo": SimPO, "reward": RewardModel}[method](cfg, train_items, val, pad_id)
    if method == "kto":
        return KTO(cfg, train_items, val, pad_id, reference_logps(model, frozen_copy=True))
    if method == "distill":
        teacher = bases.load_teacher(cfg.distill.teacher, tok, device)
        return Distill(cfg, train_items, val, pad_id, teacher, renderer.stop_ids())
    g = cfg.grpo
    reference = reference_logps(model, frozen_copy=True) if g.kl_coef else None
    scorer = RewardScorer(g.reward_model, device, pad_id) if g.reward_model else None
    return GRPO(
        cfg,
        train_items,
        val,
        tok.decode,
        renderer.stop_ids(),
        pad_id,
        reference,
        tool_turn=renderer.tool_turn if g.tools else None,
        reward_model=scorer,
    )


def build_items(renderer: ChatRenderer, examples: list[Example], method: str, seq_len: int) -> list:
    """Tokenised items per example (None for one longer than seq_len) for the objective; KTO's
    preference pairs become two examples each (see `unpair`)."""
    out = []
    for ex in examples:
        if method == "sft":
            it = item_of(renderer.conversation(ex.messages, ex.tools))
            out.append(it if len(it) <= seq_len else None)
        elif method == "distill":
            it = item_of(renderer.conversation(ex.messages, ex.tools))
            last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
            prompt = renderer.prompt(ex.messages[:last], ex.tools)
            out.append((it, prompt) if len(it) <= seq_len else None)
        elif method in ("dpo", "orpo", "simpo", "reward"):
            chosen, rejected = (
                renderer.reply(ex.messages, ex.chosen),
                renderer.reply(ex.messages, ex.rejected),
            )
            if method == "reward":  # the whole sequence: the score is read at its last token
                pair = (whole(chosen.ids), whole(rejected.ids))
            else:
                pair = (item_of(chosen), item_of(rejected))
            out.append(pair if max(len(pair[0]), len(pair[1])) <= seq_len else None)
        elif method == "kto":
            it = item_of(renderer.reply(ex.messages, ex.chosen))
            out.append((it, bool(ex.label)) if len(it) <= seq_len else None)
        else:
            from trulyopen.rewards.verifiers import parse_verifier

            ids = renderer.prompt(ex.messages)
            out.append(Prompt(ids, parse_verifier(ex.verifier)) if len(ids) < seq_len else None)
    return out


def whole(ids: list[int]) -> Item:
    return Item(ids, [IGNORE] * len(ids))


def unpair(examples: list[Example]) -> list[Example]:
    """KTO reads preference pairs as two unpaired examples: the chosen reply desirable, the rejected
    not (TRL's unpair_preference_dataset)."""
    out = []
    for ex in examples:
        if ex.label is not None:
            out.append(ex)
            continue
        out.append(replace(ex, id=f"{ex.id}/chosen", label=True))
        out.append(replace(ex, id=f"{ex.id}/rejected", chosen=ex.rejected, rejected="", label=False))
    return out
