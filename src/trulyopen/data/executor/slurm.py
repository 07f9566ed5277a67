"""Slurm executor: one job array per step, submitted with sbatch, tasks on a shared file system.

For each step it writes `work/<step>/job.sbatch`, an array whose element k runs the k-th unfinished
task with `python -m trulyopen.data.executor.worker work/<step>/spec.json k`, and submits it. The
driver then follows the array with squeue (progress comes from the tasks' done files) and, when the
job has left the queue, names any task that did not finish with its job id and log file.

    #SBATCH --array=0-N%P   --output=work/<step>/logs/%A_%a.out   --cpus-per-task=1
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from trulyopen.data.executor import TaskFailed, TaskStep
from trulyopen.files import write_json, write_text
from trulyopen.recipe import RecipeError, SlurmConfig

MAX_ARRAY = 1000  # Slurm's default MaxArraySize is 1001: larger steps go in several arrays


def job_script(step: TaskStep, cfg: SlurmConfig, first: int, count: int) -> str:
    """The sbatch script of array elements [first, first + count) of the step's unfinished tasks."""
    work = Path(step.work).resolve()
    python = cfg.python or sys.executable
    limit = f"%{cfg.max_parallel}" if cfg.max_parallel else ""
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=trulyopen-{step.name}",
        f"#SBATCH --array=0-{count - 1}{limit}",
        f"#SBATCH --output={work}/logs/%A_%a.out",
        "#SBATCH --cpus-per-task=1",
        f"#SBATCH --time={cfg.time}",
        *([f"#SBATCH --mem={cfg.mem}"] if cfg.mem else []),
        *([f"#SBATCH --partition={cfg.partition}"] if cfg.partition else []),
        *(f"#SBATCH {a}" for a in cfg.sbatch_args),
        "set -euo pipefail",
        "export TOKENIZERS_PARALLELISM=false TRULYOPEN_QUIET=1",
        f"exec {shlex.quote(python)} -m trulyopen.data.executor.worker "
        f'{shlex.quote(str(work / "spec.json"))} "$(( SLURM_ARRAY_TASK_ID + {first} ))"',
        "",
    ]
    return "\n".join(lines)


def _sh(*cmd: str) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise TaskFailed(f"{' '.join(cmd)} failed: {(out.stderr or out.stdout).strip()}")
    return out.stdout.strip()


class SlurmExecutor:
    def __init__(self, cfg: SlurmConfig):
        if shutil.which("sbatch") is None or shutil.which("squeue") is None:
            raise RecipeError(
                "data.executor: slurm needs sbatch and squeue on PATH (run on a Slurm login node)"
            )
        self.cfg = cfg

    def run(self, step: TaskStep, todo: list[int]) -> Iterator[tuple[int, dict]]:
        if not todo:
            return
        import json

        work = Path(step.work)
        (work / "logs").mkdir(parents=True, exist_ok=True)
        write_json(work / "todo.json", todo)  # array element k runs task todo[k]
        jobs = []
        for first in range(0, len(todo), MAX_ARRAY):
            script = work / f"job_{first:06d}.sbatch"
            write_text(script, job_script(step, self.cfg, first, min(MAX_ARRAY, len(todo) - first)))
            jobs.append((first, _sh("sbatch", "--parsable", str(script)).split(";")[0]))
        seen: set[int] = set()
        while True:
            queued = any(_sh("squeue", "-h", "-j", job, "-o", "%i") for _, job in jobs)
            for i in todo:
                if i not in seen and step.done_file(i).is_file():
                    seen.add(i)
                    yield i, json.loads(step.done_file(i).read_text())
            if not queued:
                break
            time.sleep(self.cfg.poll_seconds)
        missing = [k for k, i in enumerate(todo) if i not in seen]
        if missing:
            k = missing[0]
            first, job = next((f, j) for f, j in reversed(jobs) if f <= k)
            log = work / "logs" / f"{job}_{k - first}.out"
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.is_file() else []
            raise TaskFailed(
                f"data {step.name}: Slurm job {job} array task {k - first} (task {todo[k]}) did not finish"
                f"{f' ({len(missing)} tasks in all)' if len(missing) > 1 else ''}; log: {log}"
                + (f"; last line: {tail[0]}" if tail else "")
            )
