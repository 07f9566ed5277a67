"""Run untrusted Python (model completions) in a separate process with time, memory and network limits.

GRPO rewards and code-execution evaluation both run code a model wrote. That code may loop forever,
eat all memory, fork, write files or phone home, and it must do none of that to the trainer.

Each run gets a fresh `python -I` (no user site, no PYTHON* variables), an empty temporary working
directory that is deleted afterwards, and an environment with nothing inherited (no API keys). The
child starts in its own session so the parent can kill the whole process group when the wall-clock
limit passes. Inside, `_sandbox_child.py` sets resource limits (address space, CPU seconds, file
size, no core dumps, a process count) and cuts the network: with a new unprivileged user + network
(+ PID) namespace where the kernel allows one, else with a guard that makes Python's socket calls
raise. `NETWORK_ISOLATION` says which this machine got.

Not isolated: the file system. The code can read what the user running it can read; do not run the
sandbox as a user who can read secrets.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from trulyopen.rewards._sandbox_child import CLONE_NEWPID

_CHILD = Path(__file__).with_name("_sandbox_child.py")

FSIZE_MB = 16  # largest file (stdout included) the code may write
MAX_PROCESSES = 64  # per sandbox; enforced only in a user namespace, for users other than root
_MIN_MEMORY_MB = 32  # below this the interpreter itself cannot start

# only these reach the child: no tokens, no credentials, no proxy settings
_BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}

# the last lines of stderr when an allocation failed (Python, C, C++)
_MEMORY_HINT = re.compile(r"\bMemoryError\b|Cannot allocate memory|std::bad_alloc|[Oo]ut of memory")


@dataclass(frozen=True)
class SandboxResult:
    """What one run did. status: "ok", "error", "timeout" (wall clock or CPU) or "memory"."""

    status: str
    returncode: int | None  # negative: killed by that signal
    stdout: str  # the first max_output characters
    stderr: str  # the last max_output characters: the end of a traceback says what went wrong
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class _Isolation:
    name: str
    unshare_flags: int  # 0: socket guard

    @property
    def pid_namespace(self) -> bool:
        return bool(self.unshare_flags & CLONE_NEWPID)


_GUARD = _Isolation("socket guard", 0)


@functools.cache
def _isolation() -> _Isolation:
    """Ask a throwaway child which namespaces the kernel permits (once per process).

    Unprivileged user namespaces are often disabled (sysctls, AppArmor, seccomp in containers), so
    we test rather than assume.
    """
    try:
        out = subprocess.run(
            [sys.executable, "-I", str(_CHILD), "--probe"],
            env=_BASE_ENV,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        flags = int(out.strip() or 0)
    except (OSError, ValueError, subprocess.SubprocessError):
        flags = 0
    return _Isolation("network namespace", flags) if flags else _GUARD


def __getattr__(name: str) -> str:
    # NETWORK_ISOLATION is computed on first use, so importing this module starts no process
    if name == "NETWORK_ISOLATION":
        return _isolation().name
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_python(
    code: str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    stdin: str | None = None,
    max_output: int = 10_000,
) -> SandboxResult:
    """Run code as a fresh program in the sandbox and report how it ended (never raises for its faults)."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if memory_mb < _MIN_MEMORY_MB:
        raise ValueError(f"memory_mb must be at least {_MIN_MEMORY_MB}, got {memory_mb}")
    if max_output < 0:
        raise ValueError(f"max_output must be >= 0, got {max_output}")
    isolation = _isolation()
    # the program, its input and output live next to the working directory, not in it, so the code
    # starts in an empty directory
    root = Path(tempfile.mkdtemp(prefix="trulyopen-sandbox-"))
    try:
        work = root / "work"
        work.mkdir()
        main = root / "main.py"
        main.write_text(code, encoding="utf-8")
        (root / "stdin").write_text(stdin or "", encoding="utf-8")
        config = {
            "main": str(main),
            "memory_mb": memory_mb,
            "cpu_s": math.ceil(timeout_s) + 1,  # a backstop: the wall clock normally fires first
            "fsize_mb": FSIZE_MB,
            "nproc": MAX_PROCESSES if isolation.unshare_flags else 0,
            "unshare_flags": isolation.unshare_flags,
        }
        env = {**_BASE_ENV, "HOME": str(work), "TMPDIR": str(work)}
        # files, not pipes: a grandchild holding a pipe open would keep us reading after the program
        # ended, and the file size limit caps what a chatty program can make us hold
        with (
            open(root / "stdin", "rb") as fin,
            open(root / "stdout", "wb") as fout,
            open(root / "stderr", "wb") as ferr,
        ):
            start = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-I", str(_CHILD), json.dumps(config)],
                cwd=work,
                env=env,
                stdin=fin,
                stdout=fout,
                stderr=ferr,
                start_new_session=True,
            )
            try:
                finished = _wait_unreaped(proc.pid, timeout_s)
            finally:
                # kill the group even after a clean exit: children it left behind must not outlive it
                _kill_group(proc.pid)
                returncode = proc.wait()
            seconds = time.monotonic() - start
        stdout = _read_head(root / "stdout", max_output)
        stderr = _read_tail(root / "stderr", max_output)
        status = _classify(finished, returncode, _read_tail(root / "stderr", 2000))
        return SandboxResult(status, returncode, stdout, stderr, seconds)
    finally:
        _remove_tree(root)


def run_many(codes: list[str], *, workers: int = 2, **kw: object) -> list[SandboxResult]:
    """run_python over many programs, `workers` at a time; results in the order of codes."""
    if workers <= 1 or len(codes) <= 1:
        return [run_python(code, **kw) for code in codes]
    # threads are enough: each one only waits on its own child process
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda code: run_python(code, **kw), codes))


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
    """Wait for pid to exit, True if it did in time; leave it unreaped.

    While the leader is an unreaped zombie its pid cannot be reused, so killing its process group
    afterwards cannot hit an unrelated process.
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.0005
    while True:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.02)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _classify(finished: bool, returncode: int, stderr_tail: str) -> str:
    if not finished or returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode == 0:
        return "ok"
    if _MEMORY_HINT.search(stderr_tail):
        return "memory"
    # we did not send it: SIGKILL comes from the kernel's OOM killer; under an address space limit,
    # SIGSEGV/SIGBUS/SIGABRT are what unchecked allocation failures in C code turn into
    if returncode in (-signal.SIGKILL, -signal.SIGSEGV, -signal.SIGBUS, -signal.SIGABRT):
        return "memory"
    return "error"


def _read_head(path: Path, max_chars: int) -> str:
    if max_chars == 0:
        return ""
    with open(path, "rb") as f:
        data = f.read(4 * max_chars)  # a UTF-8 character is at most 4 bytes
    return data.decode("utf-8", errors="replace")[:max_chars]


def _read_tail(path: Path, max_chars: int) -> str:
    if max_chars == 0:
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 4 * max_chars))
        data = f.read()
    return data.decode("utf-8", errors="replace")[-max_chars:]


def _remove_tree(root: Path) -> None:
    """Delete the run's directory even if the code made parts of it unreadable or unwritable."""
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):  # chmod follows links: never touch what a link points to
                try:
                    os.chmod(path, 0o700)
                except OSError:
                    pass
    shutil.rmtree(root, ignore_errors=True)
