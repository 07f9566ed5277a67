"""Precision and hardware: which dtype to compute in, the machine's peak for MFU, peak memory.

bf16 is the default wherever the hardware multiplies in bf16 (GPUs, CPUs with AMX or AVX-512 BF16);
elsewhere a bf16 matmul is emulated and far slower than fp32, so `auto` picks fp32 there.

Training in bf16 keeps fp32 master weights. The optimizer, clipping, checkpoints and validation see
the fp32 parameters; only a step's forward and backward passes compute with bf16 copies:

    step begins      bf16 copy <- fp32 master      (once per step, not once per layer call)
    micro-batches    forward and backward in bf16; each gradient, as it lands, is added to an fp32 sum
    step ends        parameters are the fp32 masters again, their .grad the fp32 sums
                     -> clipping, optimizer, checkpoint: all in fp32, so resuming stays bit-exact

Against autocast (fp32 weights, each matmul casting its weight and its input on every call) this
casts each weight once a step and keeps activations in bf16 between layers, which halves the memory
traffic of the elementwise work around the matmuls. `MasterWeights` does it for one process;
under torchrun the loop keeps autocast (the wrappers own the parameters and their gradients).

On a CPU, `reuse_freed_memory` keeps the memory a step frees inside the process for the next step:
glibc otherwise hands large blocks back to the kernel, and each step faults in fresh zeroed pages for
its activations again (about 120,000 page faults a step for the benchmark model, a third of its time).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
import time
from collections.abc import Callable, Iterator
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


@functools.cache  # measured once a process: about a second on a CPU, for every training run
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


def reuse_freed_memory() -> bool:
    """Keep freed memory in the process (glibc malloc): blocks up to 1 GiB come from the heap rather than
    their own mmap, and the heap is never trimmed, all threads sharing one arena. The process's resident
    size then stays at its peak, and a training step reuses the pages the last one faulted in. True
    where it applied (Linux with glibc); elsewhere nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, say)
        return False
    trim, mmap, arenas = -1, -3, -8  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX (malloc.h)
    big = libc.mallopt(mmap, 1 << 30) or libc.mallopt(mmap, 32 << 20)  # older glibc cap it at 32 MiB
    return bool(big and libc.mallopt(trim, 2**31 - 1) and libc.mallopt(arenas, 1))


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16 (fp32 master weights)", torch.float32: "fp32"}[dtype]


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


class MasterWeights:
    """bf16 weights for a step's forward and backward passes, fp32 masters at all other times.

    The parameters' own tensors stay the fp32 masters (what the optimizer, checkpoints and FSDP's
    or DDP's bookkeeping know); `computing()` swaps bf16 copies into them for the duration of the
    passes. Frozen parameters (a LoRA base) are cast once, trained ones at every step. Gradients
    arrive in bf16 and are summed in fp32 as they land, so accumulating many micro-batches loses
    nothing to bf16 rounding."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype
        self.params = [p for p in model.parameters() if p.dtype == torch.float32]
        self.copies: dict[torch.nn.Parameter, torch.Tensor] = {}
        self.sums: dict[torch.nn.Parameter, torch.Tensor] = {}
        self.active = False
        for p in self.params:
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._collect)

    def _collect(self, p: torch.nn.Parameter) -> None:
        if not self.active or p.grad is None:
            return
        total = self.sums.get(p)
        if total is None:
            self.sums[p] = p.grad.to(torch.float32)
        else:
            total.add_(p.grad)
        p.grad = None

    @contextlib.contextmanager
    def computing(self) -> Iterator[None]:
        masters = [p.data for p in self.params]
        with torch.no_grad():
            for p, master in zip(self.params, masters, strict=True):
                copy = self.copies.get(p)
                if copy is None:
                    copy = self.copies[p] = master.to(self.dtype)
                elif p.requires_grad:
                    copy.copy_(master)
                p.data = copy
        self.active = True
        try:
            yield
        finally:
            self.active = False
            for p, master in zip(self.params, masters, strict=True):
                p.data = master
                total = self.sums.pop(p, None)
                if total is not None:
                    p.grad = total if p.grad is None else p.grad + total
