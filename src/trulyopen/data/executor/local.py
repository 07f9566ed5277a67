"""Local executor: the tasks in worker processes on this machine (in this process for one worker).

Workers are spawned, not forked, so they start clean even when the parent has threads. A worker
that dies (killed, out of memory) breaks the pool: the pool is made anew and the unfinished tasks
run again, up to MAX_RETRIES times for the same task, which is then named.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from trulyopen.data.executor import TaskFailed, TaskStep, run_task

MAX_RETRIES = 3


def _init() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers fill the cores
    # Ctrl-C reaches the whole process group: the parent alone handles it (and stops the workers),
    # so that no worker prints a KeyboardInterrupt traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class LocalExecutor:
    """One pool for all the steps of a stage (workers start once), made anew if a worker dies."""

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self.pool: ProcessPoolExecutor | None = None

    def run(self, step: TaskStep, todo: list[int]) -> Iterator[tuple[int, dict]]:
        if self.workers == 1 or len(todo) <= 1:
            for i in todo:
                yield i, run_task(step, i)
            return
        failures = dict.fromkeys(todo, 0)
        left = list(todo)
        while left:
            if self.pool is None:
                self.pool = ProcessPoolExecutor(self.workers, mp.get_context("spawn"), _init)
            running = {self.pool.submit(run_task, step, i): i for i in left}
            try:
                while running:
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in finished:
                        i = running.pop(future)
                        result = future.result()
                        left.remove(i)
                        yield i, result
            except BrokenProcessPool:
                self.close()
                for i in running.values():
                    failures[i] += 1
                    if failures[i] > MAX_RETRIES:
                        raise TaskFailed(
                            f"data {step.name}: task {i} ({_describe(step.tasks[i])}) lost its worker "
                            f"process {failures[i]} times (killed, or out of memory?)"
                        ) from None
            except KeyboardInterrupt:
                self.close(now=True)
                raise
            except BaseException:
                self.close()
                raise

    def close(self, now: bool = False) -> None:
        """Stop the workers: after their running tasks, or `now` (Ctrl-C: unfinished tasks are
        simply run again next time)."""
        if self.pool is not None:
            if now:
                for process in list(self.pool._processes.values()):  # no public way to stop them
                    process.terminate()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def _describe(task: dict) -> str:
    where = task.get("file") or (task.get("files") or ["?"])[0]
    return f"{where}" + (f" bytes {task['start']}-{task['stop']}" if task.get("stop") is not None else "")
