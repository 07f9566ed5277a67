"""From a recipe and the command line to a checked launch plan; nothing leaves this machine here.

recipe.launch  ◄── --on --gpus --nodes --spot --store --set ... (the command line wins)
     │
     ▼
checks, each a one-line error before anything is launched:
    an unknown accelerator · more than one node for what runs on one process · no credentials
    for the target · spot where the target has none · a dirty working tree without --wheel
     │
     ▼
Plan: the run's recipe as it will run there (local inputs mapped to where they are mounted),
      how the code gets there (the git commit's tree, a wheel, or the released package), and
      the command each node runs (torchrun across nodes when a stage trains, else one process)
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trulyopen import __version__
from trulyopen.errors import UserError
from trulyopen.recipe import LaunchConfig, Recipe

# Accelerator names the clouds' catalogs use (SkyPilot's names); --gpus NAME:COUNT takes one of these.
ACCELERATORS = (
    "B200 GB200 H200 H100 H100-MEGA H100-SXM H100-NVL A100 A100-80GB A10G A10 A40 L40S L40 L4 T4 V100 "
    "V100-32GB P100 P4 K80 A6000 RTXA6000 RTXA5000 RTXA4000 RTX6000 RTX4090 RTX3090 MI300X MI325X MI250X "
    "Gaudi2 Gaudi3 tpu-v4-8 tpu-v5e-8 tpu-v5p-8 tpu-v6e-8 Trainium Inferentia"
).split()

# What each target needs on this machine before SkyPilot can launch there (SkyPilot's own paths).
CREDENTIALS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    # target: (environment variables, any of which will do; files under ~, any of which; how to set up)
    "aws": (("AWS_ACCESS_KEY_ID", "AWS_PROFILE"), (".aws/credentials", ".aws/config"), "aws configure"),
    "gcp": (
        ("GOOGLE_APPLICATION_CREDENTIALS",),
        (".config/gcloud/application_default_credentials.json",),
        "gcloud auth application-default login",
    ),
    "azure": (("AZURE_CLIENT_ID",), (".azure/azureProfile.json",), "az login"),
    "lambda": (
        ("LAMBDA_API_KEY",),
        (".lambda_cloud/lambda_keys",),
        "put your API key in ~/.lambda_cloud/lambda_keys",
    ),
    "runpod": (("RUNPOD_API_KEY",), (".runpod/config.toml",), "runpod config"),
    "kubernetes": (("KUBECONFIG",), (".kube/config",), "a kubeconfig at ~/.kube/config (or $KUBECONFIG)"),
}
NO_SPOT = {"lambda", "kubernetes", "slurm"}  # targets without preemptible instances
# the last stage each verb runs (run: all of them)
VERB_UNTIL = {
    "run": None,
    "data": "shards",
    "pretrain": "pretrain",
    "finetune": "finetune",
    "eval": "eval",
    "release": "release",
}


class LaunchError(UserError):
    """A launch that cannot start: the message names the flag, field or file."""


@dataclass
class Code:
    """How this project reaches the nodes, at the run's code version."""

    kind: str  # "commit" (the checkout's clean tree), "wheel" (built from the working tree), "package"
    version: str  # the commit, the wheel's file name, or the package version
    root: Path | None = None  # the checkout (commit) or the wheel file (wheel)


@dataclass
class Plan:
    name: str  # the cluster / job name
    recipe: Recipe  # as it runs there: local inputs replaced by where they are mounted
    cfg: LaunchConfig  # the recipe's launch section with the command line applied
    code: Code
    gpu_name: str | None
    gpus_per_node: int
    mounts: dict[str, Path] = field(default_factory=dict)  # remote path -> local file or directory
    secrets: list[str] = field(default_factory=list)  # names set in this environment, passed as secrets
    trains: list[str] = field(default_factory=list)  # the stages that run under torchrun

    @property
    def procs_per_node(self) -> int:
        return self.cfg.procs_per_node or max(self.gpus_per_node, 1)

    def steps(
        self, recipe_path: str, run_dir: str, rank: str, nodes: str, head: str
    ) -> list[tuple[str, str]]:
        """What the nodes run, in order: ("first", command) on the first node alone, ("all", command)
        on every node. Every argument is a shell word, already quoted (paths, the launcher's variables).

        One process: the verb. Training over several processes: the data stages first on one process
        (under torchrun the other ranks would wait for them at a barrier, which times out after 10
        minutes with NCCL), then torchrun for the training stages, then the rest on one process."""

        def verb(name: str) -> str:
            return f"-m trulyopen {name} {recipe_path} --run-dir {run_dir}"

        if not (self.trains and self.cfg.nodes * self.procs_per_node > 1):
            return [("first", f"python {verb(self.cfg.verb)}")]
        out = [("first", f"python {verb('data')}")] if self.recipe.data is not None else []
        torchrun = (
            f"python -m torch.distributed.run --nnodes={nodes} --node_rank={rank} "
            f"--nproc_per_node={self.procs_per_node} --master_addr={head} "
            f"--master_port=${{TRULYOPEN_MASTER_PORT:-29500}}"
        )
        out.append(("all", f"{torchrun} {verb(self.trains[-1])}"))
        if self.cfg.verb not in ("pretrain", "finetune"):  # eval, release, ...: training is up to date
            out.append(("first", f"python {verb(self.cfg.verb)}"))
        return out


FLAGS = {"target": "--on", "gpus": "--gpus", "nodes": "--nodes", "store": "--store", "verb": "--verb"}


def options(recipe: Recipe, given: dict) -> LaunchConfig:
    """The recipe's launch section with the flags that were given (not None) on top."""
    base = recipe.launch.model_dump() if recipe.launch else {}
    try:
        return LaunchConfig.model_validate({**base, **{k: v for k, v in given.items() if v is not None}})
    except ValueError as e:  # pydantic's ValidationError
        err = e.errors()[0]  # type: ignore[attr-defined]
        where = ".".join(str(p) for p in err["loc"])
        raise LaunchError(f"{FLAGS.get(where, 'launch.' + where)}: {err['msg']}") from None


def parse_gpus(text: str | None) -> tuple[str | None, int]:
    """'H100:8' -> ('H100', 8); 'L4' -> ('L4', 1); None -> (None, 0). Unknown names are refused."""
    if not text:
        return None, 0
    m = re.fullmatch(r"([A-Za-z0-9-]+)(?::(\d+))?", text.strip())
    if not m or (m.group(2) is not None and int(m.group(2)) < 1):
        raise LaunchError(f"--gpus {text}: expected NAME:COUNT, e.g. H100:8")
    name, count = m.group(1), int(m.group(2) or 1)
    known = {a.lower(): a for a in ACCELERATORS}
    if name.lower() not in known:
        close = difflib.get_close_matches(name.lower(), list(known), n=3, cutoff=0.5)
        hint = (
            f"did you mean {', '.join(known[c] for c in close)}?"
            if close
            else f"known: {', '.join(ACCELERATORS)}"
        )
        raise LaunchError(f"--gpus {text}: unknown accelerator {name!r}; {hint}")
    return known[name.lower()], count


def training_stages(recipe: Recipe, verb: str) -> list[str]:
    """The enabled stages the verb runs that run under torchrun (pretrain, finetune)."""
    from trulyopen.pipeline import STAGES

    until, out = VERB_UNTIL[verb], []
    for stage in STAGES:
        if stage.enabled(recipe) and stage.distributed:
            out.append(stage.name)
        if stage.name == until:
            break
    return out


def check_credentials(target: str) -> None:
    if target not in CREDENTIALS:
        return
    names, files, how = CREDENTIALS[target]
    home = Path(os.path.expanduser("~"))
    if any(os.environ.get(n) for n in names) or any((home / f).is_file() for f in files):
        return
    raise LaunchError(
        f"--on {target}: no {target} credentials on this machine (none of ${', $'.join(names)}, "
        f"~/{', ~/'.join(files)}); set them up first: {how}"
    )


def checkout() -> Path | None:
    """The git checkout this package runs from, if it runs from one (an editable install)."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / ".git").exists() and (root / "pyproject.toml").is_file() else None


def git(root: Path, *args: str) -> str:
    out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise LaunchError(f"git {' '.join(args)} in {root} failed: {out.stderr.strip()}")
    return out.stdout.rstrip("\n")  # (porcelain lines start with a space: no strip())


def code_to_ship(wheel: bool, into: Path) -> Code:
    """The commit of a clean checkout; a wheel of the working tree (--wheel); or, outside a checkout,
    the released package of this version."""
    root = checkout()
    if wheel:
        if root is None:
            raise LaunchError("--wheel: this trulyopen is not a source checkout to build a wheel from")
        into.mkdir(parents=True, exist_ok=True)
        for old in into.glob("*.whl"):
            old.unlink()
        out = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(into), str(root)],
            capture_output=True,
            text=True,
        )
        wheels = sorted(into.glob("trulyopen-*.whl"))
        if out.returncode != 0 or not wheels:
            raise LaunchError(
                f"--wheel: building the wheel failed: {(out.stderr or out.stdout).strip()[-300:]}"
            )
        return Code("wheel", wheels[0].name, wheels[0])
    if root is None:
        return Code("package", __version__)
    dirty = git(root, "status", "--porcelain", "--untracked-files=no")
    if dirty:
        first = dirty.splitlines()[0][3:]
        raise LaunchError(
            f"{root}: the working tree has uncommitted changes ({first}"
            f"{', ...' if len(dirty.splitlines()) > 1 else ''}): commit them, or pass --wheel to ship "
            "a wheel built from the working tree"
        )
    return Code("commit", git(root, "rev-parse", "HEAD"), root)


def remote_inputs(recipe: Recipe, base: str) -> dict[str, Path]:
    """Point the recipe's local inputs at where they will be mounted (base/inputs/N-name, written
    relative to the recipe there); return the mounts. URLs and hub names stay as they are."""
    mounts: dict[str, Path] = {}
    for i, (_, owner, key) in enumerate(recipe._path_fields()):
        path = owner[key] if isinstance(key, int) else getattr(owner, key)
        if not isinstance(path, Path):
            continue
        there = f"inputs/{i}-{path.name}"  # relative: the recipe is read from {base}/recipe.yaml
        mounts[f"{base}/{there}"] = path
        owner.__setitem__(key, Path(there)) if isinstance(key, int) else setattr(owner, key, Path(there))
    ft = recipe.finetune
    if ft is not None and ft.base is not None and Path(ft.base).is_dir():
        there = f"inputs/base-{Path(ft.base).name}"
        mounts[f"{base}/{there}"] = Path(ft.base)
        ft.base = there
    return mounts


def make_plan(recipe: Recipe, cfg: LaunchConfig, name: str | None, wheel: bool, launch_dir: Path) -> Plan:
    """Check everything that can be checked here, then plan; raises LaunchError naming the problem."""
    if cfg.target is None:
        raise LaunchError("--on: where to launch? aws, gcp, azure, lambda, runpod, kubernetes or slurm")
    gpu_name, gpus = parse_gpus(cfg.gpus)
    trains = training_stages(recipe, cfg.verb)
    if cfg.nodes > 1 and not trains:
        raise LaunchError(
            f"--nodes {cfg.nodes}: `{cfg.verb}` of this recipe runs on one process (no pretrain or "
            "finetune stage to spread over nodes); use --nodes 1"
        )
    if cfg.spot and cfg.target in NO_SPOT:
        raise LaunchError(f"--spot: {cfg.target} has no spot instances")
    if cfg.target != "slurm":
        if cfg.nodes > 1 and not cfg.store:
            raise LaunchError(
                f"--nodes {cfg.nodes}: the run directory must be on storage every node sees: "
                "--store s3://bucket/path (or gs://, az://, r2://) or --store volume:NAME"
            )
        if cfg.store and not re.match(r"^(s3|gs|az|r2|cos|oci)://[^/]+|^volume:[\w.-]+$", cfg.store):
            raise LaunchError(f"--store {cfg.store}: expected a bucket URL (s3://bucket/path) or volume:NAME")
        check_credentials(cfg.target)
        code = code_to_ship(wheel, launch_dir / "dist")
    else:
        code = Code("commit", git(root, "rev-parse", "HEAD"), root) if (root := checkout()) else None
        code = code or Code("package", __version__)
    name = name or re.sub(r"[^a-z0-9-]+", "-", recipe.name.lower()).strip("-")  # SkyPilot's cluster name
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,62}", name):
        raise LaunchError(f"--name {name}: lower-case letters, digits and '-', starting with a letter")
    secrets = [s for s in cfg.secrets if os.environ.get(s)]
    remote = recipe.model_copy(deep=True)
    mounts = remote_inputs(remote, REMOTE_BASE) if cfg.target != "slurm" else {}
    return Plan(name, remote, cfg, code, gpu_name, gpus, mounts, secrets, trains)


REMOTE_BASE = "~/trulyopen-launch"  # on each node: the recipe, its inputs, the wheel
REMOTE_STORE = "~/trulyopen-store"  # a bucket or volume, when given, is mounted here
