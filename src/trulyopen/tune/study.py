"""The study: Optuna's TPE sampler and pruner over trials that are whole runs, kept in
STUDY_DIR/study.db so that a killed study resumes.

    load_space ─► check it against the recipe ─► lock STUDY_DIR ─► open study.db (or create it)
        └─► trials a killed tune left RUNNING: failed, their parameters queued again
        └─► shared stages once (STUDY_DIR/shared)
        └─► until N trials have finished (complete, pruned, or failed on their own):
                ask (TPE, seeded by the study's seed and its length) ─► run_trial ─► tell
                ─► results.md/.csv, study.json, study.png, best.yaml (results.py)

Resuming: the study's trials live in Optuna's RDB storage (sqlite), written as they happen. Only one
process holds STUDY_DIR/.lock at a time, so a trial still RUNNING when the study opens was left by a
tune process that died: it is failed and queued again (retry.py). The study remembers its space and
its recipe: another space (or recipe) is refused.

The sampler is made anew before each trial with a seed drawn from the study's seed and the number
of trials so far, so the same space and history give the same suggestions, resumed or not (a
TPESampler seeded once per process would start its random draws over on every resume).
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trulyopen import errors
from trulyopen.progress import Progress
from trulyopen.recipe import Recipe
from trulyopen.tune import results
from trulyopen.tune.retry import finished, recover
from trulyopen.tune.space import Space, SpaceError, check_against_recipe, load_space, set_override
from trulyopen.tune.trial import MetricTail, Outcome, link_shared, run_shared, run_trial, shared_stages

STUDY_NAME = "trulyopen"


class StudyError(errors.UserError):
    """A study directory that cannot be used as asked (another space, another tune running it)."""


@contextmanager
def locked(study_dir: Path) -> Iterator[None]:
    """Hold STUDY_DIR/.lock for the study's lifetime: the kernel frees it when the process dies."""
    study_dir.mkdir(parents=True, exist_ok=True)
    with open(study_dir / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise StudyError(
                f"{study_dir}: another `trulyopen tune` (pid {f.read().strip() or '?'}) is running this "
                "study; wait for it, or give another --study-dir"
            ) from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths at which two JSON-like trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".") or "(all)"]


def open_study(study_dir: Path, space: Space, recipe: Recipe, space_file: Path) -> Any:
    """Study.db's study, made on first use (with the space's enqueued trials); refused when it was
    made for another space or recipe."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{(study_dir / 'study.db').resolve()}")
    marks = {"space": space.model_dump(mode="json"), "recipe": recipe.model_dump(mode="json")}
    if STUDY_NAME in optuna.get_all_study_names(storage):
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage, pruner=space.pruner.pruner())
        for what, mark in marks.items():
            if what in study.user_attrs and study.user_attrs[what] != mark:
                diff = ", ".join(_differences(study.user_attrs[what], mark)[:5])
                given = space_file if what == "space" else "the recipe and its overrides"
                raise StudyError(
                    f"{study_dir}: this study was made with another {what} ({given} differs at: {diff}); "
                    f"use the original, or give another --study-dir"
                )
    else:
        study = optuna.create_study(
            storage=storage, study_name=STUDY_NAME, direction=space.direction, pruner=space.pruner.pruner()
        )
    if "space" not in study.user_attrs:  # new (or killed before it was marked)
        if not study.trials:
            for settings in space.enqueue:
                study.enqueue_trial(settings)
        for what, mark in marks.items():
            study.set_user_attr(what, mark)
    return study


def ask(study: Any, space: Space) -> Any:
    """The next trial: a queued one first, else TPE's suggestion."""
    import optuna

    seed = (space.sampler.seed * 1_000_003 + len(study.get_trials(deepcopy=False))) % 2**32
    study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=space.sampler.n_startup_trials)
    return study.ask(space.distributions())


@dataclass
class _Plan:
    study: Any
    study_dir: Path
    space: Space
    space_file: Path
    recipe_file: Path
    overrides: list[str]
    shared: list[str]
    poll: float


def _run_one(trial: Any, plan: _Plan) -> Outcome:
    """Run a trial in STUDY_DIR/trial-NNNN and tell the study how it ended."""
    from optuna.trial import TrialState

    name = f"trial-{trial.number:04d}"
    run_dir = plan.study_dir / name
    trial.set_user_attr("run_dir", name)
    if plan.shared:
        link_shared(plan.study_dir / "shared", run_dir)
    settings = [*plan.overrides, *(set_override(k, v) for k, v in trial.params.items())]
    command = [sys.executable, "-m", "trulyopen", plan.space.stage, str(plan.recipe_file), "--run-dir"]
    command += [str(run_dir), *(arg for o in settings for arg in ("--set", o))]
    chosen = ", ".join(f"{k}={v}" for k, v in trial.params.items())
    command += ["--why", f"tune: trial {trial.number} of the study in {plan.study_dir.name} ({chosen})"]
    metrics = MetricTail(run_dir / plan.space.stage / "metrics.jsonl", plan.space.metric_name)
    outcome = run_trial(trial, command, metrics, plan.study_dir / "logs" / name, poll=plan.poll)
    trial.set_user_attr("steps", outcome.steps)
    trial.set_user_attr("seconds", round(outcome.seconds, 3))
    if outcome.error:
        trial.set_user_attr("error", outcome.error)
        trial.set_user_attr("stderr", outcome.stderr)
    if outcome.state == "complete":
        plan.study.tell(trial, outcome.value)
    else:
        plan.study.tell(trial, state=TrialState.PRUNED if outcome.state == "pruned" else TrialState.FAIL)
    return outcome


def tune(
    recipe_file: Path,
    space_file: Path,
    n_trials: int,
    study_dir: Path | None = None,
    overrides: list[str] | None = None,
    poll: float = 0.2,
) -> Path:
    """Run (or resume) a study until `n_trials` trials have finished; write its results; return STUDY_DIR."""
    overrides = list(overrides or [])
    space = load_space(space_file)
    recipe, stages = check_against_recipe(space, space_file, recipe_file, overrides)
    study_dir = Path(study_dir or Path("runs") / f"{recipe.name}-tune")
    errors.set_run_dir(study_dir)
    shared = shared_stages(recipe, sorted(set(stages.values())))
    with locked(study_dir):
        study = open_study(study_dir, space, recipe, space_file)
        plan = _Plan(study, study_dir, space, space_file, recipe_file, overrides, shared, poll)
        for number in recover(study):
            errors.warn(
                f"trial {number} was cut short (its tune process stopped): failed, queued to run again"
            )
        done = finished(study)
        if done >= n_trials:
            print(f"tune: {done} trials have finished (--trials {n_trials}): nothing to run")
        elif shared:
            print(f"tune: {', '.join(shared)} once, in {study_dir / 'shared'} (the same for every trial)")
            run_shared(recipe, study_dir / "shared", shared)
        with Progress("tune", n_trials, unit="trials", already=min(done, n_trials)) as progress:
            while done < n_trials:
                trial = ask(study, space)
                outcome = _run_one(trial, plan)
                done = finished(study)
                results.write(study_dir, study, space, recipe_file, overrides)
                print(results.trial_line(study.trials[trial.number], space, f"{done}/{n_trials}"))
                progress.note = results.best_note(study, space)
                progress.update(1)
                _check_metric_named(outcome, plan, trial.number)
        table = results.write(study_dir, study, space, recipe_file, overrides)
    print(table)
    print(results.summary(study_dir, study, space))
    return study_dir


def _check_metric_named(outcome: Outcome, plan: _Plan, number: int) -> None:
    """A stage that ran to its end without writing the metric: every trial would fail the same way."""
    name, space = plan.space.metric_name, plan.space
    if outcome.state == "failed" and outcome.exit_code == 0 and name not in outcome.keys:
        keys = ", ".join(sorted(outcome.keys)) or "nothing"
        raise SpaceError(
            f"{plan.space_file}: field 'metric': {space.metric}: trial-{number:04d}'s "
            f"{space.stage}/metrics.jsonl has no {name!r} (it has {keys}); name one of those"
        )
