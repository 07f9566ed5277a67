"""One trial: a run directory made by `python -m trulyopen <stage>` with the trial's overrides, watched
through the metrics file it writes, and stopped when Optuna says so.

    STUDY_DIR/shared/         the stages before the first tuned one, run once: a run dir of its own
          │ hard links to its files, and its ledger
          ▼
    STUDY_DIR/trial-0003/     `trulyopen pretrain RECIPE --run-dir … --set pretrain.lr=0.0012 …`
          │                   (the shared stages are up to date there, so only the tuned ones run)
          │ pretrain/metrics.jsonl, read as it grows
          ▼
    each validation value ─► trial.report(value, step) ─► should_prune? ─► SIGTERM, then SIGKILL

The child is a run like any other (its recipe.yaml, ledger, checkpoints), in its own process group
so that stopping it stops whatever it started; on Linux it also dies with the tune process (a
killed `tune` leaves no trial training on), and the study marks that trial failed and runs it again.

The shared stages' files are hard links, not symbolic ones: the pipeline records a file by its path
inside the run directory and finds it unchanged there, so those stages are skipped in every trial.
Every writer in trulyopen replaces a file (write, then rename) rather than changing it in place,
so a trial can never alter the shared copy.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trulyopen.files import write_bytes
from trulyopen.recipe import Recipe

STDERR_LINES = 20  # what a failed trial keeps of its stderr


def shared_stages(recipe: Recipe, tuned: list[str]) -> list[str]:
    """The recipe's stages that run before the first tuned stage: the same in every trial."""
    from trulyopen.pipeline import STAGES

    names = [s.name for s in STAGES]
    first = min(names.index(t) for t in tuned)
    return [s.name for s in STAGES[:first] if s.enabled(recipe)]


def run_shared(recipe: Recipe, shared_dir: Path, stages: list[str]) -> None:
    """Run (or find up to date) the shared stages once, in their own run directory."""
    from trulyopen import pipeline

    pipeline.run(recipe, shared_dir, until=stages[-1])


def link_shared(shared_dir: Path, run_dir: Path) -> None:
    """Give a new trial directory the shared stages' files (hard links; copies across file systems)
    and their ledger, so the pipeline finds those stages up to date there."""
    for src in sorted(shared_dir.rglob("*")):
        rel = src.relative_to(shared_dir)
        if not src.is_file() or rel.name in ("ledger.jsonl", "recipe.yaml") or ".tmp-" in rel.name:
            continue
        dst = run_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    write_bytes(run_dir / "ledger.jsonl", (shared_dir / "ledger.jsonl").read_bytes())


class MetricTail:
    """The complete lines appended to a metrics.jsonl since the last read."""

    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name
        self.offset = 0
        self.last_step = 0
        self.keys: set[str] = set()  # every key seen, to name them when `name` never comes

    def read(self) -> list[tuple[int, float]]:
        """(step, value) of each new line that holds the metric."""
        try:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size < self.offset:
                    self.offset = 0  # rewritten (a resumed stage drops the steps it will redo)
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
        self.offset += end
        found = []
        for line in data[:end].splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                continue
            self.keys.update(record)
            self.last_step = max(self.last_step, record["step"])
            value = record.get(self.name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                found.append((record["step"], float(value)))
        return found


@dataclass
class Outcome:
    state: str  # complete, pruned or failed
    value: float | None  # the last value reported (a pruned trial's: where it stopped)
    steps: int  # the last step in its metrics file
    seconds: float
    exit_code: int | None = None  # the child's (None: stopped by the pruner)
    error: str | None = None  # a failed trial's reason, in a line
    stderr: str | None = None  # a failed trial's last lines of stderr
    keys: set[str] = field(default_factory=set)  # the metric keys its stage wrote


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """In the child, before exec: ask Linux to send SIGTERM when the tune process dies (even by
    SIGKILL), so no orphaned trial trains on."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None).prctl  # looked up here: the child, between fork and exec, only calls

    def arm() -> None:
        prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before that took effect
            os._exit(1)

    return arm


def stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the child's process group; SIGKILL if it has not exited after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def run_trial(
    trial: Any,
    command: list[str],
    metrics: MetricTail,
    log_base: Path,
    poll: float = 0.2,
    grace: float = 10.0,
) -> Outcome:
    """Run `command`, reporting each new value of the metric to `trial` (an optuna Trial) with its
    step, and stop the child when the pruner says so. Its stdout and stderr go to LOG_BASE.out/.err."""
    t0 = time.perf_counter()
    log_base.parent.mkdir(parents=True, exist_ok=True)
    err_path = log_base.with_suffix(".err")
    with open(log_base.with_suffix(".out"), "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),
        )
    trial.set_user_attr("pid", proc.pid)
    last: float | None = None
    try:
        while True:
            exited = proc.poll() is not None  # asked first: once it has exited, its lines are all there
            for step, value in metrics.read():
                if not math.isfinite(value):
                    continue
                trial.report(value, step)
                last = value
                if not exited and trial.should_prune():
                    stop(proc, grace)
                    return Outcome("pruned", value, metrics.last_step, time.perf_counter() - t0)
            if exited:
                break
            time.sleep(poll)
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C) or failed here: the child goes too
            stop(proc, grace)
    seconds, code = time.perf_counter() - t0, proc.returncode
    stderr = _tail(err_path, STDERR_LINES)
    if code != 0:
        error = f"exit {code}: " + (stderr.splitlines()[-1] if stderr else "(nothing on stderr)")
    elif last is None:
        error = f"{metrics.path} holds no finite {metrics.name}"
    else:
        return Outcome("complete", last, metrics.last_step, seconds, code, keys=metrics.keys)
    return Outcome("failed", None, metrics.last_step, seconds, code, error, stderr, metrics.keys)
