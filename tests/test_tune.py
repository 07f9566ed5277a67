"""`trulyopen tune`: a study of real toy runs through the real CLI, killed with SIGKILL half-way and
resumed; its results files and best recipe; pruning, a failing trial; space files it refuses."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from trulyopen.cli import app
from trulyopen.ledger import Ledger
from trulyopen.recipe import load_recipe, parse_override
from trulyopen.tune.space import check_against_recipe, load_space, set_override
from trulyopen.tune.study import STUDY_NAME, ask, open_study

from .conftest import build_corpus, write_recipe

ENV = {**os.environ, "TRULYOPEN_QUIET": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
MAX_STEPS = 30

# Three queued trials: a good learning rate (0); a head count that does not divide the hidden size
# (1: its child fails); a learning rate so small that nothing is learnt (2: tune is killed as it
# starts, and trial 3 runs it again, to be pruned at a validation where it is worse than trial 0).
SPACE = """
metric: pretrain.val_bpb
direction: minimize
params:
  pretrain.lr: {type: float, low: 1.0e-6, high: 1.0e-2, log: true}
  model.num_heads: {type: categorical, choices: [4, 3]}
enqueue:
  - {pretrain.lr: 3.0e-3, model.num_heads: 4}
  - {pretrain.lr: 1.0e-3, model.num_heads: 3}
  - {pretrain.lr: 1.0e-6, model.num_heads: 4}
sampler: {seed: 0}
pruner: {type: median, n_startup_trials: 1}
"""


def _args(recipe: Path, space: Path, study_dir: Path, trials: int) -> list[str]:
    return [
        "tune",
        str(recipe),
        "--space",
        str(space),
        "--trials",
        str(trials),
        "--study-dir",
        str(study_dir),
    ]


def _load(study_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{study_dir / 'study.db'}")


def _made(study_dir: Path) -> bool:
    """Whether tune has made its storage, asked read-only: opening it through Optuna while tune
    creates it would create its tables too, and one of the two creators fails ("table ... already
    exists"), sometimes tune itself."""
    import sqlite3

    db = study_dir / "study.db"
    if not db.is_file():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            return bool(con.execute("SELECT count(*) FROM version_info").fetchone()[0])
    except sqlite3.Error:  # no such table yet, or locked
        return False


def _alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's zombie waits for a reaper that may never come here)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _wait_for_pid(study_dir: Path, number: int, proc: subprocess.Popen, timeout: float = 300) -> int:
    """The pid of trial `number`'s child, once tune has started it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"tune ended ({proc.returncode}) before trial {number} started"
        if not _made(study_dir):
            time.sleep(0.2)
            continue
        try:
            trials = _load(study_dir).get_trials()
        except (KeyError, optuna.exceptions.StorageInternalError, Exception):  # not made yet, or locked
            trials = []
        if len(trials) > number and "pid" in trials[number].user_attrs:
            return trials[number].user_attrs["pid"]
        time.sleep(0.2)
    raise AssertionError(f"trial {number} did not start in {timeout} s")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    recipe = write_recipe(
        tmp,
        build_corpus(tmp),
        pretrain__max_steps=MAX_STEPS,
        pretrain__eval_every=5,
        pretrain__checkpoint_every=MAX_STEPS,
    )
    space = tmp / "space.yaml"
    space.write_text(SPACE)
    study_dir = tmp / "study"
    with open(tmp / "first.log", "wb") as log:
        first = subprocess.Popen(
            [sys.executable, "-m", "trulyopen", *_args(recipe, space, study_dir, 3)],
            env=ENV,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    child = _wait_for_pid(study_dir, 2, first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    deadline = time.monotonic() + 3  # it dies at once; left alone, it would train on for longer
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    child_outlived_tune = _alive(child)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # the trials' children inherit it
        second = CliRunner().invoke(app, _args(recipe, space, study_dir, 3))
    assert second.exit_code == 0, second.output
    print(second.output)
    return {
        "dir": study_dir,
        "recipe": recipe,
        "space": space,
        "output": second.output,
        "child_outlived_tune": child_outlived_tune,
        "first_log": (tmp / "first.log").read_text(),
    }


def _last(run_dir: Path, key: str = "val_bpb") -> dict:
    lines = (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if key in r][-1]


def test_a_killed_study_resumes_and_ends_with_n_finished_trials(study):
    trials = _load(study["dir"]).get_trials()
    states = [t.state.name for t in trials]
    assert states == ["COMPLETE", "FAIL", "FAIL", "PRUNED"], study["output"]
    # trial 2 was cut short by the kill (on Linux its child died with the killed tune) and trial 3
    # ran its parameters again; trial 1 failed on its own and counts: three trials finished
    assert trials[3].params == trials[2].params and trials[3].system_attrs["failed_trial"] == 2
    assert "trial 2 was cut short" in study["output"]
    if sys.platform.startswith("linux"):
        assert not study["child_outlived_tune"]
    # a trial that completed before the kill was not run again: one pretraining in trial 0's ledger
    assert [e["stage"] for e in Ledger(study["dir"] / "trial-0000").entries()].count("pretrain") == 1
    assert not (study["dir"] / "trial-0004").exists()


def test_pruning_stops_the_bad_trial_before_its_last_step(study):
    good, bad = study["dir"] / "trial-0000", study["dir"] / "trial-0003"
    stopped = _last(bad)
    assert stopped["step"] < MAX_STEPS
    lines = (bad / "pretrain" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] < MAX_STEPS  # stopped: no line past where it was pruned
    assert "pretrain" not in [e["stage"] for e in Ledger(bad).entries()]  # the stage never finished
    same_step = [r for r in map(json.loads, (good / "pretrain/metrics.jsonl").read_text().splitlines())]
    at_that_step = next(r for r in same_step if r["step"] == stopped["step"])
    assert stopped["val_bpb"] > at_that_step["val_bpb"]  # worse than the median (trial 0 alone)
    assert _last(good)["step"] == MAX_STEPS


def test_a_failed_trial_keeps_its_stderr_and_the_study_goes_on(study):
    failed = _load(study["dir"]).trials[1]
    assert failed.user_attrs["error"].startswith("exit 2: error: ")
    assert "heads" in failed.user_attrs["error"]  # the child's own one-line message
    assert "heads" in failed.user_attrs["stderr"]
    err = (study["dir"] / "logs" / "trial-0001.err").read_text()
    assert err.strip().endswith(failed.user_attrs["stderr"].splitlines()[-1])
    assert (study["dir"] / "trial-0003" / "pretrain" / "metrics.jsonl").is_file()  # the study went on


def test_each_trial_is_a_run_with_the_shared_stages_linked(study):
    shared_shard = next((study["dir"] / "shared" / "data" / "shards").glob("*.bin"))
    for t in _load(study["dir"]).trials:
        run_dir = study["dir"] / t.user_attrs["run_dir"]
        stages = [e["stage"] for e in Ledger(run_dir).entries()]
        assert stages[:3] == ["data", "tokenizer", "shards"], run_dir
        linked = run_dir / shared_shard.relative_to(study["dir"] / "shared")
        assert linked.stat().st_nlink >= 2  # a hard link: made once, for every trial (the shared
        # stages run again only when they are out of date, as the code changed between the runs)
        assert linked.read_bytes() == shared_shard.read_bytes()
        if t.number == 2:
            continue  # killed as its child started: it may not have written its recipe yet
        recipe = load_recipe(run_dir / "recipe.yaml")
        assert recipe.pretrain.lr == pytest.approx(t.params["pretrain.lr"])
        assert recipe.model.num_heads == t.params["model.num_heads"]
        if t.state.name == "COMPLETE":
            assert "pretrain" in stages
            assert t.value == _last(run_dir)["val_bpb"]


def test_each_trial_is_in_the_studys_history_with_its_settings(study):
    from trulyopen.history.project import Project

    runs = Project(study["dir"]).runs()
    for t in _load(study["dir"]).trials:
        name = t.user_attrs["run_dir"]
        if t.number == 2:
            continue  # killed as its child started
        assert runs[name].why[0].startswith(f"tune: trial {t.number} of the study in {study['dir'].name} (")
        assert f"pretrain.lr={t.params['pretrain.lr']}" in runs[name].why[0]


def test_results_files_and_the_best_recipe(study):
    d = study["dir"]
    trials = _load(d).trials
    complete = {
        t.number: _last(d / f"trial-{t.number:04d}")["val_bpb"] for t in trials if t.state.name == "COMPLETE"
    }
    best = min(complete, key=complete.get)
    record = json.loads((d / "study.json").read_text())
    assert record["best"]["trial"] == best and record["best"]["value"] == complete[best]
    assert record["direction"] == "minimize" and set(record["space"]["params"]) == {
        "pretrain.lr",
        "model.num_heads",
    }
    assert [t["state"] for t in record["trials"]][:4] == ["complete", "failed", "interrupted", "pruned"]
    rows = list(csv.DictReader((d / "results.csv").open()))
    assert [int(r["trial"]) for r in rows] == [0, 1, 2, 3]
    assert float(rows[best]["value"]) == complete[best] and rows[3]["state"] == "pruned"
    assert rows[best]["steps"] == str(MAX_STEPS)
    assert "| trial | pretrain.lr | model.num_heads | pretrain.val_bpb |" in (d / "results.md").read_text()
    assert "| trial | pretrain.lr |" in study["output"]  # the table, printed at the end
    assert (d / "study.png").read_bytes()[:4] == b"\x89PNG"
    best_recipe = load_recipe(d / "best.yaml")  # what `trulyopen run best.yaml` loads
    assert best_recipe.pretrain.lr == trials[best].params["pretrain.lr"]
    assert best_recipe.model.num_heads == trials[best].params["model.num_heads"]
    ran = load_recipe(d / f"trial-{best:04d}" / "recipe.yaml")
    assert best_recipe.model_dump() == ran.model_dump()


def test_a_rerun_runs_nothing_and_another_space_is_refused(study):
    d = study["dir"]
    again = CliRunner().invoke(app, _args(study["recipe"], study["space"], d, 3))
    assert again.exit_code == 0 and "nothing to run" in again.output
    assert len(_load(d).trials) == 4
    other = study["space"].with_name("other.yaml")
    other.write_text(SPACE.replace("high: 1.0e-2", "high: 2.0e-2"))
    refused = CliRunner().invoke(app, _args(study["recipe"], other, d, 6))
    assert refused.exit_code == 2 and refused.output.count("\n") == 1
    assert "another space" in refused.output and "params.pretrain.lr.high" in refused.output
    assert len(_load(d).trials) == 4


HEAD = "metric: pretrain.val_bpb\ndirection: minimize\n"
LR = "params: {pretrain.lr: {type: float, low: 1.0e-4, high: 1.0e-3}}\n"
BAD_SPACES = {
    "unknown key": (
        HEAD + "params: {pretrain.lr: {type: float, low: 1.0e-4, hihg: 1}}",
        "params.pretrain.lr.hihg",
    ),
    "low above high": (
        HEAD + "params: {pretrain.lr: {type: float, low: 1.0, high: 0.1}}",
        "params.pretrain.lr'",
    ),
    "not a recipe field": (
        HEAD + "params: {pretrain.lrr: {type: float, low: 1.0e-4, high: 1.0}}",
        "pretrain.lrr",
    ),
    "a value the recipe refuses": (
        HEAD + "params: {pretrain.lr: {type: float, low: -1.0, high: 1.0}}",
        "-1.0",
    ),
    "a later stage": (HEAD + "params: {eval.seed: {type: int, low: 0, high: 3}}", "eval stage runs after"),
    "no type": (HEAD + "params: {pretrain.lr: {low: 1, high: 2}}", "params.pretrain.lr': needs a type"),
    "empty choices": (HEAD + "params: {pretrain.schedule: {type: categorical, choices: []}}", "choices"),
    "enqueued outside": (HEAD + LR + "enqueue: [{pretrain.lr: 5.0}]", "field 'enqueue.0.pretrain.lr'"),
    "a stage the recipe lacks": (
        "metric: finetune.val_loss\ndirection: minimize\n" + LR,
        "no finetune stage",
    ),
    "direction": ("metric: pretrain.val_bpb\ndirection: down\n" + LR, "field 'direction'"),
    "not YAML": ("metric: [", "cannot be read (while parsing a flow node"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_a_bad_space_is_one_line_naming_the_field(case, tmp_path, recipe_file):
    body, named = BAD_SPACES[case]
    space = tmp_path / "space.yaml"
    space.write_text(body)
    result = CliRunner().invoke(app, _args(recipe_file, space, tmp_path / "study", 2))
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {space}: ") and result.output.count("\n") == 1
    assert named in result.output
    assert not (tmp_path / "study").exists()  # refused before anything was made


def test_a_bad_space_through_the_real_cli(tmp_path, recipe_file):
    space = tmp_path / "space.yaml"
    space.write_text(HEAD + "params: {pretrain.lr: {type: float, low: 1.0, high: 0.1}}")
    result = subprocess.run(
        [sys.executable, "-m", "trulyopen", *_args(recipe_file, space, tmp_path / "study", 2)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr.startswith(f"error: {space}: field 'params.pretrain.lr': ")
    assert result.stderr.count("\n") == 1 and "low" in result.stderr


def test_suggestions_are_seeded_and_the_same_after_a_resume(tmp_path, recipe_file):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(
        "metric: pretrain.val_bpb\ndirection: minimize\nsampler: {seed: 7, n_startup_trials: 2}\n"
        "params:\n  pretrain.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
        "  pretrain.schedule: {type: categorical, choices: [cosine, wsd, constant]}\n"
    )
    space = load_space(space_file)
    recipe, _ = check_against_recipe(space, space_file, recipe_file, [])

    def suggest(study_dir: Path, n: int) -> list[dict]:
        study = open_study(study_dir, space, recipe, space_file)  # a new study object: a new process's
        out = []
        for _ in range(n):
            trial = ask(study, space)
            study.tell(trial, trial.params["pretrain.lr"] * 100)  # any function of the parameters
            out.append(trial.params)
        return out

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    straight = suggest(tmp_path / "a", 5)
    resumed = suggest(tmp_path / "b", 2) + suggest(tmp_path / "b", 3)
    assert straight == resumed
    assert len({p["pretrain.lr"] for p in straight}) == 5  # drawn, not repeated after the resume


def test_the_quickstart_space_file_fits_the_quickstart():
    root = Path(__file__).parent.parent / "recipes"
    space = load_space(root / "quickstart.tune.yaml")
    _, stages = check_against_recipe(space, root / "quickstart.tune.yaml", root / "quickstart.yaml", [])
    assert set(stages.values()) == {"pretrain"} and space.metric == "pretrain.val_bpb"
    assert yaml.safe_load((root / "quickstart.tune.yaml").read_text())["enqueue"]


@pytest.mark.parametrize("value", [1e-05, 0.003, 4, True, None, "cosine", "yes", "a: b"])
def test_a_trial_value_reads_back_through_set_as_itself(value):
    assert parse_override(set_override("pretrain.lr", value)) == ("pretrain.lr", value)
