"""`trulyopen tune`: hyperparameter search over whole runs, with Optuna.

    trulyopen tune RECIPE --space space.yaml --trials N [--study-dir DIR] [-o field=value ...]

space.py    the space file (dotted recipe fields and their ranges, the metric, sampler, pruner),
            checked against the recipe before anything runs
study.py    the study: TPE suggestions, N trials, resumable from STUDY_DIR/study.db
retry.py    trials cut short by a killed tune: failed, and queued again
trial.py    one trial: `python -m trulyopen <stage>` in STUDY_DIR/trial-NNNN, its metrics.jsonl
            tailed, each validation value reported, the child stopped when pruned
results.py  results.md/.csv, study.json, study.png and best.yaml
"""

from trulyopen.tune.space import SpaceError, load_space
from trulyopen.tune.study import StudyError, tune

__all__ = ["SpaceError", "StudyError", "load_space", "tune"]
