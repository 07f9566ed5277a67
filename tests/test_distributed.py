"""Two processes on the CPU (gloo): DDP and FSDP2 follow the single-process loss trajectory, and
checkpoints move between world sizes."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from .conftest import build_corpus, write_recipe

TOLERANCE = 1e-4  # the same sums in a different order: float rounding only


def _trulyopen(args, nproc=1):
    env = {**os.environ, "TRULYOPEN_QUIET": "1", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + ["-m", "trulyopen", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _losses(run_dir):
    return [
        json.loads(line)["loss"] for line in (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    recipe = write_recipe(
        tmp, build_corpus(tmp), pretrain__max_steps=8, pretrain__checkpoint_every=4, pretrain__eval_every=4
    )
    out = {"recipe": recipe, "tmp": tmp}
    common = ["pretrain", str(recipe), "--workers", "1", "--run-dir"]
    _trulyopen([*common, str(tmp / "one")])
    _trulyopen([*common, str(tmp / "ddp")], nproc=2)
    _trulyopen([*common, str(tmp / "fsdp"), "--set", "pretrain.distributed=fsdp"], nproc=2)
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_follow_the_single_process_trajectory(runs, strategy):
    one, two = _losses(runs["tmp"] / "one"), _losses(runs["tmp"] / strategy)
    assert len(one) == len(two) == 8 and one[-1] < one[0]
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < TOLERANCE


def _as_if_killed_after_step_4(src, dst):
    """A copy of a finished run as it would be had it been killed after its step-4 checkpoint."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "pretrain" / "step_000008")
    ledger = dst / "ledger.jsonl"
    kept = [ln for ln in ledger.read_text().splitlines() if json.loads(ln)["stage"] != "pretrain"]
    kept = [ln for ln in kept if json.loads(ln).get("step") != 8]
    ledger.write_text("\n".join(kept) + "\n")


# (2 -> 1 is covered by post-training's FSDP checkpoint resumed by one process, below)
@pytest.mark.parametrize(("written_by", "resumed_by", "nproc"), [("one", "fsdp", 2)])
def test_checkpoints_move_between_world_sizes(runs, written_by, resumed_by, nproc):
    tmp = runs["tmp"]
    run = tmp / f"{written_by}-then-{resumed_by}"
    _as_if_killed_after_step_4(tmp / written_by, run)
    extra = ["--set", "pretrain.distributed=fsdp"] if resumed_by == "fsdp" else []
    out = _trulyopen(
        ["pretrain", str(runs["recipe"]), "--workers", "1", "--run-dir", str(run), *extra], nproc
    )
    assert "resuming from step_000004" in out
    resumed, reference = _losses(run), _losses(tmp / "one")
    assert max(abs(a - b) for a, b in zip(resumed, reference, strict=True)) < TOLERANCE


# ----------------------------------------------------------------------------- post-training


def _finetune_losses(run_dir):
    rows = (run_dir / "finetune" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in rows]


@pytest.fixture(scope="module")
def tuned(runs):
    """SFT of the single-process run's model, by 1 process and by 2 with FSDP2 (DDP is pretraining's
    and the same wrapper: the objectives differ, not the parallelism)."""
    tmp = runs["tmp"]
    chat = tmp / "chat.jsonl"
    chat.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            )
            + "\n"
            for w in ["alpha", "beta", "gamma", "delta", "omega", "sigma"] * 4
        )
    )
    finetune = {
        "method": "sft",
        "data": [{"path": str(chat)}],
        "seq_len": 64,
        "batch_size": 4,
        "micro_batch_size": 1,  # four micro-batches a step: two per process
        "max_steps": 6,
        "lr": 3e-3,
        "warmup_steps": 1,
        "eval_every": 3,
        "checkpoint_every": 3,
        "precision": "fp32",
        "val_fraction": 0.0,
    }
    recipe = tmp / "finetune.yaml"
    recipe.write_text(runs["recipe"].read_text() + yaml.safe_dump({"finetune": finetune}))
    out = {"recipe": recipe}
    for name, nproc, extra in [("ft-one", 1, []), ("ft-fsdp", 2, ["--set", "finetune.distributed=fsdp"])]:
        shutil.copytree(tmp / "one", tmp / name)
        _trulyopen(["finetune", str(recipe), "--workers", "1", "--run-dir", str(tmp / name), *extra], nproc)
    out["tmp"] = tmp
    return out


def test_post_training_under_torchrun_follows_one_process(tuned):
    one, two = _finetune_losses(tuned["tmp"] / "ft-one"), _finetune_losses(tuned["tmp"] / "ft-fsdp")
    assert len(one) == len(two) == 6 and one[-1] < one[0]
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < TOLERANCE


def test_post_training_checkpoints_move_between_world_sizes(tuned):
    """Written by FSDP2 over two processes, resumed by one: the single-process trajectory."""
    tmp = tuned["tmp"]
    run = tmp / "ft-fsdp-then-one"
    shutil.copytree(tmp / "ft-fsdp", run)
    shutil.rmtree(run / "checkpoints" / "finetune" / "step_000006")
    ledger = run / "ledger.jsonl"
    kept = [json.loads(ln) for ln in ledger.read_text().splitlines()]
    kept = [
        e
        for e in kept
        if e["stage"] != "finetune" and not (e["stage"] == "finetune/checkpoint" and e["step"] == 6)
    ]
    ledger.write_text("".join(json.dumps(e) + "\n" for e in kept))
    out = _trulyopen(["finetune", str(tuned["recipe"]), "--workers", "1", "--run-dir", str(run)])
    assert "resuming from step_000003" in out
    resumed, reference = _finetune_losses(run), _finetune_losses(tmp / "ft-one")
    assert max(abs(a - b) for a, b in zip(resumed, reference, strict=True)) < TOLERANCE
