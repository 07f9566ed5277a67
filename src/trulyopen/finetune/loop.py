"""The post-training loop, readable top to bottom; the objective (objectives.py) is the only part
that differs between SFT, DPO and GRPO.

    resolve the base model and its tokenizer ─► read, check and tokenise the records
    build the model (full weights, or an adapter on a frozen or 4-bit base)
    DPO: the reference's log-probabilities, once, into a cache file (before any update)
    resume from the newest checkpoint, if any
    for each step:
        learning rate from the schedule
        the objective's batch for this step (GRPO: sample and score a group per prompt)
        for each micro-batch: forward under autocast, the objective's loss, backward
        clip the gradient norm; skip or stop on a NaN loss; optimizer step
        metrics line; validation every eval_every; checkpoint every checkpoint_every

Checkpoints, metrics and ledger entries are written as in pretraining; an adapter run's
checkpoints hold the adapter only and name their base.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trulyopen.data.sources import DataError
from trulyopen.errors import warn
from trulyopen.files import sha256_file, write_json
from trulyopen.finetune import base as bases
from trulyopen.finetune.objectives import DPO, GRPO, SFT, build_items, reference_logps
from trulyopen.finetune.records import read_examples
from trulyopen.finetune.render import ChatRenderer
from trulyopen.ledger import Ledger, code_version, config_hash, file_record
from trulyopen.progress import Progress
from trulyopen.recipe import FinetuneConfig, FinetuneDataConfig
from trulyopen.train import TrainingError, checkpoint
from trulyopen.train import metrics as metrics_log
from trulyopen.train.metrics import MetricsLog
from trulyopen.train.optim import make_optimizer
from trulyopen.train.precision import autocast_for, choose_dtype, dtype_name, peak_memory_mb
from trulyopen.train.schedule import learning_rate

SYNTH_FILE = {"sft": "sft.jsonl", "dpo": "preference.jsonl", "grpo": "grpo.jsonl"}
SYNTH_EXTRA = {"sft": ("tools.jsonl",)}  # also trained with the method when the synth stage made them


@dataclass
class FinetunePaths:
    run_dir: Path

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints" / "finetune"

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / "finetune"

    @property
    def metrics(self) -> Path:
        return self.stage_dir / "metrics.jsonl"

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
    pairs, and its tool-use conversations when it made them)."""
    if cfg.data:
        return cfg.data
    made = [paths.synth / name for name in (SYNTH_FILE[cfg.method], *SYNTH_EXTRA.get(cfg.method, ()))]
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


def finetune(cfg: FinetuneConfig, paths: FinetunePaths, fresh: bool = False) -> Path:
    """Post-train, checkpointing as it goes; return the final checkpoint's directory."""
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = choose_dtype(cfg.precision, device)
    if fresh:
        shutil.rmtree(paths.checkpoints, ignore_errors=True)
        paths.metrics.unlink(missing_ok=True)
        (paths.stage_dir / "reference_logps.safetensors").unlink(missing_ok=True)

    # The base model's tokenizer, kept with the run so its checkpoints export on their own.
    ref = bases.resolve(cfg, paths.run_dir)
    tok = bases.load_tokenizer(ref)
    if not paths.tokenizer.exists():
        tmp = paths.tokenizer.with_name("tokenizer.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(str(tmp))
        tmp.rename(paths.tokenizer)
    renderer = ChatRenderer(tok, cfg.chat_template)

    # Records: read and checked, then tokenised; too long is a bad record like any other.
    sources = data_sources(cfg, paths)
    examples, bad = read_examples(sources, cfg.method, cfg.on_bad_record)
    n_records = len(examples) + len(bad)
    items = build_items(renderer, examples, cfg.method, cfg.seq_len)
    for ex, it in zip(examples, items, strict=True):
        if it is None:
            why = f"longer than finetune.seq_len ({cfg.seq_len} tokens)"
            if cfg.on_bad_record == "stop":
                raise DataError(f"{ex.where}: {why} (finetune.on_bad_record is stop)")
            bad.append({"where": ex.where, "reason": why})
    first = "; ".join(f"{b['where']}: {b['reason']}" for b in bad[:3]) + ("; ..." if len(bad) > 3 else "")
    if bad:
        warn(f"finetune: {len(bad):,} bad records skipped ({first}); all of them in {paths.records}")
    kept = [(ex, it) for ex, it in zip(examples, items, strict=True) if it is not None]
    train = [it for ex, it in kept if not in_val(ex.id, cfg.val_fraction)]
    val = [it for ex, it in kept if in_val(ex.id, cfg.val_fraction)]
    if not train:
        raise DataError(
            f"finetune: no usable training records in {', '.join(str(s.path or s.dataset) for s in sources)}"
            + (f" (all {len(bad):,} bad: {first})" if bad else "")
            + "; fix the records or finetune.data"
        )
    write_json(paths.records, {"records": n_records, "train": len(train), "val": len(val), "bad": bad})
    data_files = [s.path for s in sources if s.path is not None and s.path.is_file()]
    fingerprint = hashlib.sha256("".join(sha256_file(p) for p in data_files).encode()).hexdigest()

    # The model: full weights, or a LoRA adapter on a frozen (QLoRA: 4-bit) base.
    model = bases.load_model(ref, cfg, dtype, device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train, n_all = sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())
    print(
        f"finetune: {cfg.method}{'' if cfg.adapter == 'none' else ' + ' + cfg.adapter} on {ref.model}; "
        f"{len(train):,} train and {len(val):,} val records ({len(bad)} bad); "
        f"training {n_train / 1e6:.2f}M of {n_all / 1e6:.2f}M parameters, {dtype_name(dtype)}"
    )
    pad_id = tok.pad_token_id
    if cfg.method == "sft":
        objective = SFT(cfg, train, val, pad_id)
    elif cfg.method == "dpo":
        objective = DPO(cfg, train, val, pad_id, paths.stage_dir / "reference_logps.safetensors")
        objective.prepare(reference_logps(model, frozen_copy=False), device)  # before any update
    else:
        reference = reference_logps(model, frozen_copy=True) if cfg.grpo.kl_coef else None
        objective = GRPO(cfg, train, val, renderer, pad_id, reference)
    optimizer = make_optimizer(model, cfg)
    train_model = torch.compile(model) if cfg.compile else model
    autocast = autocast_for(device, dtype)
    adapter = cfg.adapter != "none"
    chash = config_hash(cfg)
    ledger = Ledger(paths.run_dir)

    start = 0
    last_ckpt = checkpoint.newest(paths.checkpoints)
    if last_ckpt is not None:
        state = checkpoint.load(last_ckpt, model, optimizer)
        if state["config_hash"] != chash or state["data_fingerprint"] != fingerprint:
            raise TrainingError(
                f"{last_ckpt}: made with another finetune config or data; to start over, "
                "use --force finetune or a new --run-dir"
            )
        start = state["step"]
        print(f"finetune: resuming from {last_ckpt.name} (step {start})")
    metrics_log.keep_until(paths.metrics, start)

    def save(step: int) -> Path:
        state = {
            "stage": "finetune",
            "method": cfg.method,
            "base": ref.model if ref.adapter is None else str(ref.adapter),
            "tokenizer": str(paths.tokenizer.relative_to(paths.run_dir)),
            "data_fingerprint": fingerprint,
            "config_hash": chash,
            "code_version": code_version(),
            "seed": cfg.seed,
            "bad_records": len(bad),
        }
        if adapter:
            state["lora_config"] = bases.lora_config_dict(model)
        path = checkpoint.save(paths.checkpoints, step, model, optimizer, state, adapter=adapter)
        ledger.append(
            {
                "stage": "finetune/checkpoint",
                "step": step,
                "config_hash": chash,
                "outputs": [file_record(f, paths.run_dir) for f in sorted(path.iterdir())],
            }
        )
        checkpoint.thin(paths.checkpoints, cfg.checkpoint_every * cfg.keep_every)
        return path

    last_good = last_ckpt
    with (
        MetricsLog(paths.metrics, cfg.log_to, paths.run_dir.name, cfg.model_dump(mode="json")) as metrics,
        Progress(f"finetune {cfg.method}", cfg.max_steps - start, "steps") as bar,
    ):
        for step in range(start, cfg.max_steps):
            t0 = time.perf_counter()
            lr = learning_rate(
                step,
                cfg.max_steps,
                cfg.lr,
                cfg.warmup_steps,
                cfg.schedule,
                cfg.min_lr_ratio,
                cfg.decay_fraction,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            sb = objective.batch(step, model)
            sums: dict[str, float] = {}
            tokens = 0
            for micro in sb.micros:
                with autocast():
                    loss, stats = objective.loss(train_model, micro, device)
                (loss / sb.denominator).backward()
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                tokens += int((micro.batch.owner >= 0).sum())
            grad_norm = float(
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                if cfg.grad_clip
                else torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
            )
            record = objective.summary(sums, sb)
            if not (math.isfinite(record["loss"]) and math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                what = f"loss {record['loss']}, gradient norm {grad_norm}"
                if cfg.on_nan == "stop":
                    where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint yet"
                    raise TrainingError(f"finetune: not finite at step {step + 1} ({what}); {where}")
                print(f"finetune: step {step + 1}: {what}: step skipped (finetune.on_nan = skip)")
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - t0
            record = {
                "step": step + 1,
                **{k: round(v, 6) if isinstance(v, float) else v for k, v in record.items()},
                "lr": lr,
                "grad_norm": round(grad_norm, 6),
                "tokens_per_s": round(tokens / seconds, 1),  # real tokens, padding not counted
                "peak_memory_mb": round(peak_memory_mb(device), 1),
            }
            done = step + 1
            if done % cfg.eval_every == 0 or done == cfg.max_steps:
                model.eval()
                with autocast():
                    record.update({k: round(v, 6) for k, v in objective.validate(model, device).items()})
                model.train()
            metrics.write(record)
            bar.update(1)
            if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
                last_good = save(done)
    return checkpoint.path_for(paths.checkpoints, cfg.max_steps)
