"""The project ledger: every run of a project (a folder of runs), what it came from, why, and how it ended.

    runs/                       the project: the folder the run directories are in
      project.jsonl             one JSON line per event, appended
        {"event": "start", "run": "lr-low", "parent": "base", "diff": {"pretrain.lr": [0.003, 0.001]},
         "why": "3e-3 spiked at step 40", "recipe": {...}, "recipe_sha256": ..., "code_version": ...}
        {"event": "end", "run": "lr-low", "status": "finished" | "failed" | "killed", "error": ...,
         "results": {...}, "ledger_sha256": ..., "bytes": ...}
        {"event": "resume", "run": ..., "why": ...}       the same recipe run again (a rerun, a resume)
        {"event": "deleted", "run": ...}                  noticed by `history`: the folder is gone
      base/  lr-low/  ...       the runs themselves

A run's parent is the run it says it came from (`--parent`, or tune and merge, which know), else the
earlier run of the project whose recipe differs from it in the fewest fields (at most MAX_DIFF). The
diff is taken on the resolved recipes, field by dotted field. Results come from the run's own files:
the last training loss and validation bits per byte, and every evaluation metric with its standard
error. The run's own ledger is hashed at its end, so a run changed behind the project's back is found.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from trulyopen.files import sha256_file

LEDGER = "project.jsonl"
MAX_DIFF = 12  # fields: a recipe further than this from every earlier run starts a new tree


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted.field: value} of a recipe's JSON; lists are values (a list of sources changes as one)."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def recipe_sha256(recipe: dict) -> str:
    """The hash the history records of a resolved recipe (its canonical JSON)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def recipe_diff(old: dict, new: dict) -> dict[str, list]:
    """{field: [old, new]} for every field that differs (None where a side lacks it)."""
    a, b = flatten(old), flatten(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


@dataclass
class Run:
    """A run as the project ledger tells it, its events folded together."""

    name: str
    parent: str | None = None
    parents: list[str] = field(default_factory=list)  # a merge has several
    diff: dict[str, list] = field(default_factory=dict)
    why: list[str] = field(default_factory=list)
    recipe: dict = field(default_factory=dict)
    recipe_sha256: str | None = None
    started: str | None = None
    status: str = "running or killed"  # until an end event says otherwise
    error: str | None = None
    results: dict = field(default_factory=dict)
    ledger_sha256: str | None = None
    bytes: int | None = None
    deleted: bool = False
    code_version: dict = field(default_factory=dict)


class Project:
    """The project ledger of a folder of runs."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = self.root / LEDGER

    def events(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(x) for x in self.path.read_text(encoding="utf-8").splitlines() if x.strip()]

    def append(self, event: dict[str, Any]) -> None:
        """One line, in one write to a file opened for appending: runs of one project may end at the
        same moment (tune's trials, two terminals), and neither line may be lost."""
        event = {"time": datetime.now(UTC).isoformat(timespec="seconds"), **event}
        line = json.dumps(event, sort_keys=True, ensure_ascii=False).encode() + b"\n"
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def runs(self) -> dict[str, Run]:
        """Every run, in the order it first started, its events folded."""
        out: dict[str, Run] = {}
        for e in self.events():
            run = out.setdefault(e["run"], Run(e["run"]))
            kind = e["event"]
            if kind == "start":
                run.parent = e.get("parent")
                run.parents = e.get("parents") or ([e["parent"]] if e.get("parent") else [])
                run.diff, run.recipe, run.recipe_sha256 = (
                    e.get("diff", {}),
                    e.get("recipe", {}),
                    e["recipe_sha256"],
                )
                run.started, run.code_version = run.started or e["time"], e.get("code_version", {})
                run.status, run.error, run.deleted = "running or killed", None, False
                if e.get("why"):
                    run.why.append(e["why"])
            elif kind in ("why", "resume"):
                if e.get("why"):
                    run.why.append(e["why"])
                if kind == "resume":
                    run.status, run.error = "running or killed", None
            elif kind == "end":
                run.status, run.error, run.results = e["status"], e.get("error"), e.get("results", {})
                run.ledger_sha256, run.bytes = e.get("ledger_sha256"), e.get("bytes")
            elif kind == "deleted":
                run.deleted = True
        return out

    # ------------------------------------------------------------------------------ recording

    def start(
        self, run_dir: Path, recipe: dict, why: str | None = None, parents: list[str] | None = None
    ) -> None:
        """Record a run starting (again) with this recipe: its parent and diff, and its reason."""
        name = run_dir.name
        sha = recipe_sha256(recipe)
        runs = self.runs()
        mine = runs.get(name)
        if mine is not None and mine.recipe_sha256 == sha and not parents:
            # the same recipe again (a resume, a rerun): running again, with the new reason if any
            self.append({"event": "resume", "run": name, **({"why": why} if why else {})})
            return
        if parents:
            parent_runs = [runs[p] for p in parents if p in runs]
            base = parent_runs[0].recipe if parent_runs else {}
        else:
            parents, base = _closest(recipe, [r for r in runs.values() if r.name != name])
        from trulyopen.ledger import code_version

        self.append(
            {
                "event": "start",
                "run": name,
                "path": os.path.relpath(run_dir, self.root),
                "parent": parents[0] if parents else None,
                "parents": parents,
                "diff": recipe_diff(base, recipe) if parents else {},
                "why": why,
                "recipe": recipe,
                "recipe_sha256": sha,
                "code_version": code_version(),
            }
        )

    def end(self, run_dir: Path, status: str, error: str | None = None) -> None:
        ledger = run_dir / "ledger.jsonl"
        self.append(
            {
                "event": "end",
                "run": run_dir.name,
                "status": status,
                "error": error,
                "results": results(run_dir),
                "ledger_sha256": sha256_file(ledger) if ledger.is_file() else None,
                "bytes": sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file()),
            }
        )

    def notice_deleted(self) -> list[str]:
        """Mark runs whose folder is gone (once); return their names."""
        gone = []
        for run in self.runs().values():
            if not run.deleted and not (self.root / run.name).is_dir():
                self.append({"event": "deleted", "run": run.name})
                gone.append(run.name)
        return gone

    def problems(self) -> list[str]:
        """Runs that disagree with the project ledger, run by run."""
        out = []
        for run in self.runs().values():
            folder = self.root / run.name
            if run.deleted or not folder.is_dir():
                continue
            ledger = folder / "ledger.jsonl"
            if run.ledger_sha256 and ledger.is_file() and sha256_file(ledger) != run.ledger_sha256:
                out.append(
                    f"{run.name}: its ledger.jsonl is not the one the project recorded when it ended "
                    f"(changed since, outside `trulyopen run`)"
                )
            if run.parent and run.parent not in self.runs():
                out.append(f"{run.name}: its parent {run.parent} is not in {self.path}")
        return out


def start_run(run_dir: Path, recipe: dict, why: str | None = None, parents: list[str] | None = None):
    """The project of `run_dir` (its folder), with the run's start recorded; None where the ledger
    cannot be written: a run never fails for its history."""
    from trulyopen.errors import warn

    try:
        project = Project(run_dir.resolve().parent)
        project.start(run_dir.resolve(), recipe, why, parents)
        return project
    except OSError as e:
        warn(f"{run_dir.parent}/{LEDGER}: not written ({e}); {run_dir.name} is left out of the history")
        return None


def end_run(project: Project | None, run_dir: Path, status: str, error: str | None = None) -> None:
    if project is None:
        return
    try:
        project.end(run_dir.resolve(), status, error)
    except OSError as e:
        from trulyopen.errors import warn

        warn(f"{project.path}: the end of {run_dir.name} not recorded ({e})")


def _closest(recipe: dict, earlier: list[Run]) -> tuple[list[str], dict]:
    """([the earlier run with the fewest differing fields], its recipe), or ([], {}) if none is near."""
    best: tuple[int, int, Run] | None = None
    for i, run in enumerate(earlier):
        n = len(recipe_diff(run.recipe, recipe))
        if n <= MAX_DIFF and (best is None or (n, -i) < (best[0], -best[1])):
            best = (n, i, run)
    return ([best[2].name], best[2].recipe) if best else ([], {})


def results(run_dir: Path) -> dict[str, Any]:
    """The run's key figures: last training loss and val bits per byte, every eval metric with its
    standard error."""
    out: dict[str, Any] = {}
    for stage in ("pretrain", "finetune"):
        metrics = run_dir / stage / "metrics.jsonl"
        if not metrics.is_file():
            continue
        lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        for key in ("loss", "val_bpb", "val_loss"):
            values = [x[key] for x in lines if isinstance(x.get(key), int | float)]
            if values:
                out[f"{stage}.{key}"] = values[-1]
        steps = [x["step"] for x in lines if "step" in x]
        if steps:
            out[f"{stage}.steps"] = steps[-1]
    for res in sorted(run_dir.glob("eval/*/results.json")):
        for task, t in json.loads(res.read_text()).get("tasks", {}).items():
            for metric, m in t.get("metrics", {}).items():
                if "value" in m:
                    out[f"eval.{res.parent.name}.{task}.{metric}"] = {
                        "value": m["value"],
                        "stderr": m.get("stderr"),
                    }
    return out
