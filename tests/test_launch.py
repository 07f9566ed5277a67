"""`trulyopen launch`: SkyPilot tasks that SkyPilot itself loads and that run here under bash with its
variables (two "nodes" on loopback, torchrun across them), real Slurm jobs, and bad input named
before anything is launched.

SkyPilot cannot share an environment with transformers (it pins click below what the hub client
needs), so it lives in its own: `.ci/run` makes `.venv-sky`; $TRULYOPEN_SKY may name another `sky`.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from trulyopen import cli
from trulyopen.launch import plan as planning

from .conftest import build_corpus, write_recipe

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["aws", "gcp", "azure", "lambda", "runpod", "kubernetes"]
TOY = ["pretrain.max_steps=2", "pretrain.checkpoint_every=2", "pretrain.eval_every=2"]


def sky_python() -> Path | None:
    sky = os.environ.get("TRULYOPEN_SKY")
    python = Path(sky).parent / "python" if sky else ROOT / ".venv-sky" / "bin" / "python"
    return python if python.exists() else None


SKY_PYTHON = sky_python()  # (before a test's fixture points TRULYOPEN_SKY at a recording script)
needs_sky = pytest.mark.skipif(
    SKY_PYTHON is None, reason="needs SkyPilot's environment (.ci/run makes .venv-sky)"
)
needs_slurm = pytest.mark.skipif(
    shutil.which("sbatch") is None or subprocess.run(["sinfo"], capture_output=True).returncode != 0,
    reason="needs a running Slurm (.ci/slurm-up.sh starts a one-node cluster)",
)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A home with every target's credentials file, launches kept under it, a recording `sky`."""
    home = tmp_path / "home"
    for _, files, _ in planning.CREDENTIALS.values():
        (home / files[0]).parent.mkdir(parents=True, exist_ok=True)
        (home / files[0]).write_text("fake\n")
    for names, _, _ in planning.CREDENTIALS.values():
        for n in names:
            monkeypatch.delenv(n, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TRULYOPEN_LAUNCHES", str(home / "launches"))
    calls = tmp_path / "sky-calls.txt"
    fake = tmp_path / "sky"
    fake.write_text(f'#!/bin/bash\necho "$@ | HF_TOKEN=$HF_TOKEN" >> {calls}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("TRULYOPEN_SKY", str(fake))
    return home


@pytest.fixture
def toy(tmp_path):
    corpus = build_corpus(tmp_path)
    return write_recipe(tmp_path, corpus)


@pytest.fixture
def clean_checkout(tmp_path, monkeypatch):
    """A clean git checkout for the commit mode (this test tree may have local edits)."""
    repo = tmp_path / "checkout"
    repo.mkdir()
    (repo / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    for cmd in (
        ["init", "-q"],
        ["add", "."],
        ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"],
    ):
        subprocess.run(["git", "-C", str(repo), *cmd], check=True)
    monkeypatch.setattr(planning, "checkout", lambda: repo)
    return repo


def invoke(*args: str):
    return CliRunner().invoke(cli.app, ["launch", *args])


@needs_sky
def test_every_target_gives_a_task_skypilots_own_loader_accepts(home, toy, clean_checkout, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    files = []
    for on in TARGETS:
        extra = ["--spot"] if on not in planning.NO_SPOT else []
        r = invoke(
            str(toy),
            "--name",
            f"tiny-{on}",
            "--on",
            on,
            "--gpus",
            "H100:8",
            "--nodes",
            "2",
            "--store",
            "s3://b/r",
            "--dry-run",
            *extra,
        )
        assert r.exit_code == 0, r.output
        files.append(home / "launches" / f"tiny-{on}" / "task.yaml")
    # the launch examples as they are (--store where they name a placeholder bucket)
    examples = sorted((ROOT / "recipes").glob("launch-*.yaml"))
    assert {e.stem.removeprefix("launch-") for e in examples} == {*TARGETS, "slurm"}
    for example in examples:
        r = invoke(str(example), "--dry-run")
        assert r.exit_code == 0, (example, r.output)
        task = home / "launches" / example.stem / ("job.sbatch" if "slurm" in example.stem else "task.yaml")
        if "slurm" in example.stem:  # the sbatch script is valid bash, two nodes of 8 GPUs
            assert subprocess.run(["bash", "-n", task]).returncode == 0
            assert "#SBATCH --nodes=2" in task.read_text() and "#SBATCH --gpus-per-node=8" in task.read_text()
        else:
            files.append(task)
    check = (
        "import json, sys, yaml, sky\n"
        "for f in sys.argv[1:]:\n"
        "    t = sky.Task.from_yaml_config(yaml.safe_load(open(f)))\n"
        "    (r,) = t.resources\n"
        "    print(json.dumps([t.num_nodes, str(r.cloud), r.accelerators, r.use_spot,\n"
        "                      sorted(t.storage_mounts), t.workdir, t.run]))\n"
    )
    out = subprocess.run([SKY_PYTHON, "-c", check, *map(str, files)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert len(loaded) == 2 * len(TARGETS)
    for (nodes, cloud, accelerators, *_), example in zip(
        loaded[len(TARGETS) :], files[len(TARGETS) :], strict=True
    ):
        recipe = yaml.safe_load((ROOT / "recipes" / f"{example.parent.name}.yaml").read_text())["launch"]
        assert nodes == recipe.get("nodes", 1) and cloud.lower() == recipe["target"]
        name, count = recipe["gpus"].split(":")
        assert accelerators == {name: int(count)}
    for on, (nodes, cloud, accelerators, spot, storage, workdir, run) in zip(TARGETS, loaded, strict=False):
        assert nodes == 2 and accelerators == {"H100": 8}
        assert cloud.lower() == {"gcp": "gcp"}.get(on, on), cloud
        assert spot == (on not in planning.NO_SPOT)
        assert storage == ["~/trulyopen-store"] and workdir == str(clean_checkout)
        assert '--nnodes="$SKYPILOT_NUM_NODES" --node_rank="$SKYPILOT_NODE_RANK" --nproc_per_node=8' in run
    task = yaml.safe_load(files[0].read_text())
    assert task["secrets"] == {"HF_TOKEN": None}  # the name only: the value goes with --secret
    assert "hf_secret_value" not in "".join(f.read_text() for f in files)
    # the corpus directory is mounted, and the recipe there points at the mount
    mounted = [v for k, v in task["file_mounts"].items() if "/inputs/" in k]
    assert mounted == [str(toy.parent / "src"), str(toy.parent / "evals" / "task.jsonl")]
    there = yaml.safe_load((files[0].parent / "recipe.yaml").read_text())
    assert there["data"]["sources"][0]["path"] == "inputs/0-src"  # beside the recipe, where it is mounted
    assert "torch.distributed.run" in task["run"] and '--nnodes="$SKYPILOT_NUM_NODES"' in task["run"]


def test_launch_calls_sky_with_the_secret_names_not_values(home, toy, clean_checkout, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    r = invoke(str(toy), "--on", "gcp", "--gpus", "L4:1", "--name", "tiny-gcp")
    assert r.exit_code == 0, r.output
    calls = (home.parent / "sky-calls.txt").read_text().splitlines()
    task = home / "launches" / "tiny-gcp" / "task.yaml"
    # sky reads the secret's value from its environment: it is on no command line and in no file
    assert calls == [f"launch -y -c tiny-gcp {task} --secret HF_TOKEN | HF_TOKEN=hf_secret_value"]
    assert "hf_secret_value" not in task.read_text()
    rec = json.loads((task.parent / "launch.json").read_text())
    assert rec["code"] == {"kind": "commit", "version": planning.git(clean_checkout, "rev-parse", "HEAD")}
    for action in ("status", "logs", "down"):
        assert invoke(action, "tiny-gcp").exit_code == 0
    calls = (home.parent / "sky-calls.txt").read_text().splitlines()
    assert [c.split(" | ")[0] for c in calls[1:]] == [
        "status tiny-gcp",
        "logs tiny-gcp --no-follow",
        "down -y tiny-gcp",
    ]
    r = invoke("status", "nothing-like-it")
    assert r.exit_code == 2 and "launch nothing-like-it: no such launch here (known: tiny-gcp)" in r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--on", "aws", "--gpus", "H1000:8"],
            "--gpus H1000:8: unknown accelerator 'H1000'; did you mean H100",
        ),
        (["--on", "aws", "--gpus", "H100:x"], "--gpus H100:x: expected NAME:COUNT"),
        (
            ["--on", "aws", "--verb", "data", "--nodes", "2", "--store", "s3://b/r"],
            "--nodes 2: `data` of this",
        ),
        (["--on", "aws", "--nodes", "2"], "--nodes 2: the run directory must be on storage every node sees"),
        (["--on", "lambda", "--spot"], "--spot: lambda has no spot instances"),
        (["--on", "mars"], "--on: Input should be 'aws'"),
        ([], "--on: where to launch?"),
    ],
)
def test_bad_input_is_named_before_anything_is_launched(home, toy, clean_checkout, args, message):
    r = invoke(str(toy), *args)
    assert r.exit_code == 2
    assert r.output.startswith(f"error: {message}") and len(r.output.strip().splitlines()) == 1, r.output
    assert not (home.parent / "sky-calls.txt").exists()


def test_no_credentials_and_a_dirty_tree_are_named(home, toy, clean_checkout, monkeypatch):
    shutil.rmtree(home / ".aws")
    r = invoke(str(toy), "--on", "aws")
    assert r.exit_code == 2 and "--on aws: no aws credentials on this machine" in r.output
    monkeypatch.setenv("AWS_PROFILE", "default")
    (clean_checkout / "pyproject.toml").write_text("[project]\nname = 'changed'\n")
    r = invoke(str(toy), "--on", "aws")
    assert r.exit_code == 2
    assert (
        "the working tree has uncommitted changes (pyproject.toml): commit them, or pass --wheel" in r.output
    )
    assert not (home.parent / "sky-calls.txt").exists()


class FakeMetadata(http.server.BaseHTTPRequestHandler):
    """AWS's instance metadata service (IMDSv2): a token, then the instance type."""

    def do_PUT(self):
        self._answer("token-1" if self.path == "/latest/api/token" else None)

    def do_GET(self):
        ok = (
            self.path == "/latest/meta-data/instance-type"
            and self.headers.get("X-aws-ec2-metadata-token") == "token-1"
        )
        self._answer("p5.48xlarge" if ok else None)

    def _answer(self, body):
        self.send_response(200 if body else 404)
        self.end_headers()
        self.wfile.write((body or "").encode())

    def log_message(self, *a):
        pass


def test_the_task_runs_under_bash_with_skypilots_variables_on_two_nodes(home, toy, tmp_path):
    """--wheel: the setup step installs the wheel into a fresh environment; both nodes' run steps
    start torchrun with SkyPilot's variables (two nodes on loopback); the ledger says where it ran."""
    sets = [f"--set={s}" for s in TOY]
    r = invoke(str(toy), *sets, "--on", "aws", "--nodes", "2", "--store", "s3://b/r", "--wheel", "--dry-run")
    assert r.exit_code == 0, r.output
    task = yaml.safe_load((home / "launches" / "tiny" / "task.yaml").read_text())
    # what SkyPilot does before the scripts: the file mounts in place, the bucket mounted
    for remote, local in task["file_mounts"].items():
        target = home / remote.removeprefix("~/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(local, dict):
            target.mkdir()
        elif Path(local).is_dir():
            shutil.copytree(local, target)
        else:
            shutil.copy(local, target)
    # a fresh environment on the "nodes" that sees this one's packages, so the setup needs no download
    venv = tmp_path / "node"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "outer.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
    metadata = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeMetadata)
    threading.Thread(target=metadata.serve_forever, daemon=True).start()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))},
        **task["envs"],
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
        "SKYPILOT_NUM_NODES": "2",
        "SKYPILOT_NODE_IPS": "127.0.0.1\n127.0.0.1",
        "SKYPILOT_NUM_GPUS_PER_NODE": "0",
        "SKYPILOT_TASK_ID": "sky-2026-12-03-job-7",
        "SKYPILOT_CLUSTER_INFO": json.dumps(
            {"cluster_name": "tiny", "cloud": "AWS", "region": "us-east-1", "zone": "us-east-1a"}
        ),
        "TRULYOPEN_METADATA_URL": f"http://127.0.0.1:{metadata.server_port}",
        "TRULYOPEN_MASTER_PORT": str(free_port()),
    }
    setup = subprocess.run(["bash", "-c", task["setup"]], env=env, capture_output=True, text=True, cwd=home)
    assert setup.returncode == 0, setup.stderr[-2000:]
    assert list(site.glob("trulyopen-*.dist-info"))  # installed here, from the wheel
    nodes = [
        subprocess.Popen(
            ["bash", "-c", task["run"]],
            env={**env, "SKYPILOT_NODE_RANK": str(rank)},
            cwd=home,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outs = [n.communicate(timeout=240)[0] for n in nodes]
    metadata.shutdown()
    assert [n.returncode for n in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    run = home / "trulyopen-store" / "tiny"
    assert (run / "checkpoints" / "pretrain" / "step_000002").is_dir()
    ledger = [json.loads(x) for x in (run / "ledger.jsonl").read_text().splitlines()]
    pretrain = next(e for e in ledger if e["stage"] == "pretrain")
    assert pretrain["world_size"] == 2
    assert pretrain["where"] == {
        "launcher": "skypilot",
        "provider": "aws",
        "region": "us-east-1",
        "zone": "us-east-1a",
        "cluster": "tiny",
        "job_id": "sky-2026-12-03-job-7",
        "nodes": 2,
        "instance_type": "p5.48xlarge",
        "name": "tiny",
        "accelerators": "",
        "spot": False,
    }
    assert pretrain["code_version"]["package"] and "git_commit" not in pretrain["code_version"]  # the wheel


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_slurm
def test_slurm_runs_the_job_and_status_and_logs_report_it(home, toy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRULYOPEN_QUIET")  # the job inherits it: its log would be empty
    sets = [f"--set={s}" for s in TOY]
    run = ["--run-dir", str(tmp_path / "run")]
    r = invoke(str(toy), *sets, "--on", "slurm", "--procs-per-node", "2", "--detach", *run)
    assert r.exit_code == 0, r.output
    rec = json.loads((home / "launches" / "tiny" / "launch.json").read_text())
    job = rec["job_id"]
    assert r.output.startswith(f"tiny: slurm job {job} submitted")
    r = invoke("logs", "tiny", "--follow")  # follows the log until the job ends
    assert r.exit_code == 0 and r.output.rstrip().endswith("tiny: COMPLETED"), r.output
    assert f"run directory: {tmp_path / 'run'}" in r.output  # the last line `trulyopen run` prints
    assert invoke("status", "tiny").output.strip() == f"tiny: slurm job {job} COMPLETED"
    ledger = [json.loads(x) for x in (tmp_path / "run" / "ledger.jsonl").read_text().splitlines()]
    where = next(e for e in ledger if e["stage"] == "pretrain")["where"]
    assert where["launcher"] == "slurm" and where["job_id"] == job and where["name"] == "tiny"
    assert where["nodes"] == 1 and where["partition"] == "debug"
    pretrain = next(e for e in ledger if e["stage"] == "pretrain")
    assert pretrain["world_size"] == 2  # srun torchrun, two processes
    script = Path(rec["file"]).read_text().splitlines()
    sruns = [line for line in script if line.startswith("srun")]
    assert len(sruns) == 3
    assert sruns[0].startswith(f"srun --nodes=1 --ntasks=1 {sys.executable} -m trulyopen data ")
    assert sruns[1].startswith(  # training: one torchrun per node, each with its own $SLURM_NODEID
        f"srun --kill-on-bad-exit=1 bash -c '{sys.executable} -m torch.distributed.run "
        '--nnodes="$SLURM_NNODES" --node_rank="$SLURM_NODEID" --nproc_per_node=2'
    )
    assert sruns[2].startswith(f"srun --nodes=1 --ntasks=1 {sys.executable} -m trulyopen run ")  # the rest
