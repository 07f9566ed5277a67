"""`decisions/` in a release: the runs that led to the released one, and the ones tried beside them.

    decisions/
      README.md                 the tree, each run's reason, diff, status and results
      released.txt              which of them is the released run
      project.jsonl             the project ledger's lines about these runs, byte for byte
      runs/<name>/recipe.yaml   every such run's resolved recipe (as the ledger recorded it)
      runs/<name>/diff.json     its recipe diff against its parent
      runs/<name>/ledger.jsonl, pretrain/metrics.jsonl, finetune/metrics.jsonl, eval/*/results.json
                                where its folder still exists (no checkpoints unless asked for)

Which runs: the released run's ancestors, and every other child of each ancestor: the alternatives
tried at each step, failed and killed ones included. Its own descendants are later work, not how it
was made.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from trulyopen.files import write_json, write_text
from trulyopen.history.project import Project, Run

KEPT = ("ledger.jsonl", "recipe.yaml", "pretrain/metrics.jsonl", "finetune/metrics.jsonl")


def chosen(runs: dict[str, Run], name: str) -> list[str]:
    """The ancestors of `name`, `name`, and every other child of each ancestor, in ledger order."""
    ancestors: list[str] = []
    todo = list(runs[name].parents) if name in runs else []
    while todo:
        p = todo.pop(0)
        if p in runs and p not in ancestors:
            ancestors.append(p)
            todo += runs[p].parents
    keep = {name, *ancestors}
    keep |= {r.name for r in runs.values() if set(r.parents) & set(ancestors)}
    return [r for r in runs if r in keep]


def write_decisions(run_dir: Path, out: Path, checkpoints: bool = False) -> list[str]:
    """Write `out` (a release's decisions/) for the run in `run_dir`; return the runs it holds, or []
    when the run's project has no history of it."""
    project = Project(run_dir.resolve().parent)
    runs = project.runs()
    name = run_dir.resolve().name
    if name not in runs:
        return []
    names = chosen(runs, name)
    lines = [
        line
        for line in project.path.read_text(encoding="utf-8").splitlines(keepends=True)
        if line.strip() and json.loads(line)["run"] in names
    ]
    write_text(out / "project.jsonl", "".join(lines))
    for n in names:
        run, folder, dest = runs[n], project.root / n, out / "runs" / n
        write_text(dest / "recipe.yaml", yaml.safe_dump(run.recipe, sort_keys=False))
        write_json(dest / "diff.json", {"parents": run.parents, "diff": run.diff, "why": run.why})
        if not folder.is_dir():
            continue
        for rel in KEPT:
            if (folder / rel).is_file():
                dest.joinpath(rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / rel, dest / rel)
        for res in sorted(folder.glob("eval/*/results.json")):
            target = dest / res.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(res, target)
        if checkpoints and n != name and (folder / "checkpoints").is_dir():
            shutil.copytree(folder / "checkpoints", dest / "checkpoints")
    write_text(out / "README.md", readme({n: runs[n] for n in names}, name))
    write_text(out / "released.txt", name + "\n")
    return names


def readme(runs: dict[str, Run], released: str) -> str:
    from trulyopen.history.show import tree_lines

    lines = [
        f"# How {released} was made",
        "",
        "Every run that led to this release, and the alternatives tried beside them, with the reason",
        "each was run, what it changed against the run it came from, and how it ended.",
        "",
        "```",
        *tree_lines(runs),
        "```",
        "",
    ]
    return "\n".join(lines)


def how_we_got_here(release_dir: Path) -> str:
    """The model card's section, from the release's decisions/."""
    ledger = release_dir / "decisions" / "project.jsonl"
    if not ledger.is_file():
        return "Not recorded: this run's project has no history of it (`trulyopen history`)."
    runs = Project(ledger.parent).runs()  # decisions/ is a project ledger of its own
    released = release_dir.joinpath("decisions", "released.txt").read_text().strip()
    out = []
    for run in runs.values():
        role = "this model" if run.name == released else run.status
        why = f": {run.why[-1]}" if run.why else ""
        changed = ", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in list(run.diff.items())[:4])
        came = f" From {run.parent}" + (f", changing {changed}." if changed else ".") if run.parent else ""
        error = f" It ended with {run.error.splitlines()[0][:160]}." if run.error else ""
        out.append(f"- **{run.name}** ({role}){why}.{came}{error}")
    return "\n".join(out) + "\n\nThe recipes, diffs, logs and results of these runs are in `decisions/`."
