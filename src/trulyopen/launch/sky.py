"""Clouds and Kubernetes through SkyPilot: a task file from the plan, then SkyPilot's own CLI.

    name: <plan name>            num_nodes: N
    resources: {infra: aws, accelerators: H100:8, use_spot, region, disk_size}
    workdir: the checkout        (commit: SkyPilot syncs its tree to ~/sky_workdir on every node)
    file_mounts:                 ~/trulyopen-launch/recipe.yaml, /inputs/..., the wheel
                                 ~/trulyopen-store: the bucket (MOUNT_CACHED), when --store is one
    volumes:                     ~/trulyopen-store: the volume, when --store volume:NAME
    envs:                        TRULYOPEN_LAUNCH_NAME, _ACCELERATORS, _SPOT (the ledger's `where`)
    secrets:                     HF_TOKEN: null, ...   (values given with --secret at launch)
    setup: install trulyopen at the run's code version
    run:   python -m trulyopen VERB ...   or   torchrun over SkyPilot's SKYPILOT_NODE_RANK,
           SKYPILOT_NUM_NODES and the first of SKYPILOT_NODE_IPS

SkyPilot lives in its own environment (`pipx install "skypilot[aws]"`, or $TRULYOPEN_SKY naming its
`sky`): it pins click and uvicorn below what transformers' hub client needs, so the two cannot share
one. This module only writes YAML and calls `sky`; it never imports it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import yaml

from trulyopen.launch.plan import REMOTE_BASE, REMOTE_STORE, LaunchError, Plan
from trulyopen.recipe import recipe_to_yaml

INFRA = {"kubernetes": "k8s"}  # SkyPilot's infra names where they differ from ours
RUN_DIR_LOCAL = "~/trulyopen-runs"  # the run directory without --store: on the first node's disk
MARKERS = f"{REMOTE_STORE}/.launch"  # "the first node is done with step i": the others wait for it


def run_dir(plan: Plan) -> str:
    under = REMOTE_STORE if plan.cfg.store else RUN_DIR_LOCAL
    return f"{under}/{plan.recipe.name}"


def shell_path(path: str) -> str:
    """~/x as a shell word that expands on the node ("$HOME/x": a quoted ~ would not)."""
    return '"$HOME' + path[1:] + '"' if path.startswith("~/") else shlex.quote(path)


def setup_script(plan: Plan) -> str:
    """Install trulyopen at the run's code version (the same on every node)."""
    extras = f"[{','.join(plan.cfg.extras)}]" if plan.cfg.extras else ""
    lines = ["set -euo pipefail"]
    if plan.code.kind == "commit":  # the checkout's tree, synced by SkyPilot as the workdir
        lines.append(
            f"python -m pip install -q -c constraints.txt -e .{extras}  # commit {plan.code.version}"
        )
    elif plan.code.kind == "wheel":
        wheel = shell_path(f"{REMOTE_BASE}/dist/{plan.code.version}")
        lines.append(f'python -m pip install -q {wheel[:-1]}{extras}"')
    else:
        lines.append(f'python -m pip install -q "trulyopen{extras}=={plan.code.version}"')
    return "\n".join(lines) + "\n"


def run_script(plan: Plan) -> str:
    """What every node runs, with SkyPilot's variables. With several nodes, the others wait for a
    step of the first node alone through a marker on the shared store."""
    head = '"$(echo "$SKYPILOT_NODE_IPS" | head -n 1)"'
    recipe, out = shell_path(f"{REMOTE_BASE}/recipe.yaml"), shell_path(run_dir(plan))
    steps = plan.steps(recipe, out, '"$SKYPILOT_NODE_RANK"', '"$SKYPILOT_NUM_NODES"', head)
    lines = ["set -euo pipefail", f"mkdir -p {out}"]
    if plan.cfg.nodes > 1:
        lines.append(f"mkdir -p {shell_path(MARKERS)}")
    for i, (where, command) in enumerate(steps):
        if where == "all" or len(steps) == 1:
            lines.append(command)
        elif plan.cfg.nodes == 1:
            lines.append(f'if [ "$SKYPILOT_NODE_RANK" = 0 ]; then {command}; fi')
        else:
            done = shell_path(f"{MARKERS}/{plan.name}-$SKYPILOT_TASK_ID-{i}")
            lines.append(f'if [ "$SKYPILOT_NODE_RANK" = 0 ]; then {command}; touch {done}; fi')
            lines.append(f"until [ -e {done} ]; do sleep 5; done")
    return "\n".join(lines) + "\n"


def task(plan: Plan, launch_dir: Path) -> dict:
    """The SkyPilot task (a dict in its YAML schema); writes the recipe it runs into launch_dir."""
    cfg = plan.cfg
    recipe_file = launch_dir / "recipe.yaml"
    recipe_file.write_text(recipe_to_yaml(plan.recipe))
    resources: dict = {"infra": INFRA.get(cfg.target, cfg.target)}
    if plan.gpu_name:
        resources["accelerators"] = f"{plan.gpu_name}:{plan.gpus_per_node}"
    if cfg.spot:
        resources["use_spot"] = True
    if cfg.region:
        resources["infra"] += f"/{cfg.region}"
    if cfg.disk_gb:
        resources["disk_size"] = cfg.disk_gb
    mounts: dict = {f"{REMOTE_BASE}/recipe.yaml": str(recipe_file)}
    mounts.update({remote: str(local) for remote, local in plan.mounts.items()})
    if plan.code.kind == "wheel":
        mounts[f"{REMOTE_BASE}/dist/{plan.code.version}"] = str(plan.code.root)
    out: dict = {"name": plan.name, "num_nodes": cfg.nodes, "resources": resources}
    if plan.code.kind == "commit":
        out["workdir"] = str(plan.code.root)
    if cfg.store and cfg.store.startswith("volume:"):
        out["volumes"] = {REMOTE_STORE: cfg.store.split(":", 1)[1]}
    elif cfg.store:
        mounts[REMOTE_STORE] = {"source": cfg.store, "mode": "MOUNT_CACHED"}
    out["file_mounts"] = mounts
    out["envs"] = {
        "TRULYOPEN_LAUNCH_NAME": plan.name,
        "TRULYOPEN_LAUNCH_ACCELERATORS": cfg.gpus or "",
        "TRULYOPEN_LAUNCH_SPOT": "1" if cfg.spot else "0",
        "TRULYOPEN_CODE": f"{plan.code.kind}:{plan.code.version}",
    }
    if plan.secrets:
        out["secrets"] = {name: None for name in plan.secrets}  # values: --secret NAME, from this env
    out["setup"] = setup_script(plan)
    out["run"] = run_script(plan)
    return out


class _Dumper(yaml.SafeDumper):
    """Scripts as YAML literal blocks (|), as people write SkyPilot tasks."""


_Dumper.add_representer(
    str,
    lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def write_task(plan: Plan, launch_dir: Path) -> Path:
    path = launch_dir / "task.yaml"
    path.write_text(yaml.dump(task(plan, launch_dir), Dumper=_Dumper, sort_keys=False, width=120))
    return path


def sky() -> str:
    """SkyPilot's `sky` command: $TRULYOPEN_SKY, or on PATH."""
    found = os.environ.get("TRULYOPEN_SKY") or shutil.which("sky")
    if not found:
        raise LaunchError(
            'SkyPilot is not installed: `pipx install "skypilot[aws,gcp,azure,lambda,runpod,kubernetes]"` '
            "(its own environment: it pins click below what transformers needs), or set $TRULYOPEN_SKY"
        )
    return found


def launch_command(plan: Plan, task_file: Path, detach: bool) -> list[str]:
    cmd = [sky(), "launch", "-y", "-c", plan.name, str(task_file)]
    for name in plan.secrets:
        cmd += ["--secret", name]  # SkyPilot reads the value from this environment
    return cmd + (["--detach-run"] if detach else [])


def call(args: list[str]) -> int:
    """Run `sky ...` in the foreground (its output is the user's); its exit status."""
    return subprocess.run([sky(), *args]).returncode


def status(name: str) -> int:
    return call(["status", name])


def logs(name: str, follow: bool) -> int:
    return call(["logs", name, *([] if follow else ["--no-follow"])])


def down(name: str) -> int:
    return call(["down", "-y", name])
