"""The first program inside the sandbox: it locks the process down, then runs the untrusted code.

`sandbox.run_python` starts this file with a fresh `python -I` rather than configuring the child in a
`preexec_fn`: code run between fork and exec in a parent with threads (a GRPO trainer, `run_many`'s
pool) can deadlock, and `unshare(CLONE_NEWUSER)` refuses a process that has threads at all. A new
interpreter is single-threaded, so here both are safe.

The layers, outermost first:

- resource limits (address space, CPU seconds, file size, no core dumps, processes in a user
  namespace);
- namespaces where the kernel allows them: a network namespace with no usable device, a PID
  namespace with a fresh /proc (other processes and their environments are invisible), and a mount
  namespace in which every mount is read-only except the run's working directory. These hold against
  anything the code does, ctypes and raw syscalls included, and they bind root too;
- an audit hook (PEP 578) in the interpreter that runs the code. It stops the process at the first
  attempt to write outside the working directory, open a network socket, start a process, signal
  another process or read another process's environment or memory, and leaves the reason in the
  report file, so the parent can fail the sample and say why. It is the only barrier where the
  namespaces are missing, and it is best effort: Python code determined to get around a hook in its
  own interpreter can. ctypes is not importable, which closes the easiest way round.

It uses only the standard library and never imports trulyopen: the sandbox must not depend on the
package's import side effects. Run as `python -I _sandbox_child.py CONFIG_JSON`, or with `--probe`
to learn which namespaces this machine lets a process create.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import signal
import sys

CLONE_NEWNS = 0x00020000  # a mount namespace: our own copy of the mount table, which we make read-only
CLONE_NEWUSER = 0x10000000  # needs no privilege, and grants the right to make the others
CLONE_NEWNET = 0x40000000  # a network namespace with only a loopback device, and that one down
CLONE_NEWPID = 0x20000000  # a PID namespace: when its first process dies the kernel kills the rest

# tried in order: the network namespace is what we need, read-only mounts and a PID namespace are
# layers on top where the kernel grants them
CANDIDATE_FLAGS = (
    CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS,
    CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID,
    CLONE_NEWUSER | CLONE_NEWNET,
)

# mount(2) flags, and the statvfs(3) flags a remount must keep (in a user namespace the kernel locks
# them); numbers rather than os.ST_*, which exist only on Linux, so that the parent imports this anywhere
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = (
    1024,
    2048,
    4096,
    16384,
    1 << 18,
    1 << 21,
)
# ST_NOSUID, ST_NODEV, ST_NOEXEC, ST_NOATIME, ST_NODIRATIME, ST_RELATIME -> the MS_ flag
_KEPT_MOUNT_FLAGS = {
    2: MS_NOSUID,
    4: MS_NODEV,
    8: MS_NOEXEC,
    1024: MS_NOATIME,
    2048: MS_NODIRATIME,
    4096: MS_RELATIME,
}

BLOCKED_EXIT = 125  # the exit status after the audit hook stopped the code (the report says why)


@functools.cache
def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _check(ctypes, result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def unshare(flags: int) -> None:
    """unshare(2); os.unshare only exists from Python 3.12, so fall back to libc through ctypes."""
    if hasattr(os, "unshare"):
        os.unshare(flags)
        return
    ctypes, libc = _libc()
    _check(ctypes, libc.unshare(flags))


def mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    ctypes, libc = _libc()
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    source_b, target_b, fstype_b = (None if s is None else os.fsencode(s) for s in (source, target, fstype))
    _check(ctypes, libc.mount(source_b, target_b, fstype_b, flags, None))


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo", "rb") as f:
        fields = [line.split()[4] for line in f]
    # mountinfo escapes space, tab, newline and backslash as octal
    return [os.fsdecode(field.decode("unicode_escape").encode("latin-1")) for field in fields]


def make_read_only(writable: str) -> None:
    """In a fresh mount namespace: every mount read-only except `writable` (bind-mounted onto itself).

    Changes stay in this namespace: we first make all mounts private, so nothing propagates back.
    """
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount(writable, writable, None, MS_BIND)
    os.chdir(writable)  # the old working directory is the one under the bind mount, soon read-only
    for point in _mount_points():
        if point == writable:
            continue
        try:
            kept = os.statvfs(point).f_flag
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY
            flags |= sum(ms for st, ms in _KEPT_MOUNT_FLAGS.items() if kept & st)
            mount(None, point, None, flags)
        except OSError:
            if point == "/":
                raise
            # a mount hidden under another, or one that vanished: the root and the audit hook remain


def mount_fresh_proc() -> None:
    """Inside the PID namespace: a /proc that shows only the sandbox's own processes."""
    try:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
    except OSError:
        pass  # some container runtimes refuse; the host's /proc stays, and the audit hook guards it


def probe() -> int:
    """Print the first unshare flags that give a private network (and read-only mounts); 0 if none."""
    import shutil
    import socket
    import tempfile

    scratch = tempfile.mkdtemp(prefix="trulyopen-sandbox-probe-")
    work = os.path.join(scratch, "work")
    os.mkdir(work)
    try:
        for flags in CANDIDATE_FLAGS:
            pid = os.fork()  # each try in a child: namespaces once entered cannot be left
            if pid == 0:
                code = 1
                try:
                    unshare(flags)
                    # a fresh network namespace holds nothing but `lo`; anything else means we did not get one
                    works = [name for _, name in socket.if_nameindex()] == ["lo"]
                    if works and flags & CLONE_NEWNS:
                        make_read_only(work)
                        works = _writable(work) and not _writable(scratch)
                    code = 0 if works else 1
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                print(flags)
                return 0
        print(0)
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _writable(directory: str) -> bool:
    try:
        with open(os.path.join(directory, "probe"), "w"):
            return True
    except OSError:
        return False


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
        # outside one it would count every process of this user on the machine (and root is exempt)
        set_limit(resource.RLIMIT_NPROC, config["nproc"])


# --- the audit hook ---------------------------------------------------------------------------------

# events that modify the file system: where in the event's arguments the paths are, and the dir_fd
# each is relative to (None: the current directory)
_WRITES = {
    "os.mkdir": ((0, 2),),
    "os.rmdir": ((0, 1),),
    "os.remove": ((0, 1),),
    "os.rename": ((0, 2), (1, 3)),
    "os.link": ((0, 2), (1, 3)),  # the source too: a hard link into the directory would let us write it
    "os.symlink": ((1, 2),),  # where a link points is checked when it is opened
    "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),),
    "os.utime": ((0, 3),),
    "os.truncate": ((0, None),),
    "os.chflags": ((0, None),),
    "os.lchflags": ((0, None),),
    "os.setxattr": ((0, None),),
    "os.removexattr": ((0, None),),
    "shutil.copyfile": ((1, None),),
    "shutil.copymode": ((1, None),),
    "shutil.copystat": ((1, None),),
    "shutil.copytree": ((1, None),),
    "shutil.rmtree": ((0, 1),),
    "shutil.move": ((0, None), (1, None)),
    "shutil.chown": ((0, None),),
}
_PROCESSES = {
    "os.fork",
    "os.forkpty",
    "os.posix_spawn",
    "os.exec",
    "os.spawn",
    "os.system",
    "subprocess.Popen",
}
_NAME_LOOKUPS = {
    "socket.getaddrinfo",
    "socket.gethostbyname",
    "socket.gethostbyname_ex",
    "socket.gethostbyaddr",
    "socket.getnameinfo",
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _private_to_a_process(path: str) -> bool:
    """/proc/PID/environ or /proc/PID/mem (or of a thread): another process's secrets and memory."""
    parts = path.split("/")
    shape = len(parts) == 4 or (len(parts) == 6 and parts[3] == "task")
    return shape and parts[1] == "proc" and parts[-1] in ("environ", "mem")


def install_audit_hook(work: str, report: int) -> None:
    """Stop the process at the first escape attempt; write "category: detail" to the report fd first.

    Stopping rather than raising: code that catches the error must not get to carry on as if it had
    merely failed to connect. Everything the hook uses is bound now, as default arguments, so code
    that later patches `os` or `socket` does not change what the hook sees.
    """
    import _posixsubprocess  # loaded now, so that importing it again is an event we can refuse
    import _socket
    import posix

    out, err = sys.stdout, sys.stderr

    def deny(category: str, detail: str, _write=os.write, _exit=os._exit) -> None:
        for stream in (out, err):
            try:
                stream.flush()  # keep what the code printed before it was stopped
            except Exception:
                pass
        text = f"{category}: {detail}"[:2000]
        try:
            _write(report, text.encode("utf-8", "replace"))
            _write(2, f"\nsandbox: blocked {text}\n".encode("utf-8", "replace"))
        finally:
            _exit(BLOCKED_EXIT)

    def resolve(path: object, dir_fd: object = None, _os=os, _realpath=os.path.realpath) -> str:
        """The absolute path with symlinks resolved, for a path, bytes, os.PathLike or file descriptor."""
        try:
            if isinstance(path, int):
                return _realpath(_os.readlink(f"/proc/self/fd/{path}"))
            path = _os.fsdecode(_os.fspath(path))
            if not path.startswith("/") and isinstance(dir_fd, int) and dir_fd >= 0:
                path = _os.path.join(_os.readlink(f"/proc/self/fd/{dir_fd}"), path)
            return _realpath(path)
        except (OSError, TypeError, ValueError):
            return "?"  # unresolvable: treated as outside

    def inside(path: str, _work=work + "/") -> bool:
        return path == _work[:-1] or path.startswith(_work)

    # besides the directory: /dev/null, and the run's stdout and stderr files (/dev/stdout leads there)
    allowed = frozenset(["/dev/null", resolve(1), resolve(2)])

    def check_write(event: str, path: object, dir_fd: object = None, _allowed=allowed) -> None:
        where = resolve(path, dir_fd)
        if not inside(where) and where not in _allowed:
            deny("file system", f"{event} {where}")

    def hook(
        event: str,
        args: tuple,
        _writes=_WRITES,
        _processes=_PROCESSES,
        _lookups=_NAME_LOOKUPS,
        _private=_private_to_a_process,
        _unix=_socket.AF_UNIX,
        _getpid=os.getpid,
        _getpgrp=os.getpgrp,
    ) -> None:
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return  # an already open descriptor: its access was checked when it was opened
            if (mode and any(c in mode for c in "wax+")) or (flags or 0) & _WRITE_FLAGS:
                check_write(event, path)
            elif _private(resolve(path)):
                deny("other processes", f"read {resolve(path)}")
        elif event in _writes:
            for path_at, dir_fd_at in _writes[event]:
                check_write(event, args[path_at], None if dir_fd_at is None else args[dir_fd_at])
        elif event == "sqlite3.connect":
            if args[0] not in (":memory:", "", b":memory:", b""):
                check_write(event, args[0])
        elif event in _processes:
            deny("process", event)
        elif event == "socket.__new__":
            if args[1] != _unix:
                deny("network", f"socket family {args[1]}")
        elif event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"):
            sock, address = args[0], args[-1]
            if sock.family != _unix:
                deny("network", f"{event} {address!r}")
            elif not isinstance(address, (str, bytes)) or address[:1] in ("\0", b"\0"):
                deny("network", f"{event} to an abstract unix socket")
            else:
                check_write(event, address)  # a unix socket outside: another program's door
        elif event in _lookups:
            deny("network", f"{event} {args[0]!r}")
        elif event in ("os.kill", "os.killpg"):
            pid = args[0]
            if pid != 0 and pid != (_getpid() if event == "os.kill" else _getpgrp()):
                deny("signal", f"{event} {pid}")
        elif event == "import":
            name = args[0]
            if name in ("ctypes", "_ctypes"):
                # not an escape: numpy and others import ctypes only if they can
                raise ImportError(f"{name} is not available in the sandbox")
            if name in ("_posixsubprocess", "posix"):
                deny("sandbox", f"loading {name} afresh, without the sandbox's guards")
        elif event.startswith("ctypes."):
            deny("ctypes", event)
        elif event == "object.__setattr__" and any(args[0] is f for f in guarded):
            deny("sandbox", f"changing the audit hook's {args[1]}")

    def no_fork_exec(*args: object) -> None:
        deny("process", "_posixsubprocess.fork_exec")

    # functions that write but raise no event (or one without the directory they write relative to)
    def open_at(
        path: object, flags: int, mode: int = 0o777, *, dir_fd: int | None = None, _open=os.open
    ) -> int:
        if dir_fd is not None and flags & _WRITE_FLAGS:
            check_write("os.open", path, dir_fd)
        return _open(path, flags, mode, dir_fd=dir_fd)

    def mkfifo(path: object, mode: int = 0o666, *, dir_fd: int | None = None, _mkfifo=os.mkfifo) -> None:
        check_write("os.mkfifo", path, dir_fd)
        return _mkfifo(path, mode, dir_fd=dir_fd)

    def mknod(
        path: object, mode: int = 0o600, device: int = 0, *, dir_fd: int | None = None, _mknod=os.mknod
    ) -> None:
        check_write("os.mknod", path, dir_fd)
        return _mknod(path, mode, device, dir_fd=dir_fd)

    # subprocess and multiprocessing start processes through fork_exec, which raises no event
    _posixsubprocess.fork_exec = no_fork_exec
    for module in (os, posix):
        module.open, module.mkfifo, module.mknod = open_at, mkfifo, mknod
    guarded = (hook, deny, resolve, inside, check_write, no_fork_exec, open_at, mkfifo, mknod)
    sys.addaudithook(hook)


# --- running the code -------------------------------------------------------------------------------


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


def execute(main: str, work: str, report: int, audit: bool) -> None:
    """Run the code in this interpreter (an exec would drop the hook), as `python main.py` would."""
    import types

    with open(main, "rb") as f:
        source = f.read()
    # what we imported to set up must not be handed to the code already loaded
    for name in [name for name in sys.modules if name == "ctypes" or name.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]
    module = types.ModuleType("__main__")
    module.__file__ = main
    sys.modules["__main__"] = module
    sys.argv = [main]
    if audit:
        install_audit_hook(work, report)
    try:
        # dont_inherit: our own `from __future__` imports must not change how the code compiles
        exec(compile(source, main, "exec", dont_inherit=True), module.__dict__)
    except SystemExit:
        raise
    except BaseException as e:
        # report it as Python would: the traceback starts here, so drop this function's frame
        e.with_traceback(e.__traceback__.tb_next if e.__traceback__ else None)
        sys.excepthook(type(e), e, e.__traceback__)
        sys.exit(1)


def run(config: dict) -> None:
    sys.dont_write_bytecode = True  # a .pyc written next to the standard library is a write outside
    work = os.getcwd()
    report = os.open(config["report"], os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    apply_limits(config)
    flags = config["unshare_flags"]
    if flags:
        unshare(flags)
    if flags & CLONE_NEWNS:
        make_read_only(work)
    if flags & CLONE_NEWPID:
        # a new PID namespace takes effect for children only: the code runs as its PID 1, and we
        # stay outside to pass its exit status on
        pid = os.fork()
        if pid:
            _, status, usage = os.wait4(pid, 0)
            mirror(status, usage.ru_utime + usage.ru_stime, config["cpu_s"])
        if flags & CLONE_NEWNS:
            mount_fresh_proc()
    execute(config["main"], work, report, config["audit"])


if __name__ == "__main__":
    if sys.argv[1:] == ["--probe"]:
        sys.exit(probe())
    run(json.loads(sys.argv[1]))
