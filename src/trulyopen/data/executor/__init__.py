"""Where the data stage's tasks run: `data.executor` is local processes, Ray, or Slurm.

A step is a module-level function `fn(context, task) -> result`, a JSON-able context that every task
needs (the data config, the work folder) and a list of JSON-able tasks. Running task i means

    result = fn(context, tasks[i])        (writes the task's own files under the work folder)
    work/<step>/done/<i>.json = result    (atomically, last)

so the executors differ only in where that happens, and the output bytes are the same on each. A
task whose done file exists is not run again: a killed stage resumes from its finished tasks.

    run_step(executor, step)  ─► results in task order, with one progress line per interval
"""

from __future__ import annotations

import importlib
import json
import resource
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trulyopen.errors import UserError
from trulyopen.files import write_json
from trulyopen.progress import Progress
from trulyopen.recipe import DataConfig, RecipeError


@dataclass
class TaskStep:
    name: str
    fn: str  # "module:function"
    context: dict[str, Any]
    tasks: list[dict[str, Any]]
    work: str  # the step's folder: done/, logs/, spec.json

    @property
    def done_dir(self) -> Path:
        return Path(self.work) / "done"

    def done_file(self, i: int) -> Path:
        return self.done_dir / f"{i:05d}.json"


class TaskFailed(UserError):
    """A task that kept failing (the message names the step, the task and, where known, its log)."""


def _function(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def run_task(step: TaskStep, i: int) -> dict[str, Any]:
    """Run task i of a step here and record its result; what every executor calls."""
    result = _function(step.fn)(step.context, step.tasks[i])
    # this process's peak memory so far (a worker runs many tasks), for the progress line
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    write_json(step.done_file(i), result)
    return result


def open_work(work: Path, key: dict[str, Any], fresh: bool) -> None:
    """Keep `work` (finished tasks) only if it was made for the same `key` (config, inputs, code);
    otherwise, or when `fresh`, start it anew."""
    stamp = work / "key.json"
    same = not fresh and stamp.is_file() and json.loads(stamp.read_text()) == key
    if not same:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        write_json(stamp, key)


def run_step(executor: Any, step: TaskStep) -> list[dict[str, Any]]:
    """Every task's result, in task order; runs only the tasks not done yet."""
    step.done_dir.mkdir(parents=True, exist_ok=True)
    write_json(Path(step.work) / "spec.json", asdict(step))
    results: dict[int, dict] = {}
    for i in range(len(step.tasks)):
        if step.done_file(i).is_file():
            results[i] = json.loads(step.done_file(i).read_text())
            results[i].pop("peak_rss_mb", None)
    todo = [i for i in range(len(step.tasks)) if i not in results]
    label = f"data {step.name}"
    with Progress(label, len(step.tasks), unit="tasks", docs=True, already=len(results)) as bar:
        for i, result in executor.run(step, todo):
            # as read back from its done file (sorted keys), so a resumed task's result is the same
            peak = result.pop("peak_rss_mb", 0)  # shown, not kept: results must not depend on the run
            results[i] = json.loads(json.dumps(result, sort_keys=True))
            bar.update(1, result.get("bytes", 0), result.get("docs", 0))
            bar.peak_rss_mb = max(bar.peak_rss_mb, peak)
    return [results[i] for i in range(len(step.tasks))]


def make_executor(cfg: DataConfig, workers: int):
    """The executor `data.executor` names; `workers` is the number of local processes (and of CPUs
    of a local Ray started for the stage)."""
    if cfg.executor == "local":
        from trulyopen.data.executor.local import LocalExecutor

        return LocalExecutor(workers)
    if cfg.executor == "ray":
        from trulyopen.data.executor.ray import RayExecutor

        return RayExecutor(cfg.ray, workers)
    from trulyopen.data.executor.slurm import SlurmExecutor

    return SlurmExecutor(cfg.slurm)


def require(module: str, extra: str, field: str) -> Any:
    """Import an optional engine, or stop with what to install (exit code 2)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RecipeError(
            f"{field}: {module} is not installed; install it with pip install -e '.[{extra}]'"
        ) from None
