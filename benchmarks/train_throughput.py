"""Pretraining throughput: trulyopen's loop against the Hugging Face Trainer and a plain PyTorch loop.

    .venv/bin/python benchmarks/train_throughput.py                 # the run recorded in BENCHMARKS.md
    .venv/bin/python benchmarks/train_throughput.py --check-150m    # also: two steps of the 150m preset
    .venv/bin/python benchmarks/train_throughput.py --quick         # a smoke run (about 3 minutes)

One model, one batch, one data order for every row: a transformers Llama (vocabulary 8,192, hidden
512, 8 layers, 8 heads, 8 key-value heads, MLP 1,536), sequences of 256 tokens, a global batch of
--global-batch-tokens (default 4,096 = 16 sequences) in micro-batches of --micro-batch (default 8),
the same initial weights (seed 0), and the rows of `BatchPlan(...).batch_tokens(step)` over the
quickstart's shards. The rows:

  ours         trulyopen.train.pretrain.pretrain() with precision "auto" and the defaults (compile
               off); tokens/s is the loop's own `tokens_per_s` in pretrain/metrics.jsonl (one step:
               data, forward, backward, clipping, optimizer), median over the steps after --warmup.
               Evaluation and the checkpoint happen once, after the last step, in no step's time.
  ours-compile the same with pretrain.compile = true (torch.compile of the model and of the loss);
               its first step holds the compilation (tens of seconds on two cores), so its warm-up
               is --warmup + 1 steps.
  trainer-bf16 transformers.Trainer with bf16=True, use_cpu=True (what Oumi and TRL configure): CPU
               autocast to bfloat16. Same batch (per-device batch x gradient accumulation), AdamW
               (fused, lr, betas, weight decay, clipping as ours), constant learning rate.
  trainer-fp32 the same Trainer with bf16=False.
  plain-fp32   a plain loop as nanochat runs on a CPU: model(input_ids, labels=...).loss, backward,
               torch.optim.AdamW step; no autocast, no clipping.

For the Trainer and the plain loop, tokens/s is the global batch over the wall time between the ends of
consecutive optimizer steps, after a warm-up: the median step, as for our rows. Each row runs in its
own interpreter, so its peak memory (the process's peak resident set, as trulyopen's metrics report
it on a CPU) is its own.

The limit: every matrix multiplication of one training step of this model, at its own shapes and in the
precision our loop uses, timed alone with torch: for each Linear (and the lm_head), x[B*T, in] @ W^T,
then the two backward products g @ W and g^T @ x; for attention, per head at T=256, Q K^T and A V
with their four backward products (batched over sequences x heads). The limit is their FLOPs over
their time (the median of --matmul-repeat runs of each shape, on operands that stay in cache), i.e.
the speed of a loop that did nothing but these products. It is timed with the same memory setting
as our loop (`reuse_freed_memory`: freed memory stays in the process, so outputs land in pages
already mapped); without it every product's output would pay for fresh pages and the limit would
be lower. It is measured right before and right after our rows (the higher counts), and, for the
target, inside each of our rows: right before its first step and after each step (in the loop's
metrics write, outside the step's time), each step's FLOP/s over the mean of the limit timed just
before and just after it, the median over the measured steps. On a shared machine whose speed drifts
(a 2-core cloud VM: the limit has been seen to move by 2x within a minute, with no process of its own
competing) only a limit timed seconds from the step it is compared with says what the loop reaches.
Our FLOP/s is trulyopen.model.build.flops_per_token x our tokens/s (the same FLOPs: 6 x parameters
incl. the output projection, plus 12 x layers x heads x head_dim x T for attention, causal or not).
MFU is the same FLOP/s over a large square matmul's (--square, default 4096^3).

Targets (issue 17): our tokens/s at least 2x the bf16 Trainer's, and our FLOP/s at least 80% of the
limit timed beside each step; both are checked for each of our two rows.

bfloat16 note: a CPU without AMX or AVX-512 BF16 (e.g. an AVX2-only AMD EPYC) has no bf16 matmul
hardware; the script prints the bf16 and fp32 speed of one matmul so this shows. There the bf16
Trainer is crippled by the hardware, not by the Trainer; the fp32 Trainer row is the fairer comparison.

With --profile (or when a row misses the limit target), one step of our loop itself (pretrain(),
compiled as the row that missed, or as --profile-compile says) runs under torch.profiler, and the
time is summed by kind of operator.

The last line of the output is a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from _machine import cpu_busy_s, time_matmuls, time_op  # (benchmarks/_machine.py, beside this script)

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"

# The fixed model.
VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, MLP, SEQ = 8192, 512, 8, 8, 8, 1536, 256
SEED = 0
# The optimizer, as trulyopen's defaults (PretrainConfig).
LR, BETAS, WEIGHT_DECAY, GRAD_CLIP = 3e-3, (0.9, 0.95), 0.1, 1.0
RATIO_TARGET = 2.0  # ours / bf16 Trainer
LIMIT_TARGET = 0.80  # our FLOP/s / the matmul-shape limit
DISTURBED = 0.05  # a row during which other processes took more than this share of the CPUs
# --check-150m: a small batch, 2 steps
CHECK_150M = {"global_batch_tokens": 1024, "micro_batch_size": 4, "steps": 2}
INSTALL_ACCELERATE = ".venv/bin/pip install accelerate"


# ----------------------------------------------------------------------------- helpers


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def dims():
    from trulyopen.model.presets import Dims

    return Dims(hidden=HIDDEN, layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS, intermediate=MLP)


def model_config(size: str | None = None):
    from trulyopen.recipe import ModelConfig

    if size is not None:
        return ModelConfig(arch="llama", size=size)
    return ModelConfig(
        arch="llama",
        size=None,
        hidden_size=HIDDEN,
        num_layers=LAYERS,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        intermediate_size=MLP,
    )


def fresh_model(vocab: int):
    """The same weights as pretrain() builds (from_preset with the same seed)."""
    from trulyopen.model.build import from_preset

    return from_preset("llama", dims(), vocab, SEQ, SEED)


def plan_for(shards: Path, batch_seqs: int):
    from trulyopen.train.loader import BatchPlan, TokenStream

    stream = TokenStream(shards, "train")
    return stream, BatchPlan(stream, SEQ, batch_seqs, SEED)


def our_dtype():
    import torch

    from trulyopen.train.precision import choose_dtype

    return choose_dtype("auto", torch.device("cpu"))


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ----------------------------------------------------------------------------- rows (child processes)


def row_ours(p: dict) -> dict:
    """trulyopen's pretrain() in a fresh run directory; tokens/s from its metrics.jsonl."""
    from trulyopen.model.build import flops_per_token
    from trulyopen.recipe import PretrainConfig
    from trulyopen.train.precision import dtype_name
    from trulyopen.train.pretrain import Paths, pretrain

    steps = p["warmup"] + p["steps"]
    cfg = PretrainConfig(
        seq_len=SEQ,
        global_batch_tokens=p["global_batch_tokens"],
        micro_batch_size=p["micro_batch_size"],
        max_steps=steps,
        lr=LR,
        warmup_steps=0,
        schedule="constant",
        weight_decay=WEIGHT_DECAY,
        beta1=BETAS[0],
        beta2=BETAS[1],
        grad_clip=GRAD_CLIP,
        precision="auto",
        compile=p.get("compile", False),
        eval_every=steps,
        checkpoint_every=steps,
        seed=SEED,
    )
    data = Path(p["data_run"])
    limits = paired_limit(p) if p.get("paired") else None
    with tempfile.TemporaryDirectory(prefix="trulyopen_bench_") as tmp:
        paths = Paths(Path(tmp) / "run", data / "data" / "shards", data / "tokenizer")
        t = time.perf_counter()
        pretrain(cfg, model_config(p.get("size")), paths, fresh=True)
        wall = time.perf_counter() - t
        lines = [json.loads(x) for x in paths.metrics.read_text().splitlines() if x.strip()]
    measured = lines[p["warmup"] :]
    tps = [r["tokens_per_s"] for r in measured]
    fpt = flops_per_token(fresh_model_for(p), SEQ)
    paired = {}
    if limits:  # step i against the limit timed right before it and right after it
        fractions = [
            lines[i]["tokens_per_s"] * fpt / ((limits[i] + limits[i + 1]) / 2)
            for i in range(p["warmup"], len(lines))
        ]
        paired = {"limit_by_step": limits, "fraction_of_paired_limit": median(fractions)}
    return {
        "dtype": dtype_name(our_dtype()),
        "steps": len(lines),
        "warmup": p["warmup"],
        "tokens_per_s_by_step": [r["tokens_per_s"] for r in lines],
        "tokens_per_s": median(tps),
        "flops_per_token": fpt,
        "flops_per_s": median(tps) * fpt,
        "peak_memory_mb": max(r["peak_memory_mb"] for r in measured),
        # the loop's own MFU figure (against its measured 2048^3 matmul), where it reports one
        "mfu_reported": median([r["mfu"] for r in measured if "mfu" in r]) if "mfu" in measured[0] else None,
        "loss_first": lines[0]["loss"],
        "loss_last": lines[-1]["loss"],
        "val_bpb": lines[-1].get("val_bpb"),
        "wall_s_with_eval_and_checkpoint": wall,
        **paired,
    }


def paired_limit(p: dict) -> list[float]:
    """The limit timed in this process right before the first step and after each step (in the loop's
    metrics write, outside the step's own time): this machine's speed drifts by up to 2x within a
    minute (others' work on the host, which the guest cannot see), so a step is compared with the
    limit measured seconds from it. The list fills as pretrain() runs."""
    from trulyopen.train.metrics import MetricsLog
    from trulyopen.train.precision import reuse_freed_memory

    reuse_freed_memory()
    shapes = matmul_shapes(p["micro_batch_size"], p["vocab"])

    def limit() -> float:
        _, flops, seconds = time_matmuls(shapes, our_dtype(), 3)
        return flops / seconds

    limits, write = [limit()], MetricsLog.write

    def timed(self, record):
        write(self, record)
        if "tokens_per_s" in record:  # a step's line (not the final evaluation's)
            limits.append(limit())

    MetricsLog.write = timed
    return limits


def fresh_model_for(p: dict):
    """The row's model, only to count its FLOPs."""
    if p.get("size") is None:
        return fresh_model(p["vocab"])
    from trulyopen.model.build import from_preset
    from trulyopen.model.presets import SIZES

    return from_preset("llama", SIZES[p["size"]], p["vocab"], SEQ, SEED)


def row_trainer(p: dict) -> dict:
    """transformers.Trainer on the same rows, in order; time between the ends of optimizer steps."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    batch_seqs = p["global_batch_tokens"] // SEQ
    stream, plan = plan_for(Path(p["data_run"]) / "data" / "shards", batch_seqs)
    steps = p["warmup"] + p["steps"]

    class Rows(torch.utils.data.IterableDataset):
        """The rows of our global batches 0, 1, ... in order; labels = inputs (the model shifts)."""

        def __iter__(self):
            for step in range(steps):
                for row in torch.from_numpy(plan.batch_tokens(step)):
                    x = row[:-1].contiguous()
                    yield {"input_ids": x, "labels": x}

    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())
            print(f"  trainer step {state.global_step}: {time.strftime('%H:%M:%S')}", flush=True)

    with tempfile.TemporaryDirectory(prefix="trulyopen_bench_") as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=p["micro_batch_size"],
            gradient_accumulation_steps=batch_seqs // p["micro_batch_size"],
            max_steps=steps,
            learning_rate=LR,
            lr_scheduler_type="constant",
            warmup_steps=0,
            adam_beta1=BETAS[0],
            adam_beta2=BETAS[1],
            adam_epsilon=1e-8,
            weight_decay=WEIGHT_DECAY,
            max_grad_norm=GRAD_CLIP,
            optim="adamw_torch_fused",
            bf16=p["bf16"],
            use_cpu=True,
            save_strategy="no",
            eval_strategy="no",
            logging_steps=10**6,
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=SEED,
        )
        trainer = Trainer(
            model=fresh_model(stream.vocab_size), args=args, train_dataset=Rows(), callbacks=[Clock()]
        )
        out = trainer.train()
    measured = ends[p["warmup"] :]
    span = measured[-1] - ends[p["warmup"] - 1] if p["warmup"] else float("nan")
    step_s = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return {
        "bf16": p["bf16"],
        "steps": len(ends),
        "warmup": p["warmup"],
        "step_seconds": step_s,
        # the median step, as for our rows (all measured steps together: tokens_per_s_span)
        "tokens_per_s": p["global_batch_tokens"] / median(step_s[p["warmup"] - 1 :]),
        "tokens_per_s_span": p["global_batch_tokens"] * len(measured) / span,
        "train_loss": out.training_loss,
        "peak_rss_mb": peak_rss_mb(),
    }


def row_plain(p: dict) -> dict:
    """A plain fp32 loop (what nanochat does on a CPU)."""
    import torch

    batch_seqs = p["global_batch_tokens"] // SEQ
    stream, plan = plan_for(Path(p["data_run"]) / "data" / "shards", batch_seqs)
    model = fresh_model(stream.vocab_size)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    step_s, losses = [], []
    for step in range(p["warmup"] + p["steps"]):
        t = time.perf_counter()
        rows = torch.from_numpy(plan.batch_tokens(step))
        n = len(rows) // p["micro_batch_size"]
        total = 0.0
        for micro in rows.split(p["micro_batch_size"]):
            x = micro[:, :-1]
            loss = model(input_ids=x, labels=x).loss / n
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - t)
        losses.append(total)
    measured = step_s[p["warmup"] :]
    return {
        "steps": len(step_s),
        "warmup": p["warmup"],
        "step_seconds": step_s,
        "tokens_per_s": p["global_batch_tokens"] / median(measured),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "peak_rss_mb": peak_rss_mb(),
    }


def matmul_shapes(micro: int, vocab: int) -> list[dict]:
    """Every matmul of one micro-batch's forward and backward: (name, a, b, batch, count) with the
    operands' layouts as autograd uses them (F.linear: x @ W^T; backward: g @ W and g^T @ x)."""
    M, d = micro * SEQ, HIDDEN // HEADS
    linears = [  # (name, in, out, how many in the model)
        ("attn q/k/v/o", HIDDEN, HIDDEN, 4 * LAYERS),
        ("mlp gate/up", HIDDEN, MLP, 2 * LAYERS),
        ("mlp down", MLP, HIDDEN, LAYERS),
        ("lm_head", HIDDEN, vocab, 1),
    ]
    out = []
    for name, i, o, count in linears:
        out.append({"name": f"{name} fwd x@W^T", "m": M, "k": i, "n": o, "count": count, "kind": "xWt"})
        out.append({"name": f"{name} bwd g@W", "m": M, "k": o, "n": i, "count": count, "kind": "gW"})
        out.append({"name": f"{name} bwd g^T@x", "m": o, "k": M, "n": i, "count": count, "kind": "gtx"})
    bh = micro * HEADS
    for name, m, k, n in [
        ("attn QK^T fwd", SEQ, d, SEQ),  # Q @ K^T
        ("attn AV fwd", SEQ, SEQ, d),  # A @ V
        ("attn dS@K", SEQ, SEQ, d),
        ("attn dS^T@Q", SEQ, SEQ, d),
        ("attn dO@V^T", SEQ, d, SEQ),
        ("attn A^T@dO", SEQ, SEQ, d),
    ]:
        out.append({"name": name, "m": m, "k": k, "n": n, "count": LAYERS, "kind": "bmm", "batch": bh})
    return out


def row_limit(p: dict) -> dict:
    """The time of this model's matmuls alone, at their shapes, in our loop's precision."""
    import torch

    from trulyopen.train.precision import reuse_freed_memory

    reuse_freed_memory()  # as our loop does: outputs land in pages already mapped, not fresh ones
    dtype = our_dtype()
    shapes, total_flops, total_s = time_matmuls(
        matmul_shapes(p["micro_batch_size"], p["vocab"]), dtype, p["matmul_repeat"]
    )
    q = p["square"]
    a, b = torch.randn(q, q, dtype=dtype), torch.randn(q, q, dtype=dtype)
    sq = time_op(lambda: torch.mm(a, b), p["matmul_repeat"])
    # bf16 vs fp32 on one matmul of this model (the check that shows missing bf16 hardware)
    x, w = torch.randn(2048, 512), torch.randn(512, 1536)
    f32 = time_op(lambda: x @ w, 3)
    xb, wb = x.bfloat16(), w.bfloat16()
    b16 = time_op(lambda: xb @ wb, 1)
    mm_flops = 2 * 2048 * 512 * 1536
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "micro_batch_size": p["micro_batch_size"],
        "shapes": shapes,
        "step_matmul_flops_per_micro_batch": total_flops,
        "step_matmul_seconds_per_micro_batch": total_s,
        "limit_flops_per_s": total_flops / total_s,
        "square": q,
        "square_flops_per_s": 2 * q**3 / sq,
        "probe_2048x512x1536_fp32_flops_per_s": mm_flops / f32,
        "probe_2048x512x1536_bf16_flops_per_s": mm_flops / b16,
        "threads": torch.get_num_threads(),
    }


def op_kind(name: str) -> str:
    if name in ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::matmul", "aten::linear"):
        return "matmul"
    if name.startswith("## Call CompiledFxGraph") or name.startswith("graph_"):
        return "compiled elementwise kernels (torch.compile: norms, rotary, softmax, SiLU, loss)"
    if "scaled_dot_product" in name:
        return "attention (SDPA kernel)"
    if any(k in name for k in ("log_softmax", "nll_loss", "cross_entropy", "logsumexp", "scatter_add")):
        return "loss (log-sum-exp, cross-entropy)"
    if "softmax" in name:
        return "attention softmax"
    if "_fused_adam" in name or "adam" in name.lower():
        return "optimizer"
    if name in ("aten::fill_", "aten::zero_", "aten::zeros", "aten::empty", "aten::copy_", "aten::cat"):
        return "copies, fills, cat"
    if name.startswith("aten::"):
        return "elementwise and reductions (norms, rotary, SiLU, residuals, grads)"
    return "other"


def row_profile(p: dict) -> dict:
    """One step of our loop itself under torch.profiler: pretrain() as in the `ours` row (compiled if
    p["compile"]), the profiler stepped at each metrics line, recording the step after the warm-up
    (not the last: that one validates before its metrics line)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from trulyopen.train.metrics import MetricsLog

    warmup = 3 if p.get("compile") else 2
    prof = profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=warmup, warmup=0, active=1))
    write, ends = MetricsLog.write, []

    def stepped(self, record):  # the loop writes one metrics line at the end of each step
        ends.append(time.perf_counter())
        prof.step()
        write(self, record)

    MetricsLog.write = stepped
    prof.start()
    row_ours({**p, "warmup": warmup, "steps": 2})
    prof.stop()
    ops = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()]
    ops = [o for o in ops if o[1] > 0 and o[0] != "ProfilerStep*"]
    ops.sort(key=lambda o: -o[1])
    total = sum(o[1] for o in ops)
    kinds: dict[str, float] = {}
    for name, sec, _ in ops:
        kinds[op_kind(name)] = kinds.get(op_kind(name), 0.0) + sec
    return {
        "compile": bool(p.get("compile")),
        "step_wall_s": ends[warmup] - ends[warmup - 1],
        "profiled_self_cpu_s": total,
        "by_kind_s": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "top_ops": [{"op": n, "self_s": s, "calls": c} for n, s, c in ops[:15]],
        "threads": torch.get_num_threads(),
    }


ROWS = {
    "ours": row_ours,
    "trainer": row_trainer,
    "plain": row_plain,
    "limit": row_limit,
    "profile": row_profile,
}


def child(name: str, params: dict, timeout: float | None = None) -> dict:
    """Run one row in a fresh interpreter; its output goes to ours, its result comes back as JSON,
    with `_run`: its wall time, its own CPU time, and the CPU time other processes took meanwhile
    (the machine may be shared: this says how disturbed the row was)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    try:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--row",
            name,
            "--row-params",
            json.dumps(params),
        ]
        cmd += ["--row-out", str(out)]
        env = {**os.environ, "TRULYOPEN_QUIET": "1", "TOKENIZERS_PARALLELISM": "false"}
        t0, busy0 = time.perf_counter(), cpu_busy_s()
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, env=env, timeout=timeout)
        wall, busy = time.perf_counter() - t0, cpu_busy_s() - busy0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise RuntimeError(f"row {name} failed (exit {proc.returncode}): {' '.join(cmd)}")
        own = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        others = max(busy - own, 0.0)
        share = others / (wall * (os.cpu_count() or 1))
        print(
            f"  ({wall:.0f} s; other processes meanwhile used {others:.0f} CPU-s, "
            f"{share:.0%} of the machine{': DISTURBED' if share > DISTURBED else ''})",
            flush=True,
        )
        result = json.loads(out.read_text())
        result["_run"] = {"wall_s": wall, "cpu_s": own, "others_cpu_s": others, "others_share": share}
        return result
    finally:
        out.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the run


def build_data(tmp: Path) -> Path:
    """The quickstart's shards and tokenizer, built in `tmp` (about 25 s)."""
    from trulyopen.pipeline import run
    from trulyopen.recipe import load_recipe

    # --quick too: on part of the corpus the validation split can come out empty, which pretrain()
    # cannot evaluate, and the tokenizer smaller than the benchmark's vocabulary
    run_dir = tmp / "data_run"
    said = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(said):
        run(load_recipe(QUICKSTART), run_dir=run_dir, until="shards")
    print(f"data: built the quickstart's shards in {time.perf_counter() - t:.1f} s ({run_dir})")
    return run_dir


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip() + ("+dirty(src)" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def machine() -> dict:
    import torch
    import transformers

    cpu = "unknown"
    flags = ""
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(
            (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), cpu
        )
        flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    acc = None
    with contextlib.suppress(ImportError):
        import accelerate

        acc = accelerate.__version__
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "avx2": " avx2" in flags,
        "avx512f": " avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": acc,
        "torch_threads": torch.get_num_threads(),
    }


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("MET" if ok else "MISSED")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: few steps, small batches")
    ap.add_argument(
        "--data-run", help="reuse this run directory's data/shards and tokenizer (e.g. runs/quickstart)"
    )
    ap.add_argument("--global-batch-tokens", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="measured steps of our loop (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2, help="our loop's warm-up steps, not measured")
    ap.add_argument("--plain-steps", type=int, default=4, help="measured steps of the plain loop")
    ap.add_argument("--trainer-steps", type=int, default=2, help="measured steps of the fp32 Trainer")
    ap.add_argument(
        "--bf16-steps",
        type=int,
        help="measured steps of the bf16 Trainer (default: 4 with bf16 hardware, else 1: minutes each)",
    )
    ap.add_argument(
        "--trainer-warmup", type=int, default=1, help="warm-up steps of each Trainer and the plain loop"
    )
    ap.add_argument("--skip-bf16", action="store_true", help="leave out the bf16 Trainer")
    ap.add_argument("--matmul-repeat", type=int, default=5)
    ap.add_argument("--square", type=int, default=4096, help="side of the square matmul for MFU")
    ap.add_argument("--check-150m", action="store_true", help="also: 2 steps of the 150m preset, peak memory")
    ap.add_argument("--profile", action="store_true", help="profile a step of each of our rows, even if met")
    ap.add_argument("--skip-compile", action="store_true", help="leave out our loop with compile = true")
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--row-params", help=argparse.SUPPRESS)
    ap.add_argument("--row-out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.row:  # a child process: one row
        result = ROWS[args.row](json.loads(args.row_params))
        Path(args.row_out).write_text(json.dumps(result))
        return

    if args.quick:
        args.steps, args.warmup, args.plain_steps, args.trainer_steps = 2, 1, 1, 1
        args.bf16_steps, args.matmul_repeat, args.square = 1, 2, 1024
        args.global_batch_tokens, args.micro_batch = 2 * SEQ, 2
    if args.global_batch_tokens % (SEQ * args.micro_batch):
        ap.error(f"--global-batch-tokens must be a multiple of {SEQ} x --micro-batch")

    mach = machine()
    dtype = str(our_dtype()).replace("torch.", "")
    has_accelerate = mach["accelerate"] is not None
    print(
        f"machine: {mach['cpu']}, {mach['cores']} cores, torch {mach['torch']} ({mach['torch_threads']} "
        f"threads), transformers {mach['transformers']}, accelerate {mach['accelerate']}"
    )
    print(
        f"  bf16 hardware: AMX-BF16 {mach['amx_bf16']}, AVX-512 BF16 {mach['avx512_bf16']}; "
        f"our loop's precision 'auto' gives {dtype}"
    )
    if args.bf16_steps is None:
        args.bf16_steps = 4 if mach["amx_bf16"] or mach["avx512_bf16"] else 1
    started = datetime.now(UTC)
    result: dict = {
        "benchmark": "train_throughput",
        "date": started.strftime("%Y-%m-%d"),
        "commit": git_commit(),
        "argv": sys.argv[1:],
        "machine": mach,
        "model": {
            "arch": "llama",
            "vocab": VOCAB,
            "hidden": HIDDEN,
            "layers": LAYERS,
            "heads": HEADS,
            "kv_heads": KV_HEADS,
            "intermediate": MLP,
            "seq_len": SEQ,
        },
        "global_batch_tokens": args.global_batch_tokens,
        "micro_batch_size": args.micro_batch,
        "quick": args.quick,
    }
    common = {"global_batch_tokens": args.global_batch_tokens, "micro_batch_size": args.micro_batch}

    with tempfile.TemporaryDirectory(prefix="trulyopen_bench_") as tmp:
        data_run = Path(args.data_run).resolve() if args.data_run else build_data(Path(tmp))
        shards = data_run / "data" / "shards"
        meta = json.loads((shards / "shards.json").read_text())
        if meta["vocab_size"] != VOCAB:
            print(
                f"data: NOTE the tokenizer has {meta['vocab_size']:,} tokens, not {VOCAB:,}: "
                "the model follows it"
            )
        result["data"] = {"run_dir": str(data_run), "fingerprint": meta["fingerprint"]}
        common["data_run"] = str(data_run)
        common["vocab"] = result["model"]["vocab"] = meta["vocab_size"]
        t_all = time.perf_counter()

        # the limit right before our rows and right after them and the bf16 Trainer (the machine may
        # be shared, and its speed drifts): the higher counts
        lim_params = {**common, "matmul_repeat": args.matmul_repeat, "square": args.square}
        print(
            f"\n[1/6] the limit: this model's matmuls at their shapes ({dtype}), "
            f"micro-batch {args.micro_batch}"
        )
        limits = [child("limit", lim_params)]
        print(f"\n[2/6] our loop: pretrain(), {args.warmup} warm-up + {args.steps} measured steps")
        ours = result["ours"] = child(
            "ours", {**common, "warmup": args.warmup, "steps": args.steps, "paired": True}
        )
        print(f"  tokens/s by step: {ours['tokens_per_s_by_step']}")
        result["ours_compiled"] = None
        if not args.skip_compile:
            print(
                f"\n[3/6] our loop with pretrain.compile = true: {args.warmup + 1} warm-up "
                f"(the first compiles) + {args.steps} measured steps"
            )
            compiled = {
                **common,
                "warmup": args.warmup + 1,
                "steps": args.steps,
                "compile": True,
                "paired": True,
            }
            result["ours_compiled"] = child("ours", compiled)
            print(f"  tokens/s by step: {result['ours_compiled']['tokens_per_s_by_step']}")

        result["trainer_fp32"] = result["trainer_bf16"] = None
        if not has_accelerate:
            print(f"\n[4/6, 5/6] transformers.Trainer: SKIPPED, it needs accelerate: {INSTALL_ACCELERATE}")
        elif args.skip_bf16:
            print("\n[4/6] Trainer, bf16: skipped (--skip-bf16)")
        else:
            print(
                f"\n[4/6] Trainer, bf16: {args.trainer_warmup} warm-up + {args.bf16_steps} measured "
                "(minutes per step on a CPU without bf16 hardware)"
            )
            result["trainer_bf16"] = child(
                "trainer", {**common, "bf16": True, "warmup": args.trainer_warmup, "steps": args.bf16_steps}
            )
        print("\n[1/6 again] the limit, right after our rows and the bf16 Trainer")
        limits.append(child("limit", lim_params))
        limit = max(limits, key=lambda lm: lm["limit_flops_per_s"])
        result["limit"] = {**limit, "runs_limit_flops_per_s": [lm["limit_flops_per_s"] for lm in limits]}
        result["limit"]["runs_square_flops_per_s"] = [lm["square_flops_per_s"] for lm in limits]
        result["limit"]["square_flops_per_s"] = max(lm["square_flops_per_s"] for lm in limits)
        result["limit"]["runs_others_share"] = [lm["_run"]["others_share"] for lm in limits]

        if has_accelerate:
            print(f"\n[5/6] Trainer, fp32: {args.trainer_warmup} warm-up + {args.trainer_steps} measured")
            result["trainer_fp32"] = child(
                "trainer",
                {**common, "bf16": False, "warmup": args.trainer_warmup, "steps": args.trainer_steps},
            )
        print(f"\n[6/6] plain fp32 PyTorch loop: {args.trainer_warmup} warm-up + {args.plain_steps} measured")
        result["plain_fp32"] = child(
            "plain", {**common, "warmup": args.trainer_warmup, "steps": args.plain_steps}
        )

        result["profiles"] = []
        for row, compiled in ((ours, False), (result["ours_compiled"], True)):
            if row is None:
                continue
            if args.profile or row["fraction_of_paired_limit"] < LIMIT_TARGET:
                print(f"\nprofile: one step of our loop{' (compiled)' * compiled} under torch.profiler")
                result["profiles"].append(child("profile", {**common, "compile": compiled}))

        if args.check_150m:
            c = CHECK_150M
            print(f"\ncheck: the 150m preset, {c['steps']} steps of {c['global_batch_tokens']} tokens")
            result["check_150m"] = child(
                "ours",
                {
                    **common,
                    "global_batch_tokens": c["global_batch_tokens"],
                    "micro_batch_size": c["micro_batch_size"],
                    "warmup": 0,
                    "steps": c["steps"],
                    "size": "150m",
                },
            )
        result["wall_s"] = time.perf_counter() - t_all

    report(result)
    print(json.dumps(result))


def report(r: dict) -> None:
    ours, oc, limit = r["ours"], r["ours_compiled"], r["limit"]
    tf32, tb16, plain = r["trainer_fp32"], r["trainer_bf16"], r["plain_fp32"]
    fpt, lim, sq = ours["flops_per_token"], limit["limit_flops_per_s"], limit["square_flops_per_s"]
    table = [("trulyopen pretrain()", ours["dtype"], ours, ours["peak_memory_mb"])]
    if oc:
        table.append(("trulyopen, compile: true", oc["dtype"], oc, oc["peak_memory_mb"]))
    if tb16:
        table.append(("HF Trainer, bf16=True", "bf16 autocast", tb16, tb16["peak_rss_mb"]))
    if tf32:
        table.append(("HF Trainer, bf16=False", "fp32", tf32, tf32["peak_rss_mb"]))
    table.append(("plain PyTorch loop", "fp32", plain, plain["peak_rss_mb"]))
    print(
        f"\nmodel: llama, {fpt / 1e6:.1f} MFLOP/token; global batch {r['global_batch_tokens']:,} tokens "
        f"({r['global_batch_tokens'] // SEQ} x {SEQ}), micro-batch {r['micro_batch_size']}"
    )
    print(
        f"\n{'row':<26} {'precision':<26} {'tokens/s':>9} {'GFLOP/s':>8} {'of limit':>8} "
        f"{'÷ bf16 Trainer':>14} {'peak MB':>8} {'steps':>5} {'others':>7}"
    )
    for name, prec, row, mb in table:
        tps, n = row["tokens_per_s"], row["steps"] - row["warmup"]
        ratio = f"{tps / tb16['tokens_per_s']:.2f}x" if tb16 else "n/a"
        print(
            f"{name:<26} {prec:<26} {tps:>9.1f} {tps * fpt / 1e9:>8.1f} {tps * fpt / lim:>8.1%} "
            f"{ratio:>14} {mb:>8.0f} {n:>5} {row['_run']['others_share']:>7.0%}"
        )
    print(
        "(steps: measured steps; others: the share of the machine's CPU time that other processes "
        "took during the row)"
    )
    print(
        f"\nlimit ({limit['dtype']}, matmuls alone at this model's shapes, "
        f"micro-batch {limit['micro_batch_size']}): "
        f"{lim / 1e9:.1f} GFLOP/s = {lim / fpt:.0f} tokens/s"
    )
    runs = ", ".join(f"{x / 1e9:.1f}" for x in limit["runs_limit_flops_per_s"])
    dist = ", ".join(f"{x:.0%}" for x in limit["runs_others_share"])
    print(f"  (measured before and after our rows: {runs} GFLOP/s, the higher counts; others took {dist})")
    print(f"square {limit['square']}^3 matmul: {sq / 1e9:.1f} GFLOP/s")
    print(
        f"one matmul 2048x512x1536: fp32 {limit['probe_2048x512x1536_fp32_flops_per_s'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {limit['probe_2048x512x1536_bf16_flops_per_s'] / 1e9:.2f} GFLOP/s"
    )
    r["figures"], r["targets"] = {}, {}
    for key, row in (("ours", ours), ("ours_compiled", oc)):
        if row is None:
            continue
        ratio = row["tokens_per_s"] / tb16["tokens_per_s"] if tb16 else None
        r["figures"][key] = {
            "tokens_per_s": row["tokens_per_s"],
            "flops_per_s": row["flops_per_s"],
            "fraction_of_limit": row["flops_per_s"] / lim,
            "fraction_of_paired_limit": row["fraction_of_paired_limit"],
            "mfu_vs_square": row["flops_per_s"] / sq,
            "ratio_vs_trainer_bf16": ratio,
            "ratio_vs_trainer_fp32": row["tokens_per_s"] / tf32["tokens_per_s"] if tf32 else None,
            "ratio_vs_plain_fp32": row["tokens_per_s"] / plain["tokens_per_s"],
            "peak_memory_mb": row["peak_memory_mb"],
        }
        r["targets"][key] = {
            f"ratio_vs_trainer_bf16_ge_{RATIO_TARGET:g}": None if ratio is None else ratio >= RATIO_TARGET,
            f"fraction_of_limit_ge_{LIMIT_TARGET:g}": row["fraction_of_paired_limit"] >= LIMIT_TARGET,
        }
    print("\ntargets:")
    for key, label in (("ours", "ours (defaults)"), ("ours_compiled", "ours, compile: true")):
        if key not in r["figures"]:
            continue
        f, ok = r["figures"][key], list(r["targets"][key].values())
        vs = (
            "n/a (not measured)" if ok[0] is None else f"{verdict(ok[0])} ({f['ratio_vs_trainer_bf16']:.2f}x)"
        )
        print(f"  {label}: tokens/s >= {RATIO_TARGET:g}x the bf16 Trainer's: {vs}")
        print(
            f"  {label}: FLOP/s >= {LIMIT_TARGET:.0%} of the matmul-shape limit: {verdict(ok[1])} "
            f"({f['fraction_of_paired_limit']:.1%} of the limit timed beside each step; "
            f"{f['fraction_of_limit']:.1%} of the higher of the two separate limit runs; "
            f"MFU {f['mfu_vs_square']:.1%} against the square matmul)"
        )
        if tf32:
            print(f"  {label}: against the fp32 Trainer: {f['ratio_vs_trainer_fp32']:.2f}x")
    if tb16 and not (r["machine"]["amx_bf16"] or r["machine"]["avx512_bf16"]):
        print(
            "  note: this CPU has no bf16 matmul hardware (no AMX, no AVX-512 BF16); "
            "the bf16 Trainer is slow because of the hardware, not the Trainer."
        )
    if ours.get("mfu_reported") is not None:
        print(
            "ours: the loop's own mfu in metrics.jsonl (vs a 2048^3 matmul it times at start): "
            f"{ours['mfu_reported']:.1%}"
        )
    disturbed = [name for name, _, row, _ in table if row["_run"]["others_share"] > DISTURBED]
    disturbed += ["the limit"] if max(limit["runs_others_share"]) > DISTURBED else []
    r["disturbed_rows"] = disturbed
    if disturbed:
        print(
            f"  WARNING: other processes took more than {DISTURBED:.0%} of the CPUs during: "
            f"{', '.join(disturbed)}; those figures are disturbed: run again on a quiet machine"
        )
    for pr in r.get("profiles", []):
        print(
            f"\nprofile of one step of our loop{', compiled' * pr['compile']} "
            f"({pr['step_wall_s']:.2f} s wall under the profiler):"
        )
        for k, v in pr["by_kind_s"].items():
            print(f"  {k:<80} {v:7.2f} s  {v / pr['profiled_self_cpu_s']:6.1%}")
        print("  top operators by self time:")
        for o in pr["top_ops"][:10]:
            print(f"    {o['op'][:60]:<60} {o['self_s']:7.2f} s  {o['calls']:5d} calls")
    if r.get("check_150m"):
        c = r["check_150m"]
        print(
            f"\n150m preset: {c['steps']} steps of {CHECK_150M['global_batch_tokens']} tokens, loss "
            f"{c['loss_first']:.3f} -> {c['loss_last']:.3f}, {c['tokens_per_s_by_step']} tokens/s, "
            f"peak memory {c['peak_memory_mb']:.0f} MB"
        )


if __name__ == "__main__":
    main()
