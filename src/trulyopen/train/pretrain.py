"""The pretraining stage: the model, the token shards and the causal LM objective, handed to the loop.

    build the model (preset or Hugging Face checkpoint) on this process's device
    the objective: rows of the shards in the order of `BatchPlan`, cross-entropy (+ z-loss);
                   validation bits per byte, and the task suite's metrics if the caller passes them
    train/loop.py: resume, steps, metrics, checkpoints

The batch of a step comes from `BatchPlan`, the schedule from the step, the state from the
checkpoint: so a run killed at any point and resumed ends with the same bits as one that never stopped.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from trulyopen.errors import warn
from trulyopen.ledger import config_hash
from trulyopen.model.build import count_params, flops_per_token, from_preset, from_pretrained
from trulyopen.model.presets import ModelSpecError, resolve_dims
from trulyopen.recipe import ModelConfig, PretrainConfig
from trulyopen.train import distributed
from trulyopen.train.bpb import bits_per_byte, token_bytes
from trulyopen.train.layout import StagePaths
from trulyopen.train.loader import BatchPlan, TokenStream
from trulyopen.train.loop import Job, train
from trulyopen.train.objectives.causal_lm import CausalLM
from trulyopen.train.precision import autocast_for, choose_dtype, dtype_name, peak_flops
from trulyopen.train.router_balance import RouterBalance


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


@dataclass
class Paths(StagePaths):
    shards: Path
    tokenizer: Path
    stage: ClassVar[str] = "pretrain"


InLoop = Callable[[torch.nn.Module, Callable], dict]  # (model, autocast) -> metrics, at each validation


def pretrain(
    cfg: PretrainConfig,
    model_cfg: ModelConfig,
    paths: Paths,
    fresh: bool = False,
    stop_at: int | None = None,
    in_loop: InLoop | None = None,
) -> Path:
    """Train, checkpointing as it goes; return the final checkpoint's directory.

    The run resumes from its newest checkpoint unless `fresh`, which deletes its checkpoints first.
    `stop_at` ends it early, with a checkpoint, at that step (the schedule still spans max_steps):
    `verify --replay` retrains one stretch this way. `in_loop` runs at each validation beside bits
    per byte (the caller makes it from pretrain.eval_suite: evaluation is a layer above training).
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
    plan = BatchPlan(stream, cfg.seq_len, batch_seqs, cfg.seed)
    epochs = cfg.max_steps / plan.steps_per_epoch
    if epochs > 1 and world.main:
        warn(
            f"pretrain: the training split ({len(stream):,} tokens) is smaller than the schedule "
            f"({cfg.max_steps} steps of {cfg.global_batch_tokens:,} tokens): each sequence is seen "
            f"{epochs:.1f} times; add data, or lower pretrain.max_steps"
        )
    if -(-batch_seqs // cfg.micro_batch_size) < world.size and world.main:
        warn(
            f"pretrain: {batch_seqs} sequences per step make fewer micro-batches of "
            f"{cfg.micro_batch_size} than there are processes ({world.size}): some only wait"
        )
    validates = len(val) >= cfg.seq_len + 1
    if not validates and world.main:
        warn(
            f"pretrain: the validation split ({len(val):,} tokens) is shorter than one sequence of "
            f"{cfg.seq_len + 1}: no val_bpb is measured; raise data.split.val_fraction to get one"
        )
    nbytes = token_bytes(paths.tokenizer / "tokenizer.json")

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
    autocast = autocast_for(device, dtype)

    def validate(model: torch.nn.Module) -> dict:
        out = {}
        if validates:
            L = cfg.seq_len + 1
            n = min(cfg.eval_sequences, len(val) // L)
            rows = np.stack([val.read(k * L, (k + 1) * L) for k in range(n)])
            batches = [rows[i : i + cfg.micro_batch_size] for i in range(0, n, cfg.micro_batch_size)]
            out["val_bpb"] = bits_per_byte(model, batches, nbytes, autocast)
        if in_loop is not None:
            out.update(in_loop(model, autocast))
        return out

    eot = stream.eot_id if cfg.document_masking else None
    balance = RouterBalance.of(model)  # a mixture of experts: its load-balancing loss (before wrapping)
    objective = CausalLM(plan, cfg.micro_batch_size, cfg.z_loss, eot, validate, cfg.compile, balance)
    job = Job(paths, cfg, model, objective, dtype, config_hash(model_cfg, cfg), stream.fingerprint)
    job.state = lambda step: {"tokens_seen": step * cfg.global_batch_tokens}
    job.flops_per_token = fpt
    return train(job, world, stop_at)
