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


def time_op(fn, repeat: int) -> float:
    """The median wall time of `repeat` calls of fn, after one warm-up call."""
    import statistics
    import time

    fn()  # warm-up (allocations, oneDNN/MKL setup)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_matmuls(shapes: list[dict], dtype, repeat: int) -> tuple[list[dict], float, float]:
    """Each matmul of a training step alone, at its shape, on operands laid out as autograd has them:

        xWt   x[M, in] @ W[out, in]^T      (a Linear's forward: m=M, k=in, n=out)
        gW    g[M, out] @ W[out, in]       (its input's gradient)
        gtx   g[M, out]^T @ x[M, in]       (its weight's gradient: m=out, k=M, n=in)
        bmm   a[batch, m, k] @ b[batch, k, n]

    Returns (the shapes with their seconds and GFLOP/s, the FLOPs of all of them, their seconds),
    each shape counted `count` times. The caller calls reuse_freed_memory() first, as its loop does."""
    import torch

    torch.manual_seed(0)
    out, total_flops, total_s = [], 0.0, 0.0
    for s in shapes:
        m, k, n = s["m"], s["k"], s["n"]
        if s["kind"] == "bmm":
            a, b = torch.randn(s["batch"], m, k, dtype=dtype), torch.randn(s["batch"], k, n, dtype=dtype)
            flops, op = 2 * s["batch"] * m * k * n, torch.bmm
        else:
            if s["kind"] == "xWt":
                a, b = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype).t()
            elif s["kind"] == "gW":
                a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            else:
                a, b = torch.randn(k, m, dtype=dtype).t(), torch.randn(k, n, dtype=dtype)
            flops, op = 2 * m * k * n, torch.mm
        sec = time_op(lambda op=op, a=a, b=b: op(a, b), repeat)
        out.append({**s, "seconds": sec, "gflop_per_s": flops / sec / 1e9})
        total_flops += flops * s["count"]
        total_s += sec * s["count"]
        batch = f" x{s['batch']}" if s["kind"] == "bmm" else ""
        print(f"  {s['name']:<24} {m}x{k}x{n}{batch}  {flops / sec / 1e9:7.1f} GFLOP/s", flush=True)
    return out, total_flops, total_s
