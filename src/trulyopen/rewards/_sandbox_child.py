"""The first program inside the sandbox: it locks the process down, then runs the untrusted code.

`sandbox.run_python` starts this file with a fresh `python -I` rather than configuring the child in a
`preexec_fn`: code run between fork and exec in a parent with threads (a GRPO trainer, `run_many`'s
pool) can deadlock, and `unshare(CLONE_NEWUSER)` refuses a process that has threads at all. A new
interpreter is single-threaded, so here both are safe.

It uses only the standard library and never imports trulyopen: the sandbox must not depend on the
package's import side effects. Run as `python -I _sandbox_child.py CONFIG_JSON`, or with `--probe`
to learn which namespaces this machine lets an unprivileged process create.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys

CLONE_NEWUSER = 0x10000000  # needs no privilege, and grants the right to make the others
CLONE_NEWNET = 0x40000000  # a network namespace with only a loopback device, and that one down
CLONE_NEWPID = 0x20000000  # a PID namespace: when its first process dies the kernel kills the rest

# tried in order: a PID namespace is a bonus (escapes from the process group die too), the network
# namespace is what we need
CANDIDATE_FLAGS = (CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID, CLONE_NEWUSER | CLONE_NEWNET)

GUARD_MESSAGE = "network is disabled in the sandbox"


def unshare(flags: int) -> None:
    """unshare(2); os.unshare only exists from Python 3.12, so fall back to libc through ctypes."""
    if hasattr(os, "unshare"):
        os.unshare(flags)
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def probe() -> int:
    """Print the first unshare flags that give a private network; 0 when none does."""
    for flags in CANDIDATE_FLAGS:
        try:
            unshare(flags)
        except OSError:
            continue
        # a fresh network namespace holds nothing but `lo`; anything else means we did not get one
        import socket

        names = [name for _, name in socket.if_nameindex()]
        print(flags if names == ["lo"] else 0)
        return 0
    print(0)
    return 0


def set_limit(which: int, value: int) -> None:
    """Lower a limit to value (soft and hard), never above the hard limit we inherited."""
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def apply_limits(config: dict) -> None:
    set_limit(resource.RLIMIT_AS, config["memory_mb"] << 20)
    # soft CPU limit sends SIGXCPU; the hard one a second later sends SIGKILL to whoever ignored it
    soft, _ = resource.getrlimit(resource.RLIMIT_CPU)
    cpu = config["cpu_s"]
    if soft == resource.RLIM_INFINITY or soft > cpu:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    set_limit(resource.RLIMIT_FSIZE, config["fsize_mb"] << 20)
    set_limit(resource.RLIMIT_CORE, 0)
    if config["nproc"]:
        # only set inside a user namespace, where the kernel counts the sandbox's own processes;
        # outside one it would count every process of this user on the machine
        set_limit(resource.RLIMIT_NPROC, config["nproc"])


def install_socket_guard() -> None:
    """Best-effort fallback without namespaces: refuse internet sockets and name lookups.

    Unix sockets stay allowed (asyncio and multiprocessing use socketpair). Determined code can get
    around this (ctypes, raw syscalls); the network namespace is the real barrier.
    """
    import _socket
    import socket

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(GUARD_MESSAGE)

    def guarded(base: type) -> type:
        class NoNetworkSocket(base):
            def __init__(self, family: int = -1, *args: object, **kwargs: object) -> None:
                if family != socket.AF_UNIX:
                    raise PermissionError(GUARD_MESSAGE)
                base.__init__(self, family, *args, **kwargs)

        return NoNetworkSocket

    # socket.socket.__init__ calls _socket.socket.__init__ by name, so guarding both covers the
    # classes already imported elsewhere (ssl subclasses socket.socket) as well as new ones
    _socket.socket = guarded(_socket.socket)
    socket.socket = guarded(socket.socket)
    for module in (socket, _socket):
        module.getaddrinfo = refuse
        if hasattr(module, "gethostbyname"):
            module.gethostbyname = refuse
    socket.create_connection = refuse


def mirror(status: int, cpu_used: float, cpu_limit: int) -> None:
    """Exit the way the sandboxed process did, so the parent sees its exit code or signal."""
    if os.WIFEXITED(status):
        os._exit(os.WEXITSTATUS(status))
    sig = os.WTERMSIG(status)
    # PID 1 of a namespace ignores SIGXCPU, so the CPU limit reaches it as the hard limit's SIGKILL;
    # report it as the CPU limit it was, not as the memory kill a bare SIGKILL suggests
    if sig == signal.SIGKILL and cpu_used >= cpu_limit:
        sig = signal.SIGXCPU
    if sig not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)


def run(config: dict) -> None:
    apply_limits(config)
    main = config["main"]
    flags = config["unshare_flags"]
    if not flags:
        install_socket_guard()
        import runpy

        # in this interpreter, not a new one: an exec would drop the guard
        sys.argv = [main]
        runpy.run_path(main, run_name="__main__")
        return
    unshare(flags)
    if not flags & CLONE_NEWPID:
        os.execv(sys.executable, [sys.executable, "-I", main])
    # a new PID namespace takes effect for children only: the code runs as its PID 1, and we stay
    # outside to pass its exit status on
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(sys.executable, [sys.executable, "-I", main])
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    mirror(status, usage.ru_utime + usage.ru_stime, config["cpu_s"])


if __name__ == "__main__":
    if sys.argv[1:] == ["--probe"]:
        sys.exit(probe())
    run(json.loads(sys.argv[1]))
