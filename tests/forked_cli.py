"""`trulyopen` commands run in forks of one process that has already imported torch and transformers.

test_errors and test_faults run some 150 commands, and a fresh interpreter spends seconds of CPU
importing the same libraries before each command's own work starts. A fork of this process starts
with them imported; the rest is the command as `python -m trulyopen` runs it in a terminal:
`cli.main()` with its argv, its own working directory, session and process group, stdin, stdout
and stderr, and its exit code (negative: killed by that signal).

    test --request--> server (imports done once) --fork--> child: setsid, chdir, limits,
         <--pid, then exit code--                          fds 0/1/2, cli.main(), _exit

The server (`python tests/forked_cli.py [MODULE ...]`, the modules imported too) reads one JSON
request per line on stdin: {"argv", "cwd", "stdin", "output", "limit_fsize", "read_only_for_root",
"timeout"}; it answers {"pid"} once the child exists, then {"code", "out", "err"} once it ended.
With "output" (a FIFO's path) the child's stdout and stderr go there as they are written, and
"out" and "err" are empty. `Forks` is the test side.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# what every server imports before it forks; Forks(preload=...) adds modules (a test that interrupts
# commands at random moments keeps the stages' own imports in the commands, where users see them)
PRELOAD = ["torch", "transformers", "transformers.models.llama.modeling_llama", "trulyopen.cli"]


# ------------------------------------------------------------------------------ the server's side


def _child(req: dict, fin, fout, ferr) -> None:
    """In the fork: become the command's process, run it, and never return."""
    import atexit
    import types

    code = 1
    try:
        os.setsid()  # a session and process group of its own, as a terminal's foreground job
        os.chdir(req["cwd"])
        if req.get("output"):
            fout = ferr = open(req["output"], "wb")  # noqa: SIM115 (the process's own, until it ends)
        for fd, f in ((0, fin), (1, fout), (2, ferr)):
            os.dup2(f.fileno(), fd)
        # fresh streams: the server's hold its protocol's buffered lines
        unbuffered = 1 if os.environ.get("PYTHONUNBUFFERED") else -1
        sys.stdin = open(0, encoding="utf-8", closefd=False)
        sys.stdout = open(1, "w", unbuffered, encoding="utf-8", closefd=False)
        sys.stderr = open(2, "w", 1, encoding="utf-8", errors="backslashreplace", closefd=False)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if req.get("limit_fsize") is not None:
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (req["limit_fsize"], req["limit_fsize"]))
        if req.get("read_only_for_root") and os.geteuid() == 0:
            _drop_dac_override()
        # `python -m trulyopen` has a __main__ that spawned workers do not re-run; so has this one
        sys.modules["__main__"] = types.ModuleType("__main__")
        sys.argv = ["trulyopen", *req["argv"]]
        from trulyopen import cli

        cli.main()
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:  # sys.exit("message"): printed, exit 1, as the interpreter does
            print(e.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _drop_dac_override() -> None:
    """Root writes anywhere: clear the capabilities that let it ignore file permissions from this
    process's own sets (capset(2); no exec follows, so the bounding set alone would not do)."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint32) for n in ("effective", "permitted", "inheritable")]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    dac = (1 << 1) | (1 << 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    data[0].effective &= ~dac
    data[0].permitted &= ~dac
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _serve_one(req: dict, answer) -> None:
    with tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
        fin.write(req.get("stdin", "").encode())
        fin.seek(0)
        pid = os.fork()
        if pid == 0:
            _child(req, fin, fout, ferr)
        answer({"pid": pid})
        deadline = time.monotonic() + req.get("timeout", 300)
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.005)
        fout.seek(0)
        ferr.seek(0)
        answer(
            {
                "code": os.waitstatus_to_exitcode(status),
                "out": fout.read().decode(errors="replace"),
                "err": ferr.read().decode(errors="replace"),
            }
        )


def serve() -> None:
    # the protocol on its own descriptors; anything an import prints goes to stderr
    requests, answers = os.fdopen(os.dup(0), "r"), os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    import importlib

    for name in PRELOAD + sys.argv[1:]:
        importlib.import_module(name)

    def answer(obj: dict) -> None:
        answers.write(json.dumps(obj) + "\n")
        answers.flush()

    answer({"ready": True})
    for line in requests:
        _serve_one(json.loads(line), answer)


# ------------------------------------------------------------------------------- the test's side


class Command:
    """One command running in a fork: its pid, its output lines as they come (with `output`), and
    its exit code once it ended (`poll`, `wait`)."""

    def __init__(self, server: subprocess.Popen, release) -> None:
        self.server, self._release = server, release
        self.pid = json.loads(server.stdout.readline())["pid"]
        self.result: dict | None = None
        self._ended = threading.Thread(target=self._await_end, daemon=True)
        self._ended.start()

    def _await_end(self) -> None:
        self.result = json.loads(self.server.stdout.readline())
        self._release()

    def poll(self) -> int | None:
        return None if self.result is None else self.result["code"]

    def wait(self, timeout: float | None = None) -> dict:
        self._ended.join(timeout)
        if self.result is None:
            raise TimeoutError(f"pid {self.pid} still running after {timeout} s")
        return self.result


class Forks:
    """`n` servers (each runs one command at a time); `start` takes a free one, or waits for it."""

    def __init__(self, n: int, env: dict[str, str], preload: tuple[str, ...] = ()):
        self.idle: queue.Queue = queue.Queue()
        cmd = [sys.executable, __file__, *preload]
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
        self.servers = [subprocess.Popen(cmd, env=env, **pipes) for _ in range(n)]
        for server in self.servers:
            assert json.loads(server.stdout.readline()) == {"ready": True}, (
                "tests/forked_cli.py did not start"
            )
            self.idle.put(server)

    def start(self, argv: list[str], cwd: Path, output: Path | None = None, **options) -> Command:
        """Run `trulyopen ARGV` in `cwd`; options: stdin, limit_fsize, read_only_for_root, timeout."""
        server = self.idle.get()
        req = {"argv": [str(a) for a in argv], "cwd": str(cwd), "output": output and str(output), **options}
        server.stdin.write(json.dumps(req) + "\n")
        server.stdin.flush()
        return Command(server, lambda: self.idle.put(server))

    def run(self, argv: list[str], cwd: Path, **options) -> dict:
        """Run to the end: {"code", "out", "err"}."""
        return self.start(argv, cwd, **options).wait()

    def close(self) -> None:
        for server in self.servers:
            server.stdin.close()
            server.wait(timeout=30)


if __name__ == "__main__":
    serve()
