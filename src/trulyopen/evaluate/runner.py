"""Run a task suite on one model: results with standard errors, per-item records, a table, a ledger line.

out_dir/results.json                   every metric {value, stderr, n} per task, the task files'
                                       sha256, the model evaluated, the machine and code version;
                                       for a judge task, the judge (or why it was not asked)
out_dir/<task>.instances.jsonl         per item: prompt, choices, scores, prediction, correct
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from trulyopen.evaluate.generation import evaluate_code, evaluate_generation
from trulyopen.evaluate.models import EvalModel
from trulyopen.evaluate.multiple_choice import evaluate as evaluate_mc
from trulyopen.evaluate.taskfile import (
    TaskError,
    TaskSpec,
    check_judge_items,
    load_instances,
    load_suite,
)
from trulyopen.evaluate.text import evaluate_text
from trulyopen.evaluate.tool_calls import evaluate_tool_calls
from trulyopen.files import atomic_open, sha256_file, write_json
from trulyopen.ledger import Ledger, code_version, file_record, machine_summary


def run_task(em: EvalModel, spec: TaskSpec) -> tuple[dict, list[dict], dict]:
    """The task's metrics, its per-item records, and what else its results entry says (a judge)."""
    instances = load_instances(spec.path, spec.type)
    if spec.limit is not None:
        instances = instances[: spec.limit]
    if em.processor is not None or any(i.images for i in instances):
        return (*_run_vision_task(em, spec, instances), {})
    if spec.type == "judge":
        from trulyopen.evaluate.judging import evaluate_judge

        check_judge_items(spec, instances)
        return evaluate_judge(em.model, em.tokenizer, spec, instances)
    if spec.type == "multiple_choice":
        result = evaluate_mc(em.model, em.tokenizer, spec, instances, em.max_len)
    elif spec.type == "generation":
        result = evaluate_generation(em.model, em.tokenizer, spec, instances)
    elif spec.type == "code":
        result = evaluate_code(em.model, em.tokenizer, spec, instances)
    elif spec.type == "tool_call":
        result = evaluate_tool_calls(em.model, em.tokenizer, spec, instances, em.max_len)
    else:
        result = evaluate_text(em.model, em.tokenizer, spec, instances, em.max_len)
    return (*result, {})


def _run_vision_task(em: EvalModel, spec: TaskSpec, instances: list) -> tuple[dict, list[dict]]:
    """A task with images, or any task of a vision-language model: multiple choice and generation."""
    from trulyopen.evaluate import vision

    if em.processor is None:
        first = next(i for i in instances if i.images)
        raise TaskError(
            f"{first.where}: task {spec.name} has images, but {em.name} is a text-only model; "
            "evaluate a vision-language model on it"
        )
    if spec.type not in ("multiple_choice", "generation"):
        raise TaskError(
            f"task {spec.name}: {em.name} is a vision-language model; its tasks are multiple_choice "
            f"and generation, not {spec.type}"
        )
    if spec.few_shot:
        raise TaskError(f"task {spec.name}: few_shot is not supported for a vision-language model")
    if spec.type == "multiple_choice":
        return vision.evaluate_mc(em.model, em.processor, spec, instances)
    return vision.evaluate_generation(em.model, em.processor, spec, instances)


def in_loop(suite: Path, tokenizer_dir: Path) -> Callable[[torch.nn.Module, Callable], dict[str, float]]:
    """The task suite as a training loop calls it at each validation: (model, autocast) -> metrics.
    The suite is read now, so a bad one stops the run before it trains."""
    tasks = load_suite(suite)
    return lambda model, autocast: in_loop_metrics(model, tokenizer_dir, tasks, autocast)


def in_loop_metrics(model, tokenizer_dir: Path, tasks: list[TaskSpec], autocast) -> dict[str, float]:
    """Every task's metrics for a model in training, flattened for a metrics line: eval/<task>/<metric>."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    em = EvalModel(model, tok, "in-loop", "in-loop")
    was_training = model.training
    model.eval()
    out = {}
    with autocast():
        for spec in tasks:
            metrics = run_task(em, spec)[0]
            out.update({f"eval/{spec.name}/{k}": round(m["value"], 6) for k, m in metrics.items()})
    model.train(was_training)
    return out


def evaluate_suite(
    em: EvalModel, tasks: list[TaskSpec], out_dir: Path, ledger_dir: Path | None = None
) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"model": em.name, "loaded": em.source, "tasks": {}}
    for spec in tasks:
        t0 = time.perf_counter()
        metrics, records, notes = run_task(em, spec)
        path = out_dir / f"{spec.name}.instances.jsonl"
        with atomic_open(path) as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        results["tasks"][spec.name] = {
            "type": spec.type,
            "file": str(spec.path),
            "sha256": sha256_file(spec.path),
            "metrics": metrics,
            "seconds": round(time.perf_counter() - t0, 3),
            "settings": spec.model_dump(mode="json", exclude={"name", "path", "type"}),
            **notes,
        }
    results["code_version"] = code_version()
    results["machine"] = machine_summary()
    write_json(out_dir / "results.json", results)
    print_table(results)
    if ledger_dir is not None:
        Ledger(ledger_dir).append(
            {
                "stage": "eval/results",
                "model": em.source,
                "inputs": [file_record(Path(t["file"])) for t in results["tasks"].values()],
                "outputs": [file_record(p, ledger_dir) for p in sorted(out_dir.iterdir()) if p.is_file()],
            }
        )
    return results


def print_table(results: dict) -> None:
    print(f"eval: {results['model']}")
    print(f"  {'task':<28} {'metric':<16} {'value':>8} {'± stderr':>9} {'n':>6}")
    for name, task in results["tasks"].items():
        for metric, m in task["metrics"].items():
            extra = f"  ({m['form']})" if "form" in m else ""
            print(f"  {name:<28} {metric:<16} {m['value']:>8.4f} {m['stderr']:>9.4f} {m['n']:>6}{extra}")
        judge = task.get("judge")
        if judge is not None:
            why = judge.get("skipped") or judge.get("stopped")
            print(
                f"  {name:<28} judged by {judge['model']} ({judge['provider']})" + (f": {why}" if why else "")
            )
