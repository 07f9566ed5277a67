"""Faults: Ctrl-C or `kill -9` during any stage, then run again, gives the bytes of a run never
interrupted.

For each stage, a real `trulyopen` process is stopped with Ctrl-C (SIGINT to its process group: one
line, exit status 130, no traceback from it or its workers), then killed with SIGKILL twice, at
seeded random moments while that stage runs, then run again to completion; the run directory must
then hold the same files as an uninterrupted reference run at the same point, with the same bytes,
apart from the timings (see "What of each file must repeat" below), and the stage's ledger entry
must record the same outputs.

The reference is built once, one CLI verb after another, with a copy of the run directory kept after
each: a stage's test starts from the copy made just before that stage and ends comparable with the
copy made just after it. Every run happens at the same path, because some outputs name their own
files (a finetune record says which file a skipped example came from, eval results name the model).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.forked_cli import Forks

QUICKSTART = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"
STAGES = ["data", "tokenizer", "shards", "pretrain", "synth", "finetune", "eval", "release"]

# The reference: CLI verbs in order, and the name of the copy of the run directory kept after
# each ("empty" is the one before any). `eval RECIPE` forces its stage and stops after it.
REFERENCE = [
    ("tokenizer", "tokenizer"),
    ("data", "shards"),
    ("pretrain", "pretrain"),
    ("synth", "synth"),
    ("finetune", "finetune"),
    ("eval", "eval"),
    ("release", "release"),
]
# stage -> (copy it starts from, verb that runs through it, copy it must end equal to). Each verb is
# the shortest that includes the stage (none stops after `data`). `eval RECIPE` forces its stage,
# which makes no difference to one that never resumes: it starts over after a kill either way.
PLAN = {
    "data": ("empty", "tokenizer", "tokenizer"),
    "tokenizer": ("empty", "tokenizer", "tokenizer"),
    "shards": ("tokenizer", "data", "shards"),
    "pretrain": ("shards", "pretrain", "pretrain"),
    "synth": ("pretrain", "synth", "synth"),
    "finetune": ("synth", "finetune", "finetune"),
    "eval": ("finetune", "eval", "eval"),
    "release": ("eval", "release", "release"),
}
KILLS = 2  # per stage; each run resumes from what the one before it left

# What of each file must repeat. Every file in the run directory is compared byte for byte (the
# release's cards and report show earlier stages' timings too, but those come from the copy the test
# started from, so they repeat), except:
UNTIMED = {"ledger.jsonl", "release/logs/ledger.jsonl"}  # start and end times, durations, the machine
METRICS = "*metrics.jsonl"  # one row per step: the losses repeat, the measured speeds do not
SPEEDS = {"tokens_per_s", "flops_per_s", "mfu", "peak_memory_mb"}
RESULTS = "*eval/*/results.json"  # the scores repeat, each task's seconds do not
SUMS = "release/SHA256SUMS"  # the sums of the files compared byte for byte; of the others, the names
# the project's history in the release: when each run started and ended, and the interruptions
# themselves (a killed attempt is part of the history), so only the names repeat
HISTORY = "release/decisions/*"

# One thread per process: the weights must not depend on how a matmul is split over threads, and
# the tests share two cores. Unbuffered, so that each line is read as soon as it is printed.
ENV = {**os.environ, "TRULYOPEN_QUIET": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def tiny_recipe(path: Path) -> Path:
    """The quickstart on two standard-library modules (they have docstrings for synth to turn into
    instructions), with a tiny model and a few steps of each stage."""
    recipe = yaml.safe_load(QUICKSTART.read_text())
    recipe.update(name="faults", workers=1)
    recipe["data"]["sources"][0]["include"] = ["json/*.py", "textwrap.py"]
    recipe["data"]["split"]["val_fraction"] = 0.2
    recipe["tokenizer"]["vocab_size"] = 400
    recipe["model"]["size"] = "tiny"  # small checkpoints: the run directory is copied a dozen times
    small = dict(max_steps=4, warmup_steps=1, eval_every=2, checkpoint_every=2)
    recipe["pretrain"].update(small, global_batch_tokens=1024, micro_batch_size=4)
    recipe["synth"]["max_per_kind"] = 40
    recipe["finetune"].update(small, batch_size=2, micro_batch_size=2)
    recipe["eval"]["builtin_items"] = 8
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def command(verb: str, recipe: Path, run_dir: Path) -> list[str]:
    return [verb, str(recipe), "--run-dir", str(run_dir)]


def run_to_end(forks: Forks, verb: str, recipe: Path, run_dir: Path) -> str:
    done = forks.run(command(verb, recipe, run_dir), Path.cwd(), timeout=600)
    assert done["code"] == 0, f"trulyopen {verb} failed:\n{done['out']}{done['err']}"
    return done["out"]


def ledger(run_dir: Path) -> list[dict]:
    path = run_dir / "ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def exact(rel: str) -> bool:
    """Whether a file (its path relative to the run directory) must repeat byte for byte."""
    return not (
        rel in UNTIMED or rel == SUMS or any(fnmatch.fnmatch(rel, p) for p in (METRICS, RESULTS, HISTORY))
    )


def repeatable(run_dir: Path, rel: str) -> str:
    """The part of a file that must be the same in every run: the sha256 of all of it, or what is
    left of it once the timings are taken out."""
    path = run_dir / rel
    if exact(rel):
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if rel in UNTIMED or fnmatch.fnmatch(rel, HISTORY):
        return ""
    text = path.read_text()
    if rel == SUMS:
        lines = [line.split("  ", 1) for line in text.splitlines()]
        return "\n".join(f"{s if exact(f'release/{name}') else ''}  {name}" for s, name in lines)
    if fnmatch.fnmatch(rel, METRICS):
        rows = [json.loads(line) for line in text.splitlines()]
        return json.dumps([{k: v for k, v in row.items() if k not in SPEEDS} for row in rows])
    results = json.loads(text)
    for task in results["tasks"].values():
        del task["seconds"]
    return json.dumps(results, sort_keys=True)


def tree(run_dir: Path) -> dict[str, str]:
    """Relative path -> the repeatable part of each file under the run directory."""
    rels = [p.relative_to(run_dir).as_posix() for p in sorted(run_dir.rglob("*")) if p.is_file()]
    return {rel: repeatable(run_dir, rel) for rel in rels}


def outputs(run_dir: Path, stage: str) -> dict[str, str]:
    """The stage's outputs as its ledger entry records them (sha256, or "" where timings vary)."""
    entry = [e for e in ledger(run_dir) if e["stage"] == stage][-1]
    return {o["path"]: (o["sha256"] if exact(o["path"]) else "") for o in entry["outputs"]}


def restore(copy: Path | None, run_dir: Path) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
    if copy is None:
        run_dir.mkdir()
    else:
        shutil.copytree(copy, run_dir, symlinks=True)


@pytest.fixture(scope="module")
def forks() -> Forks:
    """Each `trulyopen` command runs in a fork of a process that imported torch and transformers
    once (tests/forked_cli.py): a real process, in its own process group, that Ctrl-C and kill -9
    reach, without the seconds of imports that four dozen fresh interpreters would add."""
    servers = Forks(1, ENV)
    yield servers
    servers.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, forks: Forks) -> dict:
    """One uninterrupted run, verb by verb, with a copy of the run directory after each verb, and
    how long each stage took (run as the tests run it, so that the same imports are part of it)."""
    tmp = tmp_path_factory.mktemp("faults")
    recipe = tiny_recipe(tmp / "recipe.yaml")
    run_dir, copies = tmp / "run", {"empty": None}
    run_dir.mkdir()
    for verb, name in REFERENCE:
        run_to_end(forks, verb, recipe, run_dir)
        copies[name] = tmp / "copies" / name
        shutil.copytree(run_dir, copies[name], symlinks=True)
    seconds = {e["stage"]: e["seconds"] for e in ledger(run_dir) if e["stage"] in STAGES}
    return {"recipe": recipe, "run": run_dir, "copies": copies, "seconds": seconds, "forks": forks}


class Process:
    """A running `trulyopen` command whose output lines (stdout and stderr, through a FIFO) a thread
    collects as they come."""

    def __init__(self, forks: Forks, argv: list[str]):
        self.fifo = Path(tempfile.mkdtemp()) / "output"
        os.mkfifo(self.fifo)
        self.command = forks.start(argv, Path.cwd(), output=self.fifo, timeout=600)
        self.pid = self.command.pid
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with open(self.fifo, encoding="utf-8", errors="replace") as f:  # opens once the command has
            for line in f:
                self.lines.put(line.rstrip("\n"))
        shutil.rmtree(self.fifo.parent, ignore_errors=True)

    def printed(self, text: str) -> bool:
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return any(text in line for line in self.seen)

    def running(self) -> bool:
        return self.command.poll() is None

    def send(self, sig: int, group: bool = False) -> None:
        """Unless it has ended: its server reaps it at once (so the pid could be another's soon)."""
        if self.running():
            try:
                (os.killpg if group else os.kill)(self.pid, sig)
            except ProcessLookupError:  # it ended just now
                pass

    def kill(self) -> None:
        self.send(signal.SIGKILL)
        self.command.wait()

    def ctrl_c(self) -> int:
        """SIGINT to the whole group, workers included, as Ctrl-C in a terminal; the exit status."""
        self.send(signal.SIGINT, group=True)
        code = self.command.wait(timeout=120)["code"]
        self.reader.join(timeout=30)  # every line it printed, to the end of its output
        self.printed("")
        return code


class StageWatch:
    """Tells when a run reaches `stage` and whether it finished it. The stage starts once the one
    before it was skipped (it was in the copy the test started from) or got a new ledger entry; the
    first stage starts when the run has (re)written its recipe.yaml, the last thing it does before
    the stages. It has finished once it has a new ledger entry."""

    def __init__(self, stage: str, run_dir: Path):
        self.stage, self.run_dir = stage, run_dir
        self.before = STAGES[STAGES.index(stage) - 1] if stage != STAGES[0] else None
        self.recipe = _stat(run_dir / "recipe.yaml")
        self.ledger = _stat(run_dir / "ledger.jsonl")
        self.entries = self._count()

    def _count(self) -> dict[str, int]:
        return Counter(e["stage"] for e in ledger(self.run_dir))

    def started(self, proc: Process) -> bool:
        if self.before is None:
            return _stat(self.run_dir / "recipe.yaml") != self.recipe
        if proc.printed(f"{self.before}: up to date, skipped"):
            return True
        now = _stat(self.run_dir / "ledger.jsonl")
        if now == self.ledger:  # read the ledger only when it changed: the run needs the CPU more
            return False
        self.ledger = now
        return self._count()[self.before] > self.entries[self.before]

    def finished(self) -> bool:
        return self._count()[self.stage] > self.entries[self.stage]


def _stat(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is replaced (written atomically) or grows."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def ctrl_c_during(forks: Forks, stage: str, verb: str, recipe: Path, run_dir: Path, delay: float) -> bool:
    """As kill_during, with Ctrl-C: the run must stop with one line and exit status 130, no traceback
    from it or its workers."""
    watch = StageWatch(stage, run_dir)
    proc = Process(forks, command(verb, recipe, run_dir))
    _wait_for(watch, proc, verb)
    time.sleep(delay)
    if not proc.running():
        return False
    code = proc.ctrl_c()
    said = "\n".join(proc.seen)
    assert "Traceback" not in said, said
    # 130, or death by SIGINT (which a shell shows as 130 too): Python ends that way when a C library
    # saw the KeyboardInterrupt first, even though trulyopen handled it
    assert code in (0, 130, -signal.SIGINT), f"exit {code}:\n{said}"
    if watch.finished():  # it came after the stage's end, perhaps as the process was exiting
        return False
    assert code != 0, said
    last = [line for line in proc.seen if line.strip()][-1]
    assert last.startswith("interrupted; finished work is kept: rerun `trulyopen"), said
    return True


def _wait_for(watch: StageWatch, proc: Process, verb: str) -> None:
    deadline = time.monotonic() + 120
    while not watch.started(proc):
        if not proc.running():
            assert watch.started(proc), f"{verb} ended before {watch.stage} began:\n" + "\n".join(proc.seen)
            break
        assert time.monotonic() < deadline, f"{watch.stage} did not begin in two minutes"
        time.sleep(0.005)


def kill_during(forks: Forks, stage: str, verb: str, recipe: Path, run_dir: Path, delay: float) -> bool:
    """Start `verb`, wait until it reaches `stage`, and kill -9 it `delay` seconds later. Returns
    whether the kill landed while the stage was running (False: the stage had finished first)."""
    watch = StageWatch(stage, run_dir)
    proc = Process(forks, command(verb, recipe, run_dir))
    _wait_for(watch, proc, verb)
    time.sleep(delay)
    alive = proc.running()
    proc.kill()
    finished = watch.finished()
    assert alive or finished, f"{verb} failed during {stage}:\n" + "\n".join(proc.seen)
    return alive and not finished


@pytest.mark.parametrize("stage", STAGES)
def test_ctrl_c_or_kill_during_stage_then_rerun_gives_the_same_bytes(stage: str, reference: dict) -> None:
    start, verb, end = PLAN[stage]
    run_dir, recipe, forks = reference["run"], reference["recipe"], reference["forks"]
    rng = random.Random(f"faults/{stage}")
    seconds = reference["seconds"][stage]
    for _attempt in range(3):
        restore(reference["copies"][start], run_dir)
        # anywhere in the stage but its very end: a resumed stage has less left to do
        delays = [rng.uniform(0.05, 0.9) * seconds for _ in range(KILLS + 1)]
        # first Ctrl-C, then kill -9 several times: each resumes from what the last one left
        if ctrl_c_during(forks, stage, verb, recipe, run_dir, delays[0]) and all(
            kill_during(forks, stage, verb, recipe, run_dir, delay) for delay in delays[1:]
        ):
            break
        # a kill came after the stage had finished: this time the stage ran faster than in the
        # reference (a busy machine makes both vary), so start over aiming earlier
        seconds /= 2
    else:
        pytest.fail(f"no {KILLS} kills in a row landed while {stage} ran")
    run_to_end(forks, verb, recipe, run_dir)

    kills = f"interrupted, then killed, after {', '.join(f'{d:.3f}' for d in delays)} s of {stage}"
    expected = reference["copies"][end]
    assert [e["stage"] for e in ledger(run_dir)].count(stage) == 1, kills  # the killed runs recorded nothing
    assert outputs(run_dir, stage) == outputs(expected, stage), kills
    got, want = tree(run_dir), tree(expected)
    assert sorted(set(got) ^ set(want)) == [], kills  # nothing left over, nothing missing
    assert sorted(p for p in want if got[p] != want[p]) == [], kills
    if (run_dir / "release").is_dir():  # and the bundle's own sums check
        subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=run_dir / "release", check=True)


def dead_pid() -> int:
    """The id of a process that has ended."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


def test_a_run_removes_what_a_killed_one_was_writing(reference: dict) -> None:
    """A file a killed process was writing (NAME.tmp-PID) is removed by the next run before any
    stage lists or hashes it: here the release, which takes in every file of the run, stays up to
    date and bundles no half-written task file."""
    run_dir = reference["run"]
    restore(reference["copies"]["release"], run_dir)
    half = run_dir / "eval" / "tasks" / f"next_line.jsonl.tmp-{dead_pid()}"
    half.write_text('{"half": ')
    entries = len(ledger(run_dir))
    out = run_to_end(reference["forks"], "release", reference["recipe"], run_dir)
    assert not half.exists()
    assert "release: up to date, skipped" in out and len(ledger(run_dir)) == entries


def test_a_file_still_being_written_is_not_a_leftover(tmp_path: Path) -> None:
    from trulyopen.files import remove_leftovers

    dead = tmp_path / "a" / f"results.json.tmp-{dead_pid()}"
    alive = tmp_path / f"shard_00.bin.tmp-{os.getpid()}"  # a worker that outlived its parent, say
    dead.parent.mkdir()
    for p in (dead, alive, tmp_path / "notes.tmp-draft"):
        p.write_text("x")
    assert remove_leftovers(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        [alive.name, "notes.tmp-draft"]
    )
