"""Progress for long steps: a live line on a terminal, a line every few seconds in a log.

Shows done/total, items/s (and documents/s when the items are tasks), MB/s and ETA. Written by
hand because it is twenty lines and must behave the same in a terminal, in CI logs and inside tests
(where it stays quiet unless asked).
"""

from __future__ import annotations

import os
import sys
import time


class Progress:
    def __init__(
        self,
        label: str,
        total: int | None,
        unit: str = "docs",
        interval: float | None = None,
        quiet: bool = False,
        docs: bool = False,
        already: int = 0,
    ):
        self.label, self.total, self.unit = label, total, unit
        self.tty = sys.stderr.isatty()
        self.quiet = quiet or os.environ.get("TRULYOPEN_QUIET") == "1"
        self.interval = interval if interval is not None else (0.2 if self.tty else 5.0)
        self.show_docs = docs  # items are tasks: also count the documents they held
        self.already = already  # done before this run (resumed); not in the rates
        self.done = already
        self.docs = 0
        self.nbytes = 0
        self.peak_rss_mb = 0.0  # the largest worker's peak memory, where the items report it
        self.note = ""  # anything else worth a glance (a study's best value so far)
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1, nbytes: int = 0, docs: int = 0) -> None:
        self.done += n
        self.nbytes += nbytes
        self.docs += docs
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            self._show(final=False)

    def _show(self, final: bool) -> None:
        if self.quiet:
            return
        dt = max(time.perf_counter() - self.start, 1e-9)
        rate = (self.done - self.already) / dt
        parts = [
            f"{self.label:<14}",
            f"{self.done:,}" + (f"/{self.total:,}" if self.total else ""),
            self.unit,
        ]
        parts.append(f"{rate:,.2f} {self.unit}/s" if rate < 10 else f"{rate:,.0f} {self.unit}/s")
        if self.show_docs and self.docs:
            parts.append(f"{self.docs / dt:,.0f} docs/s")
        if self.nbytes:
            parts.append(f"{self.nbytes / dt / 1e6:.1f} MB/s")
        if self.already:
            parts.append(f"({self.already:,} done before, resumed)")
        if self.peak_rss_mb:
            parts.append(f"peak {self.peak_rss_mb:,.0f} MB a worker")
        if self.note:
            parts.append(self.note)
        if final:
            parts.append(f"in {dt:.1f}s")
        elif self.total and rate > 0:
            parts.append(f"ETA {(self.total - self.done) / rate:.0f}s")
        line = "  ".join(parts)
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if final else "\x1b[K"))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        self._show(final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        elif self.tty and not self.quiet:
            sys.stderr.write("\n")
