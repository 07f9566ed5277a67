"""Tool use at quickstart size: how often a model calls the right tool before and after SFT on the
synth stage's tool conversations. Not a speed benchmark: the figures are rates, with their n.

    .venv/bin/python benchmarks/tool_use.py                  # runs/quickstart, 300 SFT steps
    .venv/bin/python benchmarks/tool_use.py --run /tmp/qs --steps 300

It takes a finished quickstart run (its pretraining checkpoint, tokenizer, synth/tools.jsonl and
eval/tasks/tool_call*.jsonl), fine-tunes the pretrained model on the tool conversations alone in a
run directory of its own beside it, and evaluates the base and the tuned model on both held-out
tasks: `tool_call` (new questions to functions trained on) and `tool_call_new_tools` (functions
never trained on). The quickstart's own finetune stage mixes these conversations into 40 steps of
instruction tuning, too few for either model to call a tool; this shows what more steps on them do.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

from trulyopen.evaluate import models
from trulyopen.evaluate.runner import evaluate_suite
from trulyopen.evaluate.taskfile import TaskSpec
from trulyopen.finetune.stage import FinetunePaths, finetune
from trulyopen.recipe import FinetuneConfig
from trulyopen.train import checkpoint

TASKS = ("tool_call", "tool_call_new_tools")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/quickstart"), help="a finished quickstart run")
    ap.add_argument("--steps", type=int, default=300, help="SFT steps on the tool conversations")
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    run = args.run.resolve()
    specs = [
        TaskSpec(name=t, path=run / "eval" / "tasks" / f"{t}.jsonl", type="tool_call", max_new_tokens=64)
        for t in TASKS
    ]
    for spec in specs:
        if not spec.path.is_file() or not (run / "synth" / "tools.jsonl").is_file():
            raise SystemExit(
                f"{run}: run the quickstart first (it makes synth/tools.jsonl and {spec.path.name})"
            )

    # a run directory of its own that shares the quickstart's pretraining and tokenizer
    work = run.parent / f"{run.name}-tool-use"
    shutil.rmtree(work, ignore_errors=True)
    (work / "checkpoints").mkdir(parents=True)
    (work / "checkpoints" / "pretrain").symlink_to(run / "checkpoints" / "pretrain")
    (work / "tokenizer").symlink_to(run / "tokenizer")
    cfg = FinetuneConfig(
        method="sft",
        data=[{"path": str(run / "synth" / "tools.jsonl")}],
        seq_len=512,
        batch_size=4,
        micro_batch_size=4,
        max_steps=args.steps,
        lr=args.lr,
        warmup_steps=10,
        eval_every=args.steps,
        checkpoint_every=args.steps,
        val_fraction=0.0,
    )
    t0 = time.perf_counter()
    tuned = finetune(cfg, FinetunePaths(work))
    seconds = time.perf_counter() - t0

    rates: dict[str, dict] = {}
    for name, ckpt in (("base", checkpoint.newest(run / "checkpoints" / "pretrain")), ("tuned", tuned)):
        results = evaluate_suite(models.load(ckpt), specs, work / "eval" / name)
        for task, r in results["tasks"].items():
            rates[f"{name}/{task}"] = {k: (round(m["value"], 3), m["n"]) for k, m in r["metrics"].items()}
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; SFT {args.steps} steps in {seconds:.0f}s")
    print(f"{'model/task':<34} {'called':>8} {'right_tool':>11} {'accuracy':>9} {'exact':>7} {'n':>4}")
    for key, m in rates.items():
        print(
            f"{key:<34} {m['called'][0]:>8.3f} {m['right_tool'][0]:>11.3f} {m['accuracy'][0]:>9.3f} "
            f"{m['exact'][0]:>7.3f} {m['called'][1]:>4}"
        )
    print(json.dumps({"steps": args.steps, "sft_seconds": round(seconds, 1), "rates": rates}))


if __name__ == "__main__":
    main()
