"""The pretraining loop, readable top to bottom.

    build the model (preset or Hugging Face checkpoint) ─► resume from the newest checkpoint, if any
    for each step:
        learning rate from the schedule (a function of the step)
        for each micro-batch of this step's global batch:   (gradient accumulation)
            forward under autocast, cross-entropy (+ z-loss), backward
        clip the gradient norm; skip or stop on a NaN loss; optimizer step
        metrics line; validation bits-per-byte every eval_every; checkpoint every checkpoint_every

The batch of a step comes from `BatchPlan`, the schedule from the step, the state from the
checkpoint: so a run killed at any point and resumed ends with the same bits as one that never stopped.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trulyopen.errors import warn
from trulyopen.evaluate.bpb import bits_per_byte, token_bytes
from trulyopen.evaluate.runner import in_loop_metrics
from trulyopen.evaluate.taskfile import load_suite
from trulyopen.ledger import Ledger, code_version, config_hash, file_record
from trulyopen.model.build import count_params, flops_per_token, from_preset, from_pretrained
from trulyopen.model.presets import ModelSpecError, resolve_dims
from trulyopen.progress import Progress
from trulyopen.recipe import ModelConfig, PretrainConfig
from trulyopen.train import TrainingError, checkpoint, distributed
from trulyopen.train import metrics as metrics_log
from trulyopen.train.attention import document_attention
from trulyopen.train.loader import BatchPlan, DataMismatchError, TokenStream
from trulyopen.train.metrics import MetricsLog
from trulyopen.train.optim import make_optimizer
from trulyopen.train.precision import autocast_for, choose_dtype, dtype_name, peak_flops, peak_memory_mb
from trulyopen.train.schedule import learning_rate


def build_model(model_cfg: ModelConfig, vocab: int, seq_len: int, seed: int) -> torch.nn.Module:
    if model_cfg.init_from:
        model = from_pretrained(model_cfg.init_from, vocab)
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and seq_len > limit:
            raise ModelSpecError(
                f"pretrain.seq_len ({seq_len}) is beyond the {limit} positions of {model_cfg.init_from}"
            )
        return model
    dims = resolve_dims(model_cfg.size, model_cfg.dim_overrides())
    return from_preset(model_cfg.arch, dims, vocab, seq_len, seed, model_cfg.config_overrides)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to optimise, cross-entropy alone), both means over tokens; logits in fp32 for stability."""
    logits = logits.float().flatten(0, 1)
    ce = F.cross_entropy(logits, targets.flatten())
    if z_loss:
        return ce + z_loss * torch.logsumexp(logits, dim=-1).pow(2).mean(), ce
    return ce, ce


@dataclass
class Paths:
    run_dir: Path
    shards: Path
    tokenizer: Path

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints" / "pretrain"

    @property
    def metrics(self) -> Path:
        return self.run_dir / "pretrain" / "metrics.jsonl"


def pretrain(
    cfg: PretrainConfig, model_cfg: ModelConfig, paths: Paths, fresh: bool = False, stop_at: int | None = None
) -> Path:
    """Train, checkpointing as it goes; return the final checkpoint's directory.

    The run resumes from its newest checkpoint unless `fresh`, which deletes its checkpoints first.
    `stop_at` ends it early, with a checkpoint, at that step (the schedule still spans max_steps):
    `verify --replay` retrains one stretch this way.
    """
    world = distributed.init()
    torch.manual_seed(cfg.seed)  # the RNG state (dropout, checkpoints) must not depend on what ran before
    if fresh and world.main:
        shutil.rmtree(paths.checkpoints, ignore_errors=True)
        paths.metrics.unlink(missing_ok=True)
    distributed.barrier(world)
    device = world.device
    say = print if world.main else (lambda *a, **k: None)
    dtype = choose_dtype(cfg.precision, device)
    stream = TokenStream(paths.shards, "train")
    val = TokenStream(paths.shards, "val")
    batch_seqs = cfg.global_batch_tokens // cfg.seq_len
    if batch_seqs % world.size:
        raise TrainingError(
            f"pretrain.global_batch_tokens: {batch_seqs} sequences per step do not split evenly over "
            f"{world.size} processes"
        )
    plan = BatchPlan(stream, cfg.seq_len, batch_seqs, cfg.seed)
    epochs = cfg.max_steps / plan.steps_per_epoch
    if epochs > 1 and world.main:
        warn(
            f"pretrain: the training split ({len(stream):,} tokens) is smaller than the schedule "
            f"({cfg.max_steps} steps of {cfg.global_batch_tokens:,} tokens): each sequence is seen "
            f"{epochs:.1f} times; add data, or lower pretrain.max_steps"
        )
    validates = len(val) >= cfg.seq_len + 1
    if not validates and world.main:
        warn(
            f"pretrain: the validation split ({len(val):,} tokens) is shorter than one sequence of "
            f"{cfg.seq_len + 1}: no val_bpb is measured; raise data.split.val_fraction to get one"
        )
    nbytes = token_bytes(paths.tokenizer / "tokenizer.json")
    eval_tasks = load_suite(cfg.eval_suite) if cfg.eval_suite else []

    model = build_model(model_cfg, stream.vocab_size, cfg.seq_len, cfg.seed).to(device)
    params = count_params(model)
    fpt = flops_per_token(model, cfg.seq_len)
    active = params.active_non_embedding
    moe = f", {active / 1e6:.2f}M active per token" if active < params.non_embedding else ""
    say(
        f"pretrain: {model.config.model_type}, {params.total / 1e6:.2f}M parameters "
        f"({params.embedding / 1e6:.2f}M embedding, {params.non_embedding / 1e6:.2f}M non-embedding{moe}), "
        f"{fpt / 1e6:.1f} MFLOPs/token, {dtype_name(dtype)}, "
        f"{cfg.max_steps} steps of {cfg.global_batch_tokens:,} tokens"
        + (f", {world.size} processes ({cfg.distributed})" if world.size > 1 else "")
    )
    peak, peak_source = peak_flops(device, dtype)
    say(f"pretrain: peak {peak / 1e12:.3f} TFLOP/s per process ({peak_source}) for MFU")
    # wrap before making the optimizer: FSDP2 shards the parameters in place
    train_model = distributed.wrap(model, cfg.distributed, world)
    optimizer = make_optimizer(model, cfg)
    train_model = torch.compile(train_model) if cfg.compile else train_model
    autocast = autocast_for(device, dtype)
    ledger = Ledger(paths.run_dir)
    chash = config_hash(model_cfg, cfg)

    # Resume from the newest complete checkpoint, if this run has one.
    start = 0
    last_ckpt = checkpoint.newest(paths.checkpoints)
    if last_ckpt is not None:
        # the config first: weights of another model shape would fail to load with a worse message
        if checkpoint.read_state(last_ckpt)["config_hash"] != chash:
            raise TrainingError(
                f"{last_ckpt}: made with another model or pretrain config; to start over with this one, "
                "use --force pretrain (its checkpoints are then deleted) or a new --run-dir"
            )
        state = checkpoint.load(last_ckpt, model, optimizer)
        if state["data_fingerprint"] != stream.fingerprint:
            raise DataMismatchError(
                f"{last_ckpt}: trained on data {state['data_fingerprint'][:16]}, but the run's shards are "
                f"{stream.fingerprint[:16]}; use a new run directory (--run-dir) or --force pretrain"
            )
        start = state["step"]
        say(f"pretrain: resuming from {last_ckpt.name} (step {start})")
    if world.main:
        metrics_log.keep_until(paths.metrics, start)

    def save(step: int) -> Path:
        state = {
            "tokens_seen": step * cfg.global_batch_tokens,
            "data_fingerprint": stream.fingerprint,
            "config_hash": chash,
            "code_version": code_version(),
            "seed": cfg.seed,
        }
        path = checkpoint.save(paths.checkpoints, step, model, optimizer, state, world)
        if world.main:
            files = sorted(path.iterdir())
            ledger.append(
                {
                    "stage": "pretrain/checkpoint",
                    "step": step,
                    "config_hash": chash,
                    "outputs": [file_record(f, paths.run_dir) for f in files],
                }
            )
            checkpoint.thin(paths.checkpoints, cfg.checkpoint_every * cfg.keep_every)
        distributed.barrier(world)
        return path

    def validate() -> float:
        n = min(cfg.eval_sequences, len(val) // (cfg.seq_len + 1))
        L = cfg.seq_len + 1
        rows = np.stack([val.read(k * L, (k + 1) * L) for k in range(n)])
        batches = [rows[i : i + cfg.micro_batch_size] for i in range(0, n, cfg.micro_batch_size)]
        return bits_per_byte(train_model, batches, nbytes, autocast)  # every rank: FSDP needs all

    model.train()
    last_good = last_ckpt
    sinks = cfg.log_to if world.main else []
    log_path = paths.metrics if world.main else Path(os.devnull)
    with (
        MetricsLog(log_path, sinks, paths.run_dir.name, cfg.model_dump(mode="json")) as metrics,
        Progress("pretrain", (stop_at or cfg.max_steps) - start, "steps", quiet=not world.main) as bar,
    ):
        for step in range(start, stop_at or cfg.max_steps):
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
            rows = torch.from_numpy(plan.batch_tokens(step, world.rank, world.size))  # this rank's share
            loss_sum = torch.zeros((), device=device)
            for micro in rows.split(cfg.micro_batch_size):
                x, y = micro[:, :-1].to(device), micro[:, 1:].to(device)
                with autocast():
                    if cfg.document_masking:
                        mask, positions = document_attention(x, stream.eot_id)
                        logits = train_model(input_ids=x, attention_mask=mask, position_ids=positions).logits
                    else:
                        logits = train_model(input_ids=x).logits
                loss, ce = lm_loss(logits, y, cfg.z_loss)
                # weights make the gradient the mean over this rank's rows; DDP/FSDP average the ranks
                (loss * len(micro) / len(rows)).backward()
                loss_sum += ce.detach() * len(micro) / len(rows)
            loss_sum = distributed.mean(loss_sum, world)
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                if cfg.grad_clip
                else torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            )
            if hasattr(grad_norm, "full_tensor"):  # FSDP2 gives a DTensor
                grad_norm = grad_norm.full_tensor()
            train_loss = float(loss_sum)
            if not math.isfinite(train_loss) or not math.isfinite(float(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                what = f"loss {train_loss}, gradient norm {float(grad_norm)}"
                if cfg.on_nan == "stop":
                    where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint yet"
                    raise TrainingError(f"pretrain: not finite at step {step + 1} ({what}); {where}")
                say(f"pretrain: step {step + 1}: {what}: step skipped (pretrain.on_nan = skip)")
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - t0
            record = {
                "step": step + 1,
                "loss": round(train_loss, 6),
                "lr": lr,
                "grad_norm": round(float(grad_norm), 6),
                "tokens_seen": (step + 1) * cfg.global_batch_tokens,
                "tokens_per_s": round(cfg.global_batch_tokens / seconds, 1),
                "flops_per_s": round(fpt * cfg.global_batch_tokens / seconds),
                "mfu": round(fpt * cfg.global_batch_tokens / seconds / (peak * world.size), 4),
                "peak_memory_mb": round(peak_memory_mb(device), 1),
            }
            done = step + 1
            if done % cfg.eval_every == 0 or done == cfg.max_steps:
                if validates:
                    record["val_bpb"] = round(validate(), 6)
                if eval_tasks:  # every rank runs them: a sharded model needs all ranks for a forward
                    record.update(in_loop_metrics(train_model, paths.tokenizer, eval_tasks, autocast))
            metrics.write(record)
            bar.update(1)
            if done % cfg.checkpoint_every == 0 or done in (cfg.max_steps, stop_at):
                last_good = save(done)
    return checkpoint.path_for(paths.checkpoints, stop_at or cfg.max_steps)
