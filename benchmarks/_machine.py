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


def run_row(script: str, name: str, params: dict, env: dict, capture: bool = False) -> dict:
    """One benchmark row in a fresh interpreter (`script --row NAME --row-params JSON --row-out F`),
    so that its peak memory is its own. The row's JSON result comes back with `_run`: its wall time,
    its CPU time, and the share of the machine's CPUs that other processes took meanwhile."""
    import json
    import resource
    import subprocess
    import sys
    import tempfile
    import time

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    try:
        cmd = [
            sys.executable,
            script,
            "--row",
            name,
            "--row-params",
            json.dumps(params),
            "--row-out",
            str(out),
        ]
        t0, busy0, r0 = time.perf_counter(), cpu_busy_s(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=capture, text=True)
        wall, busy = time.perf_counter() - t0, cpu_busy_s() - busy0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            detail = f":\n{proc.stderr[-3000:]}" if capture else ""
            raise RuntimeError(f"row {name} failed (exit {proc.returncode}){detail}")
        own = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        share = max(busy - own, 0.0) / (wall * (os.cpu_count() or 1))
        return {**json.loads(out.read_text()), "_run": {"wall_s": wall, "cpu_s": own, "others_share": share}}
    finally:
        out.unlink(missing_ok=True)
