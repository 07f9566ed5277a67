"""Ray executor: each task is a Ray Core task on `ray.init(address=...)`, or on a local Ray started
for the stage with one CPU per worker.

Tasks pass only paths and small JSON results, so the object store stays small; every task reads
and writes the run directory, which must be on a file system that every Ray node sees. Ray retries
a task whose worker died or which raised (`data.ray.max_retries`); a task that keeps failing is
named, with its error.
"""

from __future__ import annotations

import atexit
import socket
from collections.abc import Iterator

from trulyopen.data.executor import TaskFailed, TaskStep, require, run_task
from trulyopen.data.sources import DataError
from trulyopen.recipe import RayConfig, RecipeError


def _run_in_ray(step: TaskStep, i: int) -> dict:
    import os

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return run_task(step, i)


def _probe(address: str | None, timeout: float = 5.0) -> None:
    """Fail fast on an address nobody answers at (ray.init would retry for minutes)."""
    if not address or address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise RecipeError(
            f"data.ray.address: no Ray cluster answers at {address} ({e}); start one with `ray start --head` "
            "or unset data.ray.address to start a local Ray"
        ) from None


class RayExecutor:
    def __init__(self, cfg: RayConfig, workers: int):
        self.cfg, self.workers = cfg, max(1, workers)
        self.ray = require("ray", "ray", "data.executor: ray")
        self.started = False

    def _connect(self) -> None:
        ray = self.ray
        if ray.is_initialized():  # a cluster this process already joined (a notebook, the tests)
            return
        kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        _probe(self.cfg.address)
        try:
            if self.cfg.address:
                ray.init(address=self.cfg.address, **kwargs)
            else:
                ray.init(
                    num_cpus=self.workers, object_store_memory=self.cfg.object_store_mb * 2**20, **kwargs
                )
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
            where = self.cfg.address or "a local Ray"
            raise RecipeError(
                f"data.ray.address: could not connect to {where}: {str(e).splitlines()[0]}"
            ) from None
        self.started = True

    def run(self, step: TaskStep, todo: list[int]) -> Iterator[tuple[int, dict]]:
        if not todo:
            return
        self._connect()
        ray = self.ray
        remote = ray.remote(num_cpus=1, max_retries=self.cfg.max_retries, retry_exceptions=True)(_run_in_ray)
        pending = {remote.remote(step, i): i for i in todo}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    i = pending.pop(ref)
                    try:
                        yield i, ray.get(ref)
                    except ray.exceptions.RayTaskError as e:
                        if isinstance(e.cause, DataError | RecipeError):  # bad data: the same every time
                            raise e.cause from None
                        raise TaskFailed(
                            f"data {step.name}: task {i} failed {self.cfg.max_retries + 1} times on Ray: "
                            f"{type(e.cause).__name__}: {e.cause}"
                        ) from None
                    except ray.exceptions.RayError as e:
                        raise TaskFailed(f"data {step.name}: task {i} failed on Ray: {e}") from None
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def close(self) -> None:
        """A Ray this process started stays up for the next stage (data, then shards) and is shut
        down when the process ends: starting one takes seconds."""
        if self.started:
            atexit.register(self.ray.shutdown)
            self.started = False
