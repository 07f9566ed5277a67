"""Ctrl-C in each stage: one line (no traceback from the process or its workers), exit 130, and the
same command run again finishes the run.

Ctrl-C in a terminal sends SIGINT to the whole foreground process group, workers included, so the
test runs `trulyopen` in a process group of its own and signals the group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from tests.test_faults import ENV, STAGES, command, ledger, tiny_recipe


def _started(run_dir: Path, stage: str, lines: list[str]) -> bool:
    """Whether the run has reached `stage`: the stage before it said it is done, or was skipped."""
    i = STAGES.index(stage)
    if i == 0:
        return (run_dir / "data" / "work").is_dir()  # the data stage's first act
    before = STAGES[i - 1]
    return any(line.startswith(f"{before}:") for line in lines) and before in {
        e["stage"] for e in ledger(run_dir)
    }


def test_ctrl_c_in_each_stage_is_one_line_and_the_rerun_finishes(tmp_path):
    recipe = tiny_recipe(tmp_path / "recipe.yaml")
    run_dir = tmp_path / "run"
    hit = []
    for target in STAGES:  # each run finishes what the last one left, then is stopped in the next stage
        proc = subprocess.Popen(
            command("release", recipe, run_dir),
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, as a terminal's foreground job
        )
        lines: list[str] = []
        reader = threading.Thread(target=lines.extend, args=(proc.stdout,), daemon=True)
        reader.start()
        t0 = time.time()
        deadline = t0 + 120
        while proc.poll() is None and not _started(run_dir, target, lines) and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before {target}: {proc.stderr.read()}"
        at = time.time() - t0
        os.killpg(proc.pid, signal.SIGINT)
        err = proc.stderr.read()
        proc.wait(timeout=120)
        reader.join(timeout=10)
        shown = (
            f"stage {target} at {at:.2f}s, exit {proc.returncode}\n{''.join(lines)[-1500:]}\n{err[-3000:]}"
        )
        # 130, or death by SIGINT (which a shell shows as 130 too): Python ends that way when a C
        # library saw the KeyboardInterrupt first, even though trulyopen handled it
        assert proc.returncode in (130, -signal.SIGINT), shown
        assert "Traceback" not in err + "".join(lines), shown
        said = [x for x in err.splitlines() if x.strip() and not x.startswith("warning: ")]
        assert len(said) == 1 and said[0].startswith("interrupted; finished work is kept"), shown
        if target not in {e["stage"] for e in ledger(run_dir)}:
            hit.append(target)  # it really stopped inside the stage
    assert hit == STAGES
    # the same command once more: it finishes the release alone, and the release verifies
    again = subprocess.run(command("release", recipe, run_dir), env=ENV, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(f"{s}: up to date, skipped" in again.stdout for s in STAGES[:-1]), again.stdout
    verified = subprocess.run(
        [*command("release", recipe, run_dir)[:3], "verify", str(run_dir / "release")],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0 and ", 0 problems" in verified.stdout, verified.stdout + verified.stderr
