"""`trulyopen launch`: run a recipe on a cloud, on Kubernetes or under Slurm, and follow it.

    trulyopen launch RECIPE --on aws|gcp|azure|lambda|runpod|kubernetes|slurm
                            [--gpus H100:8] [--nodes 2] [--spot] [--store s3://b/p] [--dry-run]
    trulyopen launch status|logs|down NAME

    plan.py   the checks and the plan (nothing leaves this machine)
    sky.py    clouds and Kubernetes: a SkyPilot task file, then `sky launch|status|logs|down`
    slurm.py  an sbatch script, then sbatch, squeue/sacct, the job's log, scancel

Each launch keeps a folder, ~/.trulyopen/launches/NAME/ ($TRULYOPEN_LAUNCHES), holding what was
sent (the task file or sbatch script, the recipe as it runs there, the wheel) and `launch.json`:
target, job id, log file, code version, command. The run's own ledger records where each stage ran
(trulyopen/where.py reads what SkyPilot and Slurm put in the environment).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from trulyopen.files import write_json
from trulyopen.launch import sky, slurm
from trulyopen.launch.plan import LaunchError, make_plan, options
from trulyopen.recipe import load_recipe

__all__ = ["LaunchError", "down", "launch", "logs", "status"]


def launches_dir() -> Path:
    return Path(os.environ.get("TRULYOPEN_LAUNCHES") or Path.home() / ".trulyopen" / "launches")


def record(name: str) -> dict:
    path = launches_dir() / name / "launch.json"
    if not path.is_file():
        known = sorted(p.name for p in launches_dir().glob("*") if (p / "launch.json").is_file())
        raise LaunchError(f"launch {name}: no such launch here (known: {', '.join(known) or 'none'})")
    return json.loads(path.read_text())


def launch(
    recipe_path: Path,
    overrides: list[str],
    given: dict,
    name: str | None = None,
    wheel: bool = False,
    dry_run: bool = False,
    detach: bool = False,
    run_dir: Path | None = None,
) -> dict:
    """Check, plan, write what is sent, and (unless dry_run) launch it; the launch record."""
    recipe = load_recipe(recipe_path, overrides)
    cfg = options(recipe, given)
    staging = launches_dir() / ".staging"
    plan = make_plan(recipe, cfg, name, wheel, staging)
    folder = launches_dir() / plan.name
    folder.mkdir(parents=True, exist_ok=True)
    if plan.code.kind == "wheel":  # built into the staging folder before the name was known
        wheel_file = folder / "dist" / plan.code.version
        wheel_file.parent.mkdir(exist_ok=True)
        os.replace(plan.code.root, wheel_file)
        shutil.rmtree(staging, ignore_errors=True)
        plan.code.root = wheel_file
    rec: dict = {
        "name": plan.name,
        "on": cfg.target,
        "recipe": str(recipe_path),
        "verb": cfg.verb,
        "nodes": cfg.nodes,
        "gpus": cfg.gpus,
        "spot": cfg.spot,
        "code": {"kind": plan.code.kind, "version": plan.code.version},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if cfg.target == "slurm":
        job, log = slurm.write_job(plan, folder, run_dir or Path("runs") / recipe.name)
        rec.update(file=str(job), log=str(log), command=["sbatch", str(job)])
    else:
        task_file = sky.write_task(plan, folder)
        rec.update(file=str(task_file), run_dir=sky.run_dir(plan))
        rec["command"] = sky.launch_command(plan, task_file, detach) if not dry_run else None
    if dry_run:
        write_json(folder / "launch.json", {**rec, "dry_run": True})
        return {**rec, "dry_run": True}
    if cfg.target == "slurm":
        rec["job_id"] = slurm.submit(Path(rec["file"]))
        write_json(folder / "launch.json", rec)
        if not detach:
            rec["state"] = slurm.follow(slurm.log_file(rec["log"], rec["job_id"]), rec["job_id"], follow=True)
        return rec
    write_json(folder / "launch.json", rec)  # before: `sky launch` follows the logs until the job ends
    code = subprocess.run(rec["command"]).returncode
    if code != 0:
        raise LaunchError(f"{shlex.join(rec['command'])} exited with {code} (SkyPilot's message is above)")
    return rec


def status(name: str) -> str:
    rec = record(name)
    if rec.get("dry_run"):
        return f"{name}: a dry run, never launched ({rec['file']})"
    if rec["on"] == "slurm":
        return f"{name}: slurm job {rec['job_id']} {slurm.state(rec['job_id'])}"
    code = sky.status(name)
    return f"{name}: SkyPilot cluster on {rec['on']} (sky status exited {code})"


def logs(name: str, follow: bool = False) -> str | None:
    rec = record(name)
    if rec.get("dry_run"):
        raise LaunchError(f"launch {name}: a dry run has no logs")
    if rec["on"] == "slurm":
        return slurm.follow(slurm.log_file(rec["log"], rec["job_id"]), rec["job_id"], follow)
    sky.logs(name, follow)
    return None


def down(name: str) -> None:
    rec = record(name)
    if rec.get("dry_run"):
        return
    if rec["on"] == "slurm":
        slurm.cancel(rec["job_id"])
    else:
        sky.down(name)
