"""Trials cut short by a killed `tune`: failed, and run again.

A trial still RUNNING in study.db when a study opens was left by a tune process that died (only one
process holds the study's lock, see study.py). It is marked failed, and Optuna's own retry callback
queues a WAITING copy with the same parameters, whose `retry_history` names it. Such a trial does
not count as finished: the study still ends with N trials that ran to their end, and one that
completed is never run again.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def _quiet() -> Iterator[None]:
    """Optuna flags the retry callback experimental (deprecated under its old name): not the
    user's business."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _callback_class() -> Any:
    import optuna

    # RetryFailedTrialCallback was renamed in Optuna 4.9
    return getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or (
        optuna.storages.RetryFailedTrialCallback
    )


def retry_history(trial: Any) -> list[int]:
    """The trials this one runs again, earliest first (empty for a trial that is not a retry)."""
    with _quiet():
        return _callback_class().retry_history(trial)


def retried(study: Any) -> set[int]:
    """The numbers of the trials that were cut short and queued again."""
    return {n for t in study.get_trials(deepcopy=False) for n in retry_history(t)}


def recover(study: Any) -> list[int]:
    """Fail the trials a killed tune left RUNNING and queue their parameters again; their numbers."""
    from optuna.trial import TrialState

    trials = study.get_trials()
    queued = {n for t in trials if t.state == TrialState.WAITING for n in retry_history(t)}
    with _quiet():
        retry = _callback_class()(max_retry=None)
    stale = [t for t in trials if t.state == TrialState.RUNNING]
    for t in stale:
        if t.number not in queued:  # a tune killed between these two steps has queued it already
            with _quiet():
                retry(study, t)
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    return [t.number for t in stale]


def finished(study: Any) -> int:
    """Trials that ran to an end: complete, pruned, or failed on their own (not killed with tune)."""
    from optuna.trial import TrialState

    cut = retried(study)
    ended = (TrialState.COMPLETE, TrialState.PRUNED)
    return sum(
        t.state in ended or (t.state == TrialState.FAIL and t.number not in cut)
        for t in study.get_trials(deepcopy=False)
    )
