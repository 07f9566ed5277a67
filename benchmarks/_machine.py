"""What the benchmarks measure about the machine itself, shared by their scripts."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_busy_s() -> float:
    """CPU seconds used so far by every process on the machine (/proc/stat), or nan. A row's own
    CPU time subtracted from the change over the row is what other processes took meanwhile."""
    try:
        v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
