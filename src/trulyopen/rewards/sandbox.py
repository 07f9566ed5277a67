"""Run untrusted Python (model completions) in a separate process with time, memory and network limits.

GRPO rewards and code-execution evaluation both run code a model wrote. That code may loop forever,
eat all memory, fork, write files or phone home, and it must do none of that to the trainer.

Each run gets a fresh `python -I` (no user site, no PYTHON* variables), an empty temporary working
directory that is deleted afterwards, and an environment with nothing inherited (no API keys). The
child starts in its own session so the parent can kill the whole process group when the wall-clock
limit passes. Inside, `_sandbox_child.py` sets resource limits (address space, CPU seconds, file
size, no core dumps, a process count), enters a user + network (+ PID, + mount) namespace where the
kernel allows one, and runs the code under an audit hook that stops it at the first attempt to write
outside its directory, use the network, start a process or signal or read into another one. Such an
attempt fails the sample with status "blocked" and says what was tried in `reason`.
`NETWORK_ISOLATION` and `FILESYSTEM_ISOLATION` say whether this machine got the kernel's barriers
("network namespace", "read-only mounts") or only the hook ("audit hook").

Not isolated: reading the file system. The code can read what the user running it can read (root
included); do not run the sandbox as a user who can read secrets.
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

from trulyopen.rewards._sandbox_child import CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWPID

_CHILD = Path(__file__).with_name("_sandbox_child.py")

FSIZE_MB = 16  # largest file (stdout included) the code may write
MAX_PROCESSES = 64  # per sandbox; enforced only in a user namespace, for users other than root
_MIN_MEMORY_MB = 32  # below this the interpreter itself cannot start
_AUDIT_HOOK = True  # tests turn it off to check that the kernel's barriers hold on their own

# only these reach the child: no tokens, no credentials, no proxy settings
_BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}

# the last lines of stderr when an allocation failed (Python, C, C++)
_MEMORY_HINT = re.compile(r"\bMemoryError\b|Cannot allocate memory|std::bad_alloc|[Oo]ut of memory")


@dataclass(frozen=True)
class SandboxResult:
    """What one run did.

    status: "ok", "error", "timeout" (wall clock or CPU), "memory" or "blocked" (an escape attempt
    the sandbox stopped). reason: why it failed, in words ("timeout after 5s", "memory limit",
    "blocked: network: socket.connect ('127.0.0.1', 80)", the last line of a traceback); "" if ok.
    """

    status: str
    returncode: int | None  # negative: killed by that signal
    stdout: str  # the first max_output characters
    stderr: str  # the last max_output characters: the end of a traceback says what went wrong
    seconds: float
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class _Isolation:
    unshare_flags: int  # 0: resource limits and the audit hook only

    @property
    def network(self) -> str:
        return "network namespace" if self.unshare_flags & CLONE_NEWNET else "audit hook"

    @property
    def filesystem(self) -> str:
        return "read-only mounts" if self.unshare_flags & CLONE_NEWNS else "audit hook"

    @property
    def pid_namespace(self) -> bool:
        return bool(self.unshare_flags & CLONE_NEWPID)


_GUARD = _Isolation(0)


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
    return _Isolation(flags)


def __getattr__(name: str) -> str:
    # computed on first use, so importing this module starts no process
    if name == "NETWORK_ISOLATION":
        return _isolation().network
    if name == "FILESYSTEM_ISOLATION":
        return _isolation().filesystem
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
        report = root / "blocked"  # the audit hook writes what it stopped here
        report.touch()
        config = {
            "main": str(main),
            "report": str(report),
            "audit": _AUDIT_HOOK,
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
        blocked = _read_head(report, 2000)
        if not finished:
            status, reason = "timeout", f"timeout after {timeout_s:g}s"
        else:
            status, reason = _classify(returncode, _read_tail(root / "stderr", 2000), blocked)
        return SandboxResult(status, returncode, stdout, stderr, seconds, reason)
    finally:
        _remove_tree(root)


def run_many(codes: list[str], *, workers: int = 2, **kw: object) -> list[SandboxResult]:
    """run_python over many programs, `workers` at a time; results in the order of codes."""
    if workers <= 1 or len(codes) <= 1:
        return [run_python(code, **kw) for code in codes]
    # threads are enough: each one only waits on its own child process
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda code: run_python(code, **kw), codes))


def run_lines(
    program: str,
    items: list,
    *,
    stdin_of=json.dumps,
    batch_size: int = 200,
    timeout_s: float = 20.0,
    line_chars: int = 400,
) -> list[dict]:
    """Run `program` over items, a batch per sandboxed process: it reads `stdin_of(batch)` and
    prints one JSON line per item, in order. When a process dies (a loop its own timer could not
    stop, memory, a blocked call), the lines it printed are kept, the item it died on gets
    {"ok": False, "why": <status>}, and the rest runs again: one bad item costs one retry."""
    results: list[dict] = []
    pending = list(items)
    while pending:
        batch = pending[:batch_size]
        run = run_python(
            program,
            timeout_s=timeout_s,
            stdin=stdin_of(batch),
            max_output=len(batch) * (line_chars + 100) + 1000,
        )
        done = []
        for line in [line for line in run.stdout.splitlines() if line.strip()][: len(batch)]:
            try:
                done.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by the process dying
        results.extend(done)
        if len(done) < len(batch):
            results.append({"ok": False, "why": run.status if run.status != "ok" else "crash"})
            pending = pending[len(done) + 1 :]
        else:
            pending = pending[len(batch) :]
    return results


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


def _classify(returncode: int, stderr_tail: str, blocked: str) -> tuple[str, str]:
    """(status, reason) of a run that ended before the wall clock ran out."""
    if blocked:
        # first: the hook stopped the code at the attempt, whatever its exit status says
        return "blocked", f"blocked: {blocked}"
    if returncode == -signal.SIGXCPU:
        return "timeout", "CPU time limit"
    if returncode == 0:
        return "ok", ""
    if _MEMORY_HINT.search(stderr_tail):
        return "memory", "memory limit"
    # we did not send it: SIGKILL comes from the kernel's OOM killer; under an address space limit,
    # SIGSEGV/SIGBUS/SIGABRT are what unchecked allocation failures in C code turn into
    if returncode in (-signal.SIGKILL, -signal.SIGSEGV, -signal.SIGBUS, -signal.SIGABRT):
        return "memory", "memory limit"
    lines = [line for line in stderr_tail.splitlines() if line.strip()]
    return "error", lines[-1].strip() if lines else f"exit status {returncode}"


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
