"""LoRA SFT throughput: trulyopen's finetune() against TRL's SFTTrainer + peft, same model, same data.

    .venv/bin/python benchmarks/finetune_throughput.py                            # recorded run (~12 min)
    .venv/bin/python benchmarks/finetune_throughput.py --data-run runs/quickstart # reuse a run's records
    .venv/bin/python benchmarks/finetune_throughput.py --quick                    # smoke run (< 4 min)

Data: the quickstart's SFT chat records (synth/sft.jsonl: docstring -> function, one user and one
assistant turn). Without --data-run they are made in a temporary run directory by the data and tokenizer
stages and `trulyopen.synth.synthesize` (what the synth stage runs; pretraining is skipped). Each record
is rendered once with the tokenizer's chat template by our ChatRenderer, and one longer than --seq-len
(512) positions is dropped for every row. Our rows read the kept records as chat JSONL. TRL reads the
same rendered text as prompt/completion: the prompt is the conversation up to the `<|assistant|>`
generation prompt, the completion the rest. The template has no `{% generation %}` block, so TRL's
assistant_only_loss cannot be used; completion_only_loss trains the same assistant tokens. TRL appends
EOS to each completion, so its examples are 2 positions longer than ours (EOS and the last input).

Model: a fresh Llama (the tokenizer's vocabulary, hidden 512, 8 layers, 8 heads, MLP 1,536, seed 0),
written once as a Hugging Face directory (fp32) that every row loads with from_pretrained. Precision
follows the machine: where our `precision: auto` gives bf16 (a CPU with AMX or AVX-512 BF16), ours
trains in bf16 (bf16 weights, fp32 master copies of the adapter) and TRL gets bf16=True (its default:
CPU autocast); elsewhere both run in fp32 (bf16 would be emulated, about 100x slower). LoRA on both
sides: r 16, alpha 32, dropout 0.05 on q/k/v/o/gate/up/down_proj; AdamW (fused, betas 0.9/0.95, no
weight decay), constant lr 2e-4, gradient clipping 1.0. TRL's gradient checkpointing (on by default
in SFTConfig) is turned off: ours has none, so both do the same FLOPs per position.

Rows, each in its own interpreter (so peak RSS is its own):
  ours        finetune() (sft, lora): --batch-size packed rows of --seq-len positions per optimizer
              step, in micro-batches of --micro-batch rows; its packing never splits an example.
  trl         SFTTrainer with its default batching: 8 examples per micro-batch (the Trainer's default),
              padded to the longest, no packing; gradient accumulation chosen so that a step sees
              about as many real tokens as ours. The base loaded as the directory holds it (fp32).
  trl-bf16w   (bf16 machines) the same with the base loaded in bf16 (dtype=bfloat16), as LoRA recipes
              on GPUs do: no weight casts under autocast.
  trl-packed  SFTTrainer with packing=True (BFD, which turns on padding-free: each micro-batch of rows
              is flattened into one sequence, kept apart by position_ids; on a CPU transformers builds
              the block-diagonal mask for sdpa). As many rows per step and micro-batch as ours.

Measured the same way for every row: the wall time between the ends of consecutive optimizer steps after
--warmup steps, and the real (non-padding) positions the model processed in those steps; tokens/s is
their ratio. For ours, the step ends are its metrics.jsonl writes and the tokens are counted from each
step's batch (SFT.batch and MetricsLog.write are wrapped in the child; nothing in src/ changes); the
loop's own median `tokens_per_s` is printed too. For TRL, a TrainerCallback times step ends and a
training_step override counts the attention mask (padding-free: position_ids) of each micro-batch.
Padding: padding positions / all positions. Others: the share of the machine's CPU time that other
processes took during the row (/proc/stat); above 5% the row is flagged as disturbed.

The LoRA limit: the matmuls a LoRA step of ours really does, each timed alone at its shape (as
train_throughput.py times pretraining's), per micro-batch of --micro-batch rows x --seq-len positions:
  each adapted Linear (in -> out): the frozen base's forward x @ W^T and its input gradient g @ W
      (no weight gradient: W is frozen), and the adapter's six products: x @ A^T, (x A^T) @ B^T,
      g @ B, g^T @ (x A^T) (B's gradient), h^T @ x (A's gradient), h @ A (the input's gradient);
      in the first layer q/k/v get no input gradient (their input, the embedding, does not train);
  the output layer: forward and input gradient; attention: Q K^T, A V and their four backward products.
Their FLOPs over their summed time is the limit. Our FLOP/s counts the same FLOPs per position times
the positions our steps process (padding included: those products are computed), so it measures how
close the step runs to its own matmuls; tokens/s (real tokens) is what the TRL comparison uses.

Targets (issue 17): ours at least 2x TRL's default row in real tokens/s, in the machine's precision,
and our FLOP/s at least 80% of the LoRA limit. The last line is a JSON object of all figures.
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

from _machine import run_row, time_matmuls  # (benchmarks/_machine.py, beside this script)

ROOT = Path(__file__).resolve().parent.parent
HIDDEN, LAYERS, HEADS, MLP, MAX_POS, SEED = 512, 8, 8, 1536, 1024, 0
LORA_R, LORA_ALPHA, LORA_DROPOUT = 16, 32, 0.05
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR, BETAS, GRAD_CLIP = 2e-4, (0.9, 0.95), 1.0
TRL_MICRO = 8  # per_device_train_batch_size: the Trainer's default
TARGET, LIMIT_TARGET, DISTURBED = 2.0, 0.80, 0.05
QUIET = {
    "TRULYOPEN_QUIET": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore::FutureWarning",
}


def measured(ends: list[float], real: list[int], positions: list[int], warmup: int, resumes=None) -> dict:
    """Real tokens per second and padding share over the steps after `warmup`. `resumes[i]`: when the
    step after step i began, where something was timed between them (else the step's end)."""
    resumes = resumes or ends
    wall = sum(ends[i] - resumes[i - 1] for i in range(warmup, len(ends)))
    return {
        "tokens_per_s": sum(real[warmup:]) / wall,
        "padding_share": 1 - sum(real[warmup:]) / sum(positions[warmup:]),
        "measured_steps": len(ends) - warmup,
        "real_tokens_by_step": real,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # kB on Linux
    }


# ----------------------------------------------------------------------------- rows (child processes)


def row_ours(p: dict) -> dict:
    """finetune() in a fresh run directory, with SFT.batch and MetricsLog.write wrapped to count and time."""
    from trulyopen.finetune.stage import FinetunePaths, finetune
    from trulyopen.recipe import FinetuneConfig, FinetuneDataConfig, LoraConfig
    from trulyopen.train.metrics import MetricsLog
    from trulyopen.train.objectives.sft import SFT

    real, positions, ends, resumes = [], [], [], []
    batch, write = SFT.batch, MetricsLog.write
    limit = limit_timer(p) if p.get("paired") else None
    limits = [limit()] if limit else []

    def counted(self, step, model):
        sb = batch(self, step, model)
        real.append(sum(int((m.batch.owner >= 0).sum()) for m in sb.micros))
        positions.append(sum(m.batch.inputs.numel() for m in sb.micros))
        return sb

    def timed(self, record):
        ends.append(time.perf_counter())
        write(self, record)
        if limit:  # this machine's speed drifts within a minute: the limit timed beside each step
            limits.append(limit())
        resumes.append(time.perf_counter())

    SFT.batch, MetricsLog.write = counted, timed
    steps = p["warmup"] + p["steps"]
    cfg = FinetuneConfig(
        method="sft",
        adapter="lora",
        base=p["base"],
        data=[FinetuneDataConfig(path=Path(p["chat"]), format="chat")],
        lora=LoraConfig(r=LORA_R, alpha=LORA_ALPHA, dropout=LORA_DROPOUT, target_modules=TARGETS),
        seq_len=p["seq_len"],
        batch_size=p["batch_size"],
        micro_batch_size=p["micro_batch"],
        max_steps=steps,
        lr=LR,
        warmup_steps=0,
        schedule="constant",
        weight_decay=0.0,
        beta1=BETAS[0],
        beta2=BETAS[1],
        grad_clip=GRAD_CLIP,
        precision="auto",
        compile=p.get("compile", False),
        val_fraction=0.0,  # every record trains, as in TRL's rows
        eval_every=steps,
        checkpoint_every=steps,  # once, after the last step's end
        seed=SEED,
    )
    with tempfile.TemporaryDirectory(prefix="trulyopen_bench_") as tmp:
        paths = FinetunePaths(Path(tmp) / "run")
        finetune(cfg, paths, fresh=True)
        lines = [json.loads(x) for x in paths.metrics.read_text().splitlines() if x.strip()]
    paired = {}
    if limits:  # step i (its positions, padding included) against the limits timed before and after it
        per_position = limit_shapes(p)[1]
        fractions = [
            positions[i] * per_position / (ends[i] - resumes[i - 1]) / ((limits[i] + limits[i + 1]) / 2)
            for i in range(p["warmup"], len(ends))
        ]
        paired = {"limit_by_step": limits, "fraction_of_paired_limit": statistics.median(fractions)}
    return {
        **measured(ends, real, positions, p["warmup"], resumes),
        **paired,
        "loop_tokens_per_s_by_step": [r["tokens_per_s"] for r in lines],
        "loop_tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in lines[p["warmup"] :]),
        "trained_tokens_by_step": [r["trained_tokens"] for r in lines],
        "loss_by_step": [r["loss"] for r in lines],
    }


def row_trl(p: dict) -> dict:
    """SFTTrainer + peft on the prompt/completion records; a callback times the ends of optimizer steps."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    real, positions, trained, ends = [0], [0], [0], []

    class Counting(SFTTrainer):
        def training_step(self, *args, **kwargs):
            inputs = args[1] if len(args) > 1 else kwargs["inputs"]
            mask = inputs.get("attention_mask")
            real[-1] += int(mask.sum()) if mask is not None else inputs["position_ids"].numel()
            positions[-1] += inputs["input_ids"].numel()
            trained[-1] += int((inputs["labels"] != -100).sum())
            return super().training_step(*args, **kwargs)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())
            for counts in (real, positions, trained):
                counts.append(0)

    records = [json.loads(x) for x in Path(p["prompt_completion"]).read_text().splitlines()]
    with tempfile.TemporaryDirectory(prefix="trulyopen_bench_") as tmp:
        args = SFTConfig(
            output_dir=tmp,
            per_device_train_batch_size=p["micro_batch"],
            gradient_accumulation_steps=p["accumulation"],
            max_steps=p["warmup"] + p["steps"],
            max_length=p["max_length"],
            packing=p["packing"],
            completion_only_loss=True,
            learning_rate=LR,
            lr_scheduler_type="constant",
            warmup_steps=0,
            adam_beta1=BETAS[0],
            adam_beta2=BETAS[1],
            weight_decay=0.0,
            max_grad_norm=GRAD_CLIP,
            optim="adamw_torch_fused",
            bf16=p["bf16"],  # SFTConfig's default (True) where the CPU has bf16 hardware; else emulated
            use_cpu=True,
            gradient_checkpointing=False,  # SFTConfig's default is True; ours does not recompute
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=SEED,
        )
        lora = {
            "r": LORA_R,
            "lora_alpha": LORA_ALPHA,
            "lora_dropout": LORA_DROPOUT,
            "target_modules": TARGETS,
        }
        peft = LoraConfig(**lora, task_type="CAUSAL_LM")
        model = AutoModelForCausalLM.from_pretrained(p["base"], dtype=getattr(torch, p["weights"]))
        tok = AutoTokenizer.from_pretrained(p["base"])
        t = time.perf_counter()
        trainer = Counting(
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_list(records),
            processing_class=tok,
            peft_config=peft,
            callbacks=[Clock()],
        )
        prepare_s = time.perf_counter() - t
        out = trainer.train()
    return {
        **measured(ends, real[:-1], positions[:-1], p["warmup"]),
        "trained_tokens_by_step": trained[:-1],
        "dataset_prepare_s": prepare_s,
        "bf16": args.bf16,
        "gradient_checkpointing": args.gradient_checkpointing,
        "train_loss": out.training_loss,
    }


def lora_shapes(micro: int, seq_len: int, vocab: int) -> list[dict]:
    """Every matmul of one micro-batch of our LoRA step (see the module's docstring), as
    _machine.time_matmuls takes them: m x k x n, kind, how many in the step."""
    M, d, r = micro * seq_len, HIDDEN // HEADS, LORA_R
    linears = [("q/k/v", HIDDEN, HIDDEN, 3), ("o", HIDDEN, HIDDEN, 1)]
    linears += [("gate/up", HIDDEN, MLP, 2), ("down", MLP, HIDDEN, 1)]
    out = []
    for name, i, o, per_layer in linears:
        n, grads = per_layer * LAYERS, per_layer * (LAYERS - 1 if name == "q/k/v" else LAYERS)
        out += [
            {"name": f"{name} base x@W^T", "m": M, "k": i, "n": o, "count": n, "kind": "xWt"},
            {"name": f"{name} base g@W", "m": M, "k": o, "n": i, "count": grads, "kind": "gW"},
            {"name": f"{name} lora x@A^T", "m": M, "k": i, "n": r, "count": n, "kind": "xWt"},
            {"name": f"{name} lora xA@B^T", "m": M, "k": r, "n": o, "count": n, "kind": "xWt"},
            {"name": f"{name} lora g@B", "m": M, "k": o, "n": r, "count": n, "kind": "gW"},
            {"name": f"{name} lora dB g^T@xA", "m": o, "k": M, "n": r, "count": n, "kind": "gtx"},
            {"name": f"{name} lora dA h^T@x", "m": r, "k": M, "n": i, "count": n, "kind": "gtx"},
            {"name": f"{name} lora h@A", "m": M, "k": r, "n": i, "count": grads, "kind": "gW"},
        ]
    out += [
        {"name": "lm_head x@W^T", "m": M, "k": HIDDEN, "n": vocab, "count": 1, "kind": "xWt"},
        {"name": "lm_head g@W", "m": M, "k": vocab, "n": HIDDEN, "count": 1, "kind": "gW"},
    ]
    for name, m, k, n in [
        ("attn QK^T", seq_len, d, seq_len),
        ("attn AV", seq_len, seq_len, d),
        ("attn dS@K", seq_len, seq_len, d),
        ("attn dS^T@Q", seq_len, seq_len, d),
        ("attn dO@V^T", seq_len, d, seq_len),
        ("attn A^T@dO", seq_len, seq_len, d),
    ]:
        out.append(
            {"name": name, "m": m, "k": k, "n": n, "count": LAYERS, "kind": "bmm", "batch": micro * HEADS}
        )
    return out


def limit_shapes(p: dict) -> tuple[list[dict], float]:
    """The LoRA step's matmul shapes for one micro-batch, and their FLOPs per position."""
    shapes = lora_shapes(p["micro_batch"], p["seq_len"], p["vocab"])
    flops = sum(2 * s["m"] * s["k"] * s["n"] * s["count"] * s.get("batch", 1) for s in shapes)
    return shapes, flops / (p["micro_batch"] * p["seq_len"])


def limit_timer(p: dict):
    """A function that times the LoRA step's matmuls, alone at their shapes in our precision: FLOP/s."""
    import torch

    from trulyopen.train.precision import choose_dtype, reuse_freed_memory

    reuse_freed_memory()  # as our loop does
    dtype = choose_dtype("auto", torch.device("cpu"))
    shapes = limit_shapes(p)[0]

    def limit() -> float:
        _, flops, seconds = time_matmuls(shapes, dtype, p.get("repeat", 3))
        return flops / seconds

    return limit


def row_limit(p: dict) -> dict:
    """The LoRA step's matmuls alone, at their shapes, in our precision."""
    import torch

    from trulyopen.train.precision import choose_dtype, reuse_freed_memory

    reuse_freed_memory()  # as our loop does
    dtype = choose_dtype("auto", torch.device("cpu"))
    shapes, per_position = limit_shapes(p)
    timed, flops, seconds = time_matmuls(shapes, dtype, p["repeat"])
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "shapes": timed,
        "flops_per_position": per_position,
        "limit_flops_per_s": flops / seconds,
    }


ROWS = {"ours": row_ours, "trl": row_trl, "limit": row_limit}


def child(name: str, params: dict) -> dict:
    result = run_row(__file__, name, params, QUIET)
    wall, share = result["_run"]["wall_s"], result["_run"]["others_share"]
    print(f"  ({wall:.0f} s; others took {share:.0%} of the CPUs{': DISTURBED' * (share > DISTURBED)})")
    return result


# ----------------------------------------------------------------------------- data, model, report


def build_data(tmp: Path) -> Path:
    """The quickstart's corpus and tokenizer, then its synth SFT records, in `tmp` (no pretraining)."""
    from trulyopen.pipeline import run
    from trulyopen.recipe import load_recipe
    from trulyopen.synth import synthesize

    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    run_dir, t = tmp / "data_run", time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        run(recipe, run_dir=run_dir, until="tokenizer")
        corpus, workers = run_dir / "data" / "corpus", os.cpu_count() or 1
        synthesize(recipe.synth, corpus, run_dir / "synth", recipe.data.decontamination, workers=workers)
    print(f"data: the quickstart's corpus, tokenizer and synth records in {time.perf_counter() - t:.0f} s")
    return run_dir


def prepare(data_run: Path, tmp: Path, seq_len: int) -> dict:
    """The base model's directory, and the kept records in both forms (rendered once, by our renderer)."""
    from transformers import AutoTokenizer

    from trulyopen.finetune.render import ChatRenderer, item_of
    from trulyopen.model.build import from_preset
    from trulyopen.model.export import export_hf
    from trulyopen.model.presets import Dims
    from trulyopen.train.packing import epoch_order, pack_rows

    tok = AutoTokenizer.from_pretrained(str(data_run / "tokenizer"))
    dims = Dims(hidden=HIDDEN, layers=LAYERS, heads=HEADS, kv_heads=HEADS, intermediate=MLP)
    model = from_preset("llama", dims, len(tok), MAX_POS, SEED)
    base = export_hf(model, data_run / "tokenizer", tmp / "base")
    renderer, chat, pc, lengths = ChatRenderer(tok), [], [], []
    lines = (data_run / "synth" / "sft.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines if x.strip()]
    for r in records:
        messages = [{"role": m["role"], "content": m["content"]} for m in r["messages"]]
        n = len(item_of(renderer.conversation(messages)))  # positions in our rows: all tokens but the last
        if n <= seq_len:
            prompt = renderer.text(messages[:-1], generation_prompt=True)
            chat.append({"id": r["id"], "messages": messages})
            pc.append({"prompt": prompt, "completion": renderer.text(messages)[len(prompt) :]})
            lengths.append(n)
    for name, rows in (("chat.jsonl", chat), ("prompt_completion.jsonl", pc)):
        (tmp / name).write_text("".join(json.dumps(x) + "\n" for x in rows))
    q = statistics.quantiles(lengths, n=10)
    rows_epoch0 = pack_rows(lengths, epoch_order(len(lengths), SEED, 0), seq_len)  # as ours packs
    return {
        "base": str(base),
        "chat": str(tmp / "chat.jsonl"),
        "prompt_completion": str(tmp / "prompt_completion.jsonl"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab": len(tok),
        "records": len(records),
        "kept": len(chat),
        "lengths": {
            "p10": q[0],
            "p50": q[4],
            "p90": q[8],
            "max": max(lengths),
            "mean": statistics.fmean(lengths),
        },
        "our_real_tokens_per_row": sum(lengths) / len(rows_epoch0),
    }


def machine() -> dict:
    import peft
    import torch
    import transformers
    import trl

    from trulyopen.train.precision import choose_dtype

    cpu, flags = "unknown", ""
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((x.split(":", 1)[1].strip() for x in info if x.startswith("model name")), cpu)
        flags = next((x for x in info if x.startswith("flags")), "")
    git = [["git", "rev-parse", "--short", "HEAD"], ["git", "status", "--porcelain", "src"]]
    commit, dirty = (subprocess.run(c, cwd=ROOT, capture_output=True, text=True).stdout.strip() for c in git)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "bf16_hardware": "amx_bf16" in flags or "avx512_bf16" in flags,
        "our_precision": str(choose_dtype("auto", torch.device("cpu"))).replace("torch.", ""),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        **{m.__name__: m.__version__ for m in (torch, transformers, trl, peft)},
        "commit": commit + ("+dirty(src)" if dirty else ""),
    }


def report(r: dict) -> None:
    m, d, rows, w = r["machine"], r["data"], r["rows"], r["warmup"]
    versions = ", ".join(f"{k} {m[k]}" for k in ("python", "torch", "transformers", "trl", "peft"))
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, bf16 hardware {m['bf16_hardware']}; {versions}")
    print(f"code: commit {m['commit']}, {r['date']}")
    ln = d["lengths"]
    print(
        f"data: {d['kept']:,} of {d['records']:,} records kept (<= {r['seq_len']} positions); positions "
        f"p10/p50/p90/max {ln['p10']:.0f}/{ln['p50']:.0f}/{ln['p90']:.0f}/{ln['max']}; "
        f"model {d['parameters'] / 1e6:.1f} M parameters; our precision {m['our_precision']}"
    )
    head = ("row", "tokens/s", "ours ÷", "padding", "tokens/step", "peak RSS MB", "steps", "others")
    line = "{:<40} {:>8} {:>6} {:>7} {:>11} {:>11} {:>5} {:>6}"
    print("\n" + line.format(*head))
    for name, row in rows.items():
        ratio = "" if name == "ours" else f"{rows['ours']['tokens_per_s'] / row['tokens_per_s']:.2f}x"
        per_step = statistics.fmean(row["real_tokens_by_step"][w:])
        cells = (f"{row['tokens_per_s']:.1f}", ratio, f"{row['padding_share']:.1%}", f"{per_step:,.0f}")
        cells += (f"{row['peak_rss_mb']:,.0f}", row["measured_steps"], f"{row['_run']['others_share']:.0%}")
        print(line.format(r["labels"][name], *cells))
    trained = ", ".join(
        f"{n} {sum(row['trained_tokens_by_step'][w:]) / sum(row['real_tokens_by_step'][w:]):.0%}"
        for n, row in rows.items()
    )
    print(
        "(tokens/s: real, non-padding positions per second over the measured steps; the loop's own median "
        f"tokens_per_s: {rows['ours']['loop_tokens_per_s_median']:.1f}; trained share of tokens: {trained})"
    )
    ours, limit = rows["ours"], r["limit"]
    ratio = ours["tokens_per_s"] / rows["trl"]["tokens_per_s"]
    positions_per_s = ours["tokens_per_s"] / (1 - ours["padding_share"])  # padding is computed too
    flops = positions_per_s * limit["flops_per_position"]
    fraction = flops / limit["limit_flops_per_s"]
    runs = ", ".join(f"{x / 1e9:.1f}" for x in limit["runs_limit_flops_per_s"])
    print(
        f"\nLoRA limit ({limit['dtype']}): {limit['limit_flops_per_s'] / 1e9:.1f} GFLOP/s (before and after: "
        f"{runs}; the higher counts), {limit['flops_per_position'] / 1e6:.1f} MFLOP per position"
    )
    print(
        f"ours: {positions_per_s:,.0f} positions/s (padding included) = {flops / 1e9:.1f} GFLOP/s "
        f"= {fraction:.1%} of the LoRA limit timed before and after the rows"
    )
    if "fraction_of_paired_limit" in ours:  # the target's figure: each step against the limit beside it
        fraction = ours["fraction_of_paired_limit"]
        beside = ", ".join(f"{x / 1e9:.0f}" for x in ours["limit_by_step"])
        print(f"ours: {fraction:.1%} of the limit timed beside each step (median; limits {beside} GFLOP/s)")
    disturbed = [n for n, row in rows.items() if row["_run"]["others_share"] > DISTURBED]
    others = {n: ours["tokens_per_s"] / row["tokens_per_s"] for n, row in rows.items() if n != "ours"}
    r["figures"] = {
        "ratio_vs_trl": ratio,
        "ratios": others,
        "target": TARGET,
        "met": ratio >= TARGET,
        "flops_per_s": flops,
        "fraction_of_limit": fraction,
        "limit_target": LIMIT_TARGET,
        "limit_met": fraction >= LIMIT_TARGET,
        "disturbed_rows": disturbed,
    }
    print(f"\nours ÷ TRL default: {ratio:.2f}x; target {TARGET}x: {'MET' if ratio >= TARGET else 'MISSED'}")
    print(
        f"ours at {fraction:.1%} of the LoRA limit; target {LIMIT_TARGET:.0%}: "
        f"{'MET' if fraction >= LIMIT_TARGET else 'MISSED'}"
    )
    if disturbed:
        print(
            f"WARNING: other processes took over {DISTURBED:.0%} of the CPUs during: {', '.join(disturbed)}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: small steps, few of them")
    ap.add_argument("--data-run", help="reuse this run directory's tokenizer and synth/sft.jsonl")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16, help="our packed rows per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=8, help="our rows per forward pass")
    ap.add_argument("--steps", type=int, default=4, help="measured optimizer steps per row")
    ap.add_argument("--warmup", type=int, default=1, help="optimizer steps before the measured ones")
    ap.add_argument("--skip-packed", action="store_true", help="leave out TRL with packing=True")
    ap.add_argument("--matmul-repeat", type=int, default=5, help="runs of each matmul for the LoRA limit")
    for hidden in ("--row", "--row-params", "--row-out"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.row:  # a child process: one row
        Path(a.row_out).write_text(json.dumps(ROWS[a.row](json.loads(a.row_params))))
        return
    if a.quick:
        a.batch_size, a.micro_batch, a.steps, a.warmup = 4, 4, 1, 1
    if a.warmup < 1 or a.steps < 1 or a.batch_size % a.micro_batch:
        ap.error("--warmup and --steps must be >= 1, --batch-size a multiple of --micro-batch")
    os.environ.update(QUIET)
    r: dict = {"benchmark": "finetune_throughput", "date": datetime.now(UTC).strftime("%Y-%m-%d")}
    r |= {"argv": sys.argv[1:], "machine": machine(), "seq_len": a.seq_len, "warmup": a.warmup}
    with tempfile.TemporaryDirectory(prefix="trulyopen_bench_") as tmp:
        data_run = Path(a.data_run).resolve() if a.data_run else build_data(Path(tmp))
        d = r["data"] = {"run_dir": str(data_run), **prepare(data_run, Path(tmp), a.seq_len)}
        common = {k: d[k] for k in ("base", "chat", "prompt_completion")}
        common |= {"warmup": a.warmup, "steps": a.steps}
        # TRL's default row: about as many real tokens per step as ours (its examples are 2 positions longer)
        examples = a.batch_size * d["our_real_tokens_per_row"] / (d["lengths"]["mean"] + 2)
        accumulation, per_step = max(1, round(examples / TRL_MICRO)), a.batch_size // a.micro_batch
        bf16 = r["machine"]["our_precision"] == "bfloat16"
        r["labels"] = {
            "ours": f"trulyopen finetune(), {a.batch_size} packed rows",
            "trl": f"TRL SFTTrainer, {TRL_MICRO} x {accumulation} examples padded",
            "trl_bf16w": f"TRL, base in bf16, {TRL_MICRO} x {accumulation} padded",
            "trl_packed": f"TRL SFTTrainer packing, {a.micro_batch} x {per_step} rows",
        }
        rows = r["rows"] = {}
        limit = {
            "micro_batch": a.micro_batch,
            "seq_len": a.seq_len,
            "vocab": d["vocab"],
            "repeat": a.matmul_repeat,
        }
        print(
            f"\n[1/5] the LoRA limit: our LoRA step's matmuls at their shapes ({a.micro_batch} x {a.seq_len})"
        )
        limits = [child("limit", limit)]
        print(f"\n[2/5] {r['labels']['ours']}: {a.warmup} warm-up + {a.steps} measured steps")
        ours = {"seq_len": a.seq_len, "batch_size": a.batch_size, "micro_batch": a.micro_batch}
        ours |= {"paired": True, "vocab": d["vocab"], "repeat": 3}  # the limit timed beside each step
        rows["ours"] = child("ours", common | ours)
        print(f"\n[3/5] {r['labels']['trl']} to the longest, per step ({'bf16' if bf16 else 'fp32'})")
        trl = common | {"micro_batch": TRL_MICRO, "accumulation": accumulation, "packing": False}
        trl |= {"bf16": bf16, "weights": "float32"}
        rows["trl"] = child("trl", trl | {"max_length": a.seq_len + 2})
        if bf16:
            print(f"\n[4/5] {r['labels']['trl_bf16w']} to the longest, per step")
            rows["trl_bf16w"] = child("trl", trl | {"max_length": a.seq_len + 2, "weights": "bfloat16"})
        print("\n[1/5 again] the LoRA limit, right after")
        limits.append(child("limit", limit))
        r["limit"] = max(limits, key=lambda lm: lm["limit_flops_per_s"])
        r["limit"]["runs_limit_flops_per_s"] = [lm["limit_flops_per_s"] for lm in limits]
        if not a.skip_packed:
            print(f"\n[5/5] {r['labels']['trl_packed']} per step")
            packed = {"micro_batch": a.micro_batch, "accumulation": per_step, "packing": True}
            rows["trl_packed"] = child("trl", trl | packed | {"max_length": a.seq_len})
    report(r)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
