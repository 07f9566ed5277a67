"""Decision records: a toy project of runs, its tree, its release's decisions/, and what goes wrong."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from trulyopen import api
from trulyopen.history.project import Project
from trulyopen.release.audit import audit

from .conftest import build_corpus, write_recipe


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trulyopen", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    """base; two ablations of it; a run killed mid-training; the winner, from one ablation, released;
    and a run from the other ablation that the release must leave out."""
    tmp = tmp_path_factory.mktemp("history")
    corpus = build_corpus(tmp)
    recipe = write_recipe(tmp, corpus)
    runs = tmp / "runs"
    api.run(recipe, run_dir=runs / "base", why="the toy recipe as it is")
    api.run(recipe, ["pretrain.lr=0.001"], run_dir=runs / "lr-low", why="3e-3 looked too high")
    api.run(recipe, ["pretrain.warmup_steps=2"], run_dir=runs / "warmup", why="a longer warmup")
    # killed mid-training: Ctrl-C once its first step is logged
    proc = subprocess.Popen(
        [sys.executable, "-m", "trulyopen", "run", str(recipe), "--run-dir", str(runs / "big-lr"),
         "--set", "pretrain.max_steps=2000", "--set", "pretrain.lr=0.05", "--why", "does a huge lr diverge?",
         "--parent", "base"],
        cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    metrics = runs / "big-lr" / "pretrain" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    release = ["pretrain.lr=0.001", "pretrain.max_steps=6", "release.producer=the test suite"]
    api.run(recipe, release, run_dir=runs / "winner", why="lr-low, trained a little longer")
    api.run(recipe, ["pretrain.warmup_steps=3"], run_dir=runs / "warmup-3", parents=["warmup"])
    return {"tmp": tmp, "runs": runs, "recipe": recipe, "killed_code": proc.returncode}


def test_the_tree_has_the_right_parents_diffs_and_reasons(project):
    runs = Project(project["runs"]).runs()
    assert list(runs) == ["base", "lr-low", "warmup", "big-lr", "winner", "warmup-3"]
    parents = {n: r.parent for n, r in runs.items()}
    assert parents == {
        "base": None,
        "lr-low": "base",
        "warmup": "base",
        "big-lr": "base",
        "winner": "lr-low",
        "warmup-3": "warmup",
    }
    assert list(runs["lr-low"].diff) == ["pretrain.lr"] and runs["lr-low"].diff["pretrain.lr"][1] == 0.001
    winner = runs["winner"].diff  # against lr-low: the steps and the release section, not the lr
    assert winner["pretrain.max_steps"] == [4, 6] and "pretrain.lr" not in winner
    assert all(k == "pretrain.max_steps" or k.startswith("release") for k in winner)
    assert runs["base"].why == ["the toy recipe as it is"]  # a root keeps its reason
    assert runs["big-lr"].status == "killed" and project["killed_code"] == 130
    assert all(runs[n].status == "finished" for n in ("base", "lr-low", "warmup", "winner", "warmup-3"))
    assert runs["winner"].results["pretrain.steps"] == 6 and "pretrain.val_bpb" in runs["winner"].results
    done = cli("history", str(project["runs"]), cwd=project["tmp"])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("base  finished")
    assert any(line.startswith("│   └── winner  finished") for line in lines), done.stdout
    assert any("big-lr  killed" in line and "does a huge lr diverge?" in line for line in lines)
    done = cli(
        "history", "diff", "lr-low", "warmup", "--project", str(project["runs"]), "--json", cwd=project["tmp"]
    )
    result = json.loads(done.stdout)
    assert set(result["recipe"]) == {"pretrain.lr", "pretrain.warmup_steps"} and result["code"] == {}


def test_the_release_holds_the_ancestors_and_their_alternatives_and_verifies(project):
    release = project["runs"] / "winner" / "release"
    decisions = release / "decisions"
    held = sorted(p.name for p in (decisions / "runs").iterdir())
    assert held == ["base", "big-lr", "lr-low", "warmup", "winner"]  # not warmup-3: another branch's
    lines = [json.loads(x) for x in (decisions / "project.jsonl").read_text().splitlines()]
    assert {e["run"] for e in lines} == set(held)
    assert (decisions / "runs" / "base" / "pretrain" / "metrics.jsonl").is_file()
    assert not any((decisions / "runs").rglob("*.safetensors"))  # checkpoints only when asked for
    assert api.verify(release).problems == []
    card = (release / "README.md").read_text()
    section = card.split("## How we got here", 1)[1].split("\n## ", 1)[0]
    assert "**big-lr** (killed): does a huge lr diverge?" in section
    assert "**winner** (this model): lr-low, trained a little longer. From lr-low" in section
    report = next(c for c in audit(release).to_json()["components"] if c["name"] == "Technical report")
    assert "decisions/project.jsonl" in report["supporting"]


def test_verify_names_a_history_that_disagrees(project, tmp_path):
    release = tmp_path / "release"
    shutil.copytree(project["runs"] / "winner" / "release", release)
    recipe = release / "decisions" / "runs" / "lr-low" / "recipe.yaml"
    data = yaml.safe_load(recipe.read_text())
    data["pretrain"]["lr"] = 0.5
    recipe.write_text(yaml.safe_dump(data))
    problems = api.verify(release).problems
    assert "decisions/runs/lr-low/recipe.yaml: not the recipe the history recorded for lr-low" in problems


def test_the_html_history_renders_with_the_curves_overlaid(project, chromium, tmp_path):
    from selenium.webdriver.common.by import By

    page = tmp_path / "history.html"
    done = cli("history", str(project["runs"]), "--html", str(page), cwd=project["tmp"])
    assert done.returncode == 0, done.stderr
    chromium.get(page.as_uri())
    images = chromium.find_elements(By.CSS_SELECTOR, "img.curve")
    assert [i.get_attribute("alt") for i in images] == ["pretrain loss", "pretrain val_bpb"]
    assert all(chromium.execute_script("return arguments[0].naturalWidth", i) > 100 for i in images)
    tree = chromium.find_element(By.ID, "tree").text
    assert all(name in tree for name in ("base", "lr-low", "warmup", "big-lr", "winner"))


def test_a_deleted_run_keeps_its_entry_and_a_changed_ledger_is_named(project, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(project["runs"], runs, ignore=shutil.ignore_patterns("release", "checkpoints"))
    shutil.rmtree(runs / "warmup-3")
    with (runs / "lr-low" / "ledger.jsonl").open("a") as f:
        f.write(json.dumps({"stage": "edited by hand"}) + "\n")
    done = cli("history", str(runs), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "warmup-3: its folder is gone; its entry is kept, marked deleted" in done.stdout
    assert any("└── warmup-3  deleted" in line for line in done.stdout.splitlines()), done.stdout
    assert "problem: lr-low: its ledger.jsonl is not the one the project recorded" in done.stdout
    assert Project(runs).runs()["warmup-3"].deleted


def test_why_on_a_rerun_is_added_and_history_without_a_project_says_so(project, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(project["runs"], runs, ignore=shutil.ignore_patterns("release"))
    api.run(project["recipe"], run_dir=runs / "base", why="checked again after the refactor")
    assert Project(runs).runs()["base"].why == ["the toy recipe as it is", "checked again after the refactor"]
    done = cli("history", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert done.returncode == 2 and "no project history here" in done.stderr
    assert os.path.exists(runs / "project.jsonl")


def test_a_failed_run_records_its_error(project, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(project["runs"], runs, ignore=shutil.ignore_patterns("release", "checkpoints"))
    args = ["--run-dir", str(runs / "no-model"), "--set", "model.init_from=./no-such-model"]
    done = cli("run", str(project["recipe"]), *args, "--why", "a base that is not there", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    run = Project(runs).runs()["no-model"]
    assert run.status == "failed" and "no-such-model" in run.error and run.why == ["a base that is not there"]
