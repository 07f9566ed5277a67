"""What a study leaves for people and machines, rewritten after every trial (each file whole, then
renamed into place), so a study stopped at any point still shows all it has done:

    results.md, results.csv   one row a trial: trial, each parameter, value, state, steps, seconds
    study.json                every trial (with its intermediate values, run directory, error),
                              the best trial, the space, the direction
    study.png                 the metric against trial number with the running best, pruned trials
                              marked; beside it each trial's validation curve
    best.yaml                 the recipe with the best trial's overrides: `trulyopen run best.yaml`

A trial's state is Optuna's, except that a trial cut short by a killed tune (and run again as a
later trial) is `interrupted` rather than `failed`.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from trulyopen.files import atomic_open, write_json, write_text
from trulyopen.recipe import load_recipe, recipe_to_yaml
from trulyopen.tune.retry import retried, retry_history
from trulyopen.tune.space import Space, set_override


def _state(trial: Any, cut: set[int]) -> str:
    state = trial.state.name.lower()
    return "interrupted" if state == "fail" and trial.number in cut else state.replace("fail", "failed")


def _best(study: Any) -> Any | None:
    try:
        return study.best_trial
    except ValueError:  # no complete trial yet
        return None


def rows(study: Any) -> list[dict[str, Any]]:
    """One record a trial that has started, in trial order."""
    trials = [t for t in study.get_trials() if t.state.name != "WAITING"]
    cut = retried(study)
    out = []
    for t in trials:
        history = retry_history(t)
        out.append(
            {
                "trial": t.number,
                "params": t.params,
                "value": t.value,
                "state": _state(t, cut),
                "steps": t.user_attrs.get("steps"),
                "seconds": t.user_attrs.get("seconds"),
                "run_dir": t.user_attrs.get("run_dir"),
                "retry_of": history[-1] if history else None,
                "error": t.user_attrs.get("error"),
                "stderr": t.user_attrs.get("stderr"),
                "intermediate": sorted(t.intermediate_values.items()),
            }
        )
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _cells(r: dict[str, Any], space: Space) -> list[Any]:
    """A record as the columns of the results: trial, each parameter, value, state, steps, seconds."""
    params = [r["params"].get(k) for k in space.params]
    return [r["trial"], *params, r["value"], r["state"], r["steps"], r["seconds"]]


def table(records: list[dict[str, Any]], space: Space) -> str:
    """The markdown table of results.md (also what `tune` prints at the end)."""
    head = ["trial", *space.params, space.metric, "state", "steps", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(c) for c in _cells(r, space)) + " |" for r in records]
    return "\n".join(lines)


def _csv(records: list[dict[str, Any]], space: Space) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["trial", *space.params, "value", "state", "steps", "seconds"])
    writer.writerows(_cells(r, space) for r in records)
    return buf.getvalue()


def _plot(records: list[dict[str, Any]], space: Space, best: int | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (by_trial, curves) = plt.subplots(1, 2, figsize=(11, 4))
    for state, marker, color in (("complete", "o", "tab:blue"), ("pruned", "x", "tab:orange")):
        shown = [(r["trial"], r["value"]) for r in records if r["state"] == state and r["value"] is not None]
        if shown:
            by_trial.scatter(*zip(*shown, strict=True), marker=marker, c=color, label=state)
    for r in records:
        if r["state"] in ("failed", "interrupted"):  # no value: a faint line where the trial was
            label = None if any(x.get_label() == "failed" for x in by_trial.lines) else "failed"
            by_trial.axvline(r["trial"], c="tab:red", alpha=0.3, lw=1, label=label)
    complete = [r for r in records if r["state"] == "complete"]
    if complete:
        better = min if space.direction == "minimize" else max
        running = [better(r["value"] for r in complete[: i + 1]) for i in range(len(complete))]
        trials = [r["trial"] for r in complete] + [records[-1]["trial"]]
        by_trial.step(trials, [*running, running[-1]], where="post", c="tab:green", label="best so far")
    by_trial.set(xlabel="trial", ylabel=space.metric, title=f"{space.metric} ({space.direction})")
    by_trial.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_trial.legend()
    for r in records:
        if r["intermediate"]:
            steps, values = zip(*r["intermediate"], strict=True)
            pruned = r["state"] == "pruned"
            curves.plot(
                steps,
                values,
                ls="--" if pruned else "-",
                marker="x" if pruned else None,
                markevery=[len(steps) - 1],  # where a pruned trial was stopped
                lw=2.5 if r["trial"] == best else 1,
                label=f"trial {r['trial']} (best)" if r["trial"] == best else None,
            )
    curves.set(xlabel="step", ylabel=space.metric, title="validation curves (dashed, x: pruned there)")
    if best is not None:
        curves.legend()
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", metadata={"Software": None})
    plt.close(fig)


def write(study_dir: Path, study: Any, space: Space, recipe_file: Path, overrides: list[str]) -> str:
    """Write every results file; return the markdown table."""
    records = rows(study)
    best = _best(study)
    md = table(records, space)
    write_text(study_dir / "results.md", f"# {space.metric} ({space.direction})\n\n{md}\n")
    write_text(study_dir / "results.csv", _csv(records, space))
    summary = None
    if best is not None:
        summary = {
            "trial": best.number,
            "value": best.value,
            "params": best.params,
            "run_dir": best.user_attrs.get("run_dir"),
        }
    write_json(
        study_dir / "study.json",
        {
            "metric": space.metric,
            "direction": space.direction,
            "space": space.model_dump(mode="json"),
            "recipe": str(recipe_file),
            "overrides": overrides,
            "trials": [{**r, "value": _finite(r["value"])} for r in records],
            "best": summary,
        },
    )
    _plot(records, space, best.number if best else None, study_dir / "study.png")
    if best is not None:
        recipe = load_recipe(recipe_file, [*overrides, *(set_override(k, v) for k, v in best.params.items())])
        header = (
            f"# The best trial of {study_dir}: trial {best.number} ({best.user_attrs.get('run_dir')}), "
            f"{space.metric} = {best.value:.6g}\n# run it: trulyopen run {study_dir / 'best.yaml'}\n"
        )
        write_text(study_dir / "best.yaml", header + recipe_to_yaml(recipe))
    return md


def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


def trial_line(trial: Any, space: Space, count: str) -> str:
    """One line on a trial that has just ended."""
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
    steps, seconds = trial.user_attrs.get("steps"), trial.user_attrs.get("seconds") or 0.0
    state = trial.state.name.lower()
    if state == "fail":
        said = f"failed ({trial.user_attrs.get('error')}; see logs/{trial.user_attrs.get('run_dir')}.err)"
    else:
        said = f"{space.metric_name} {_fmt(trial.value)} ({state}, step {steps})"
    return f"tune: trial {trial.number} [{count}] {params} -> {said} in {seconds:.1f}s"


def best_note(study: Any, space: Space) -> str:
    best = _best(study)
    return "" if best is None else f"best {space.metric_name} {best.value:.4g} (trial {best.number})"


def summary(study_dir: Path, study: Any, space: Space) -> str:
    best = _best(study)
    files = ", ".join(str(study_dir / n) for n in ("results.md", "results.csv", "study.json", "study.png"))
    if best is None:
        return f"tune: no trial has completed yet; written: {files}"
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
    return (
        f"best: trial {best.number}, {space.metric} {best.value:.6g} ({params}); its run: "
        f"{study_dir / best.user_attrs.get('run_dir', '')}\n"
        f"written: {files}, {study_dir / 'best.yaml'} (trulyopen run {study_dir / 'best.yaml'})"
    )
