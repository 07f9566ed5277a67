"""The eval stage of a run: built-in tasks from the held-out split, the recipe's suite, each of the
run's models, and how much of each task the training corpus already contained.

    <run>/eval/tasks/           the built-in task files (made from data/corpus/val.jsonl, and the
                                tool calls from synth/tools_heldout.jsonl: never trained on)
    <run>/vlm/data/eval/        the vlm stage's held-out pictures of code lines, when it ran
    <run>/eval/<stage>/         results.json and per-item records for that stage's newest checkpoint
    <run>/eval/<stage>/memorisation.json   where the run has a trace index: the share of greedy
                                continuations of held-out prompts copied verbatim from training
    <run>/eval/contamination.json
"""

from __future__ import annotations

from pathlib import Path

from trulyopen.evaluate import models
from trulyopen.evaluate.runner import evaluate_suite
from trulyopen.evaluate.taskfile import TaskSpec, load_suite
from trulyopen.files import write_json
from trulyopen.recipe import EvalConfig
from trulyopen.train import checkpoint

BUILTIN = [
    ("next_line", "multiple_choice", {}),
    ("docstring_completion", "code", {"max_new_tokens": 128}),
    ("heldout_text", "text", {}),
    ("tool_call", "tool_call", {"max_new_tokens": 64}),
    ("tool_call_new_tools", "tool_call", {"max_new_tokens": 64}),
]


VLM_SUITE = Path("vlm") / "data" / "eval" / "suite.yaml"


def builtin_specs(run_dir: Path, cfg: EvalConfig) -> list[TaskSpec]:
    from trulyopen.evaluate.builtin import build_builtin_tasks

    out = run_dir / "eval" / "tasks"
    build_builtin_tasks(
        run_dir / "data" / "corpus" / "val.jsonl",
        out,
        seed=cfg.seed,
        max_items=cfg.builtin_items,
        tools_heldout=run_dir / "synth" / "tools_heldout.jsonl",
    )
    specs = []
    for name, kind, extra in BUILTIN:
        path = out / f"{name}.jsonl"
        if path.exists() and path.stat().st_size:
            specs.append(TaskSpec(name=name, path=path, type=kind, seed=cfg.seed, **extra))
    return specs


def suite(run_dir: Path, cfg: EvalConfig) -> list[TaskSpec]:
    specs = builtin_specs(run_dir, cfg) if cfg.builtin else []
    if (run_dir / VLM_SUITE).exists():  # the vlm stage's held-out pictures of code lines
        specs += load_suite(run_dir / VLM_SUITE)
    return specs + (load_suite(cfg.suite) if cfg.suite else [])


def _memorisation(loaded: models.EvalModel, run_dir: Path, cfg: EvalConfig, out: Path) -> None:
    from trulyopen.trace.memorisation import memorisation
    from trulyopen.trace.spans import Tracer, find_index

    tracer = Tracer(*find_index(run_dir))
    result = memorisation(
        loaded.model, tracer, run_dir / "data" / "shards", prompts=cfg.memorisation_prompts, seed=cfg.seed
    )
    write_json(out / "memorisation.json", result)
    print(
        f"eval: {out.name} copies {result['share']:.2%} of its tokens verbatim from training (spans of "
        f"{result['min_span_tokens']}+ tokens, {result['prompts']} held-out prompts)"
    )


def run_eval_stage(cfg: EvalConfig, run_dir: Path) -> list[Path]:
    tasks = suite(run_dir, cfg)
    outputs = []
    for stage in cfg.models:
        ckpt = checkpoint.newest(run_dir / "checkpoints" / stage)
        if ckpt is None:
            print(f"eval: no {stage} checkpoint in {run_dir}, skipped")
            continue
        out = run_dir / "eval" / stage
        loaded = models.load(ckpt)
        evaluate_suite(loaded, tasks, out)
        if cfg.memorisation_prompts and (run_dir / "data" / "index" / "index.json").is_file():
            _memorisation(loaded, run_dir, cfg, out)
        outputs += sorted(p for p in out.iterdir() if p.is_file())
    if cfg.contamination and (run_dir / "data" / "corpus" / "train.jsonl").exists():
        from trulyopen.evaluate.contamination import contamination_report

        report = contamination_report(
            {t.name: t.path for t in tasks},
            {t.name: t.type for t in tasks},
            [run_dir / "data" / "corpus" / "train.jsonl"],
            ngram=cfg.ngram,
        )
        write_json(run_dir / "eval" / "contamination.json", report)
        outputs.append(run_dir / "eval" / "contamination.json")
    return outputs
