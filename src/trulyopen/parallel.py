"""Ordered parallel map over worker processes, the one way trulyopen spreads work over cores.

Results come back in input order whatever the number of workers, which is what makes every output
byte-identical with 1 or N workers. Workers are spawned (not forked), so they start clean even when
the parent has threads (tokenizers, torch), and each is set up once by `init(*initargs)`.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    init: Callable[..., None],
    initargs: tuple[Any, ...],
) -> Iterator[R]:
    """fn(item) for each item, in order; in this process when workers <= 1."""
    if workers <= 1:
        init(*initargs)
        yield from map(fn, items)
        return
    with mp.get_context("spawn").Pool(workers, _worker_init, (init, initargs)) as pool:
        yield from pool.imap(fn, items)


def _worker_init(init: Callable[..., None], initargs: tuple[Any, ...]) -> None:
    # Ctrl-C reaches the whole process group: the parent alone handles it (leaving the pool ends
    # the workers), so that no worker prints a KeyboardInterrupt traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    init(*initargs)
