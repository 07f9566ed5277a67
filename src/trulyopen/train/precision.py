"""Precision and hardware: which dtype to compute in, the machine's peak for MFU, peak memory.

bf16 is the default wherever the hardware multiplies in bf16 (GPUs, CPUs with AMX or AVX-512 BF16);
elsewhere a bf16 matmul is emulated and far slower than fp32, so `auto` picks fp32 there.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX-512 BF16: without them a bf16 matmul on the CPU is much slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def choose_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, for MFU on known GPUs.
GPU_PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from): a data-sheet figure for known GPUs, otherwise the
    measured throughput of a large square matmul in the training precision."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak, f"{key} data sheet"
    n, best = 256, 0.0
    while n < 4096 and best < 0.05:  # grow the matmul until one takes long enough to time well
        n *= 2
        a = torch.ones(n, n, device=device, dtype=dtype)  # values do not change the time; no RNG used
        b = torch.ones(n, n, device=device, dtype=dtype)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best, f"measured {n}x{n} matmul"


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16 autocast", torch.float32: "fp32"}[dtype]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def autocast_for(device: torch.device, dtype: torch.dtype) -> Callable[[], AbstractContextManager]:
    """A factory of the context to run forward passes in: bf16 autocast, or nothing for fp32."""
    if dtype == torch.bfloat16:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext
