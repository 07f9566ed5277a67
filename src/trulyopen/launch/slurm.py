"""Slurm: an sbatch script from the plan, submitted; squeue, sacct and the job's log for the rest.

    #SBATCH --nodes=N --ntasks-per-node=1 --gpus-per-node=G --output=<launch dir>/slurm-%j.out
    export TRULYOPEN_LAUNCH_NAME=...                 (the ledger's `where`; Slurm adds SLURM_JOB_ID...)
    export HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    srun --nodes=1 --ntasks=1 python -m trulyopen data RECIPE          (the data stages, one process)
    srun torchrun --nnodes=$SLURM_NNODES --node_rank=$SLURM_NODEID ... -m trulyopen pretrain RECIPE
    srun --nodes=1 --ntasks=1 python -m trulyopen run RECIPE           (the rest: eval, release)
         (or only srun python -m trulyopen VERB RECIPE, when nothing trains on more than one process)

A cluster shares its file system between the login node and the compute nodes, so the job runs this
checkout with this Python (or `launch.slurm.python`), the recipe as given, and the run directory
where it would be here. A recipe whose data section uses `executor: slurm` submits the data stage's
job arrays from inside the job.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

from trulyopen.launch.plan import LaunchError, Plan
from trulyopen.recipe import recipe_to_yaml

DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL")


def script(plan: Plan, recipe_file: Path, run_dir: Path, log: Path) -> str:
    cfg = plan.cfg.slurm
    python = cfg.python or sys.executable
    steps = plan.steps(
        shlex.quote(str(recipe_file)),
        shlex.quote(str(run_dir)),
        '"$SLURM_NODEID"',
        '"$SLURM_NNODES"',
        '"$HEAD"',
    )
    py = shlex.quote(python)
    # the first node alone: one task; every node: one task each, expanding its own $SLURM_NODEID
    sruns = [
        f"srun --nodes=1 --ntasks=1 {command.replace('python ', f'{py} ', 1)}"
        if where == "first"
        else f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(command.replace('python ', f'{py} ', 1))}"
        for where, command in steps
    ]
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={plan.name}",
        f"#SBATCH --nodes={plan.cfg.nodes}",
        "#SBATCH --ntasks-per-node=1",
        *([f"#SBATCH --gpus-per-node={plan.gpus_per_node}"] if plan.gpus_per_node else []),
        f"#SBATCH --output={log}",
        f"#SBATCH --time={cfg.time}",
        *([f"#SBATCH --mem={cfg.mem}"] if cfg.mem else []),
        *([f"#SBATCH --partition={cfg.partition}"] if cfg.partition else []),
        *(f"#SBATCH {a}" for a in cfg.sbatch_args),
        "set -euo pipefail",
        f"export TRULYOPEN_LAUNCH_NAME={shlex.quote(plan.name)}",
        f"export TRULYOPEN_LAUNCH_ACCELERATORS={shlex.quote(plan.cfg.gpus or '')}",
        f"export TRULYOPEN_CODE={shlex.quote(f'{plan.code.kind}:{plan.code.version}')}",
        'export HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"cd {shlex.quote(str(Path.cwd()))}",
        *sruns,
        "",
    ]
    return "\n".join(lines)


def write_job(plan: Plan, launch_dir: Path, run_dir: Path) -> tuple[Path, Path]:
    """(the sbatch script, the job's log file: %j is the job id)."""
    recipe_file = launch_dir / "recipe.yaml"
    recipe_file.write_text(recipe_to_yaml(plan.recipe))
    log = launch_dir / "slurm-%j.out"
    path = launch_dir / "job.sbatch"
    path.write_text(script(plan, recipe_file, run_dir.resolve(), log))
    return path, log


def _tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise LaunchError(f"--on slurm: `{name}` is not on PATH here (run on the cluster's login node)")
    return found


def _sh(*cmd: str) -> str:
    out = subprocess.run([_tool(cmd[0]), *cmd[1:]], capture_output=True, text=True)
    if out.returncode != 0:
        raise LaunchError(f"{' '.join(cmd)}: {(out.stderr or out.stdout).strip()}")
    return out.stdout.strip()


def submit(job: Path) -> str:
    """sbatch it; the job id."""
    return _sh("sbatch", "--parsable", str(job)).split(";")[0]


def state(job_id: str) -> str:
    """PENDING, RUNNING, COMPLETED, FAILED, ...: squeue while Slurm keeps the job, else sacct."""
    out = subprocess.run(
        [_tool("squeue"), "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True, text=True
    )
    if out.returncode == 0 and out.stdout.strip():
        return out.stdout.split()[0]
    if shutil.which("sacct"):
        acct = subprocess.run(
            ["sacct", "-n", "-X", "-j", job_id, "-o", "State"], capture_output=True, text=True
        )
        if acct.returncode == 0 and acct.stdout.strip():
            return acct.stdout.split()[0].rstrip("+")
    return "UNKNOWN"


def log_file(log_pattern: str, job_id: str) -> Path:
    return Path(log_pattern.replace("%j", job_id))


def follow(log: Path, job_id: str, follow: bool, out: TextIO | None = None, poll: float = 2.0) -> str:
    """Print the job's log (and what it adds while the job runs, with follow); the job's last state."""
    out, pos = out or sys.stdout, 0
    while True:
        current = state(job_id)
        if log.exists():
            with log.open("rb") as f:
                f.seek(pos)
                chunk = f.read()
                pos += len(chunk)
            out.write(chunk.decode(errors="replace"))
            out.flush()
        if not follow or current in DONE or current == "UNKNOWN":
            return current
        time.sleep(poll)


def cancel(job_id: str) -> None:
    _sh("scancel", job_id)
