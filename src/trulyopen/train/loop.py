"""The training loop, one for every objective (pretraining, SFT, DPO, GRPO, ...), read top to bottom.

    wrap the model for the world (DDP, FSDP2) ─► optimizer ─► resume from the newest checkpoint, if any
    for each step:
        learning rate from the schedule (a function of the step)
        the objective's batch for the step; this rank takes micro-batches rank::world
        for each micro-batch:   (gradient accumulation)
            forward in the step's precision, the objective's loss, backward
            (bf16: bf16 weights, fp32 master weights and gradient sums; see train/precision.py)
        clip the gradient norm; skip or stop on a NaN loss; optimizer step
        metrics line; validation every eval_every; checkpoint every checkpoint_every

A stage (train/pretrain.py, finetune/stage.py) builds the model and the objective and hands them
over in a `Job`; everything else is here, the same for all. The batch of a step comes from the
objective, the schedule from the step, the state from the checkpoint: so a run killed at any point
and resumed ends with the same bits as one that never stopped, and 1 or N processes follow the
same trajectory (to rounding).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trulyopen.ledger import Ledger, code_version, file_record
from trulyopen.progress import Progress
from trulyopen.recipe import LoopConfig
from trulyopen.train import TrainingError, checkpoint, cpu_attention, cpu_dropout, distributed, fused_lora
from trulyopen.train import metrics as metrics_log
from trulyopen.train.compiled import compile_for_training
from trulyopen.train.distributed import World
from trulyopen.train.layout import StagePaths
from trulyopen.train.loader import DataMismatchError
from trulyopen.train.metrics import MetricsLog
from trulyopen.train.objectives import Micro, Objective
from trulyopen.train.optim import make_optimizer
from trulyopen.train.precision import (
    MasterWeights,
    autocast_for,
    peak_flops,
    peak_memory_mb,
    reuse_freed_memory,
)
from trulyopen.train.schedule import learning_rate


@dataclass
class Job:
    """What a stage hands the loop."""

    paths: StagePaths  # the run and the stage: checkpoints/<stage>/, <stage>/metrics.jsonl, ledger entries
    cfg: LoopConfig
    model: torch.nn.Module  # built, on the world's device; its trainable parameters require grad
    objective: Objective
    dtype: torch.dtype
    config_hash: str  # a checkpoint of another config is not resumed
    data_fingerprint: str  # nor one trained on other data
    state: Callable[[int], dict] = lambda step: {}  # what the stage adds to each checkpoint's state.json
    adapter: bool = False  # checkpoints hold the trainable parameters only
    files: Path | None = None  # a folder copied into every checkpoint (a VLM's processor files)
    flops_per_token: float | None = None  # for MFU, where known
    label: str = ""  # the progress bar's name (default: the stage)
    extra: dict = field(default_factory=dict)  # not used by the loop; for the stage's own bookkeeping


def train(job: Job, world: World, stop_at: int | None = None) -> Path:
    """Train, checkpointing as it goes; return the final checkpoint's directory. `stop_at` ends the
    run early, with a checkpoint, at that step (the schedule still spans max_steps): `verify
    --replay` retrains one stretch this way."""
    cfg, model, objective, paths = job.cfg, job.model, job.objective, job.paths
    stage, run_dir = paths.stage, paths.run_dir
    device = world.device
    say = print if world.main else (lambda *a, **k: None)
    # wrap before making the optimizer: FSDP2 shards the parameters in place
    train_model = distributed.wrap(model, cfg.distributed, world)
    optimizer = make_optimizer(model, cfg)
    train_model = compile_for_training(train_model, model) if cfg.compile else train_model
    trainable = [p for p in model.parameters() if p.requires_grad]
    autocast = autocast_for(device, job.dtype)
    # bf16 in one process: bf16 weights for the passes, fp32 masters otherwise; under torchrun DDP and
    # FSDP own the parameters, so autocast does the casting there. Autocast stays on in both cases,
    # for what an objective runs beside the model (a reference, a teacher), which keeps fp32 weights.
    low = job.dtype != torch.float32 and world.size == 1
    weights = MasterWeights(model, job.dtype).computing if low else contextlib.nullcontext
    if device.type == "cpu":
        reuse_freed_memory()  # each step's activations in pages the last one faulted in, not fresh ones
        cpu_dropout.install(model)  # LoRA's dropout masks drawn in bulk, not one element at a time
        fused_lora.install(model)  # each adapted Linear in one pass: peft's separate modules cost more
    peak, _ = peak_flops(device, job.dtype)
    ledger = Ledger(run_dir)
    end = stop_at or cfg.max_steps

    # Resume from the newest complete checkpoint, if this run has one.
    start = 0
    last_ckpt = checkpoint.newest(paths.checkpoints)
    if last_ckpt is not None:
        # the config first: weights of another model shape would fail to load with a worse message
        if checkpoint.read_state(last_ckpt)["config_hash"] != job.config_hash:
            raise TrainingError(
                f"{last_ckpt}: made with another model or {stage} config; to start over with this one, "
                f"use --force {stage} (its checkpoints are then deleted) or a new --run-dir"
            )
        state = checkpoint.load(last_ckpt, model, optimizer)
        if state["data_fingerprint"] != job.data_fingerprint:
            raise DataMismatchError(
                f"{last_ckpt}: trained on data {state['data_fingerprint'][:16]}, but the run's data is "
                f"{job.data_fingerprint[:16]}; use a new run directory (--run-dir) or --force {stage}"
            )
        start = state["step"]
        say(f"{stage}: resuming from {last_ckpt.name} (step {start})")
    if world.main:
        metrics_log.keep_until(paths.metrics, start)

    def save(step: int) -> Path:
        state = {
            "stage": stage,
            **job.state(step),
            "data_fingerprint": job.data_fingerprint,
            "config_hash": job.config_hash,
            "code_version": code_version(),
            "seed": cfg.seed,
        }
        path = checkpoint.save(
            paths.checkpoints, step, model, optimizer, state, world, adapter=job.adapter, files=job.files
        )
        if world.main:
            ledger.append(
                {
                    "stage": f"{stage}/checkpoint",
                    "step": step,
                    "config_hash": job.config_hash,
                    "outputs": [file_record(f, run_dir) for f in sorted(path.iterdir())],
                }
            )
            checkpoint.thin(paths.checkpoints, cfg.checkpoint_every * cfg.keep_every)
        distributed.barrier(world)
        return path

    model.train()
    last_good = last_ckpt
    log_path = paths.metrics if world.main else Path(os.devnull)
    sinks = cfg.log_to if world.main else []
    with (
        MetricsLog(log_path, sinks, run_dir.name, cfg.model_dump(mode="json")) as metrics,
        Progress(job.label or stage, end - start, "steps", quiet=not world.main) as bar,
    ):
        for step in range(start, end):
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
            # every rank's gradient is its share of the step's sum / denominator; DDP and FSDP average
            # over ranks, so scale by the world size to get the sum over all of them
            scale = world.size / sb.denominator
            with weights(), cpu_attention.for_training(model, device, job.dtype):
                for micro in mine(sb.micros, world):
                    with autocast():
                        loss, stats = objective.loss(train_model, micro, device)
                    (loss * (scale * micro.weight)).backward()
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v * micro.weight
            sums = distributed.sum_stats(sums, world)
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                if cfg.grad_clip
                else torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
            )
            if hasattr(grad_norm, "full_tensor"):  # FSDP2 gives a DTensor
                grad_norm = grad_norm.full_tensor()
            grad_norm = float(grad_norm)
            summary = objective.summary(sums, sb)
            if not (math.isfinite(summary["loss"]) and math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                what = f"loss {summary['loss']}, gradient norm {grad_norm}"
                if cfg.on_nan == "stop":
                    where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint yet"
                    raise TrainingError(f"{stage}: not finite at step {step + 1} ({what}); {where}")
                say(f"{stage}: step {step + 1}: {what}: step skipped ({stage}.on_nan = skip)")
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - t0
            tokens = sum(m.tokens for m in sb.micros)  # real tokens, padding not counted
            record = {
                "step": step + 1,
                **rounded(summary),
                "lr": lr,
                "grad_norm": round(grad_norm, 6),
                "tokens_per_s": round(tokens / seconds, 1),
            }
            if job.flops_per_token:
                flops = job.flops_per_token * tokens / seconds
                record.update(flops_per_s=round(flops), mfu=round(flops / (peak * world.size), 4))
            record["peak_memory_mb"] = round(peak_memory_mb(device), 1)
            done = step + 1
            if done % cfg.eval_every == 0 or done == cfg.max_steps:
                model.eval()  # every rank validates: a sharded model needs all ranks for a forward
                with autocast():
                    record.update(rounded(objective.validate(model, device)))
                model.train()
            metrics.write(record)
            bar.update(1)
            if done % cfg.checkpoint_every == 0 or done in (cfg.max_steps, stop_at):
                last_good = save(done)
    return checkpoint.path_for(paths.checkpoints, end)


def mine(micros: list[Micro], world: World) -> list[Micro]:
    """This rank's micro-batches: rank::world, made up to the same count on every rank with filler
    passes of weight 0 (FSDP and DDP need every rank to run as many forward and backward passes)."""
    if world.size == 1:
        return micros
    share = micros[world.rank :: world.size]
    rounds = -(-len(micros) // world.size)
    filler = Micro(micros[0].batch, micros[0].extra, tokens=0, weight=0.0)
    return share + [filler] * (rounds - len(share))


def rounded(values: dict) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in values.items()}
