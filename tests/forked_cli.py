"""Runs `trulyopen` commands in forks of one process that has already imported torch and transformers.

test_errors runs about a hundred commands, and a fresh interpreter spends seconds of CPU importing
the same libraries before each command's own work starts. A fork of this process starts with them
imported; the rest is the command as `python -m trulyopen` runs it: `cli.main()` with its argv, its
own working directory, stdin, stdout and stderr, and its exit code (negative: killed by a signal).

    parent (imports done once)  --fork-->  child: chdir, limits, fds 0/1/2 -> files, cli.main(), _exit

Protocol: one JSON request per line on stdin, {"argv", "cwd", "stdin", "limit_fsize",
"read_only_for_root", "timeout"}; one JSON answer per line on stdout, {"code", "out", "err"}.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time


def _child(req: dict, fin, fout, ferr) -> None:
    """In the fork: become the command's process, run it, and never return."""
    import atexit
    import types

    code = 1
    try:
        os.chdir(req["cwd"])
        for fd, f in ((0, fin), (1, fout), (2, ferr)):
            os.dup2(f.fileno(), fd)
        # fresh streams: the parent's hold its protocol's buffered lines
        sys.stdin = open(0, encoding="utf-8", closefd=False)
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
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


def run(req: dict) -> dict:
    with tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
        fin.write(req.get("stdin", "").encode())
        fin.seek(0)
        pid = os.fork()
        if pid == 0:
            _child(req, fin, fout, ferr)
        deadline = time.monotonic() + req.get("timeout", 300)
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.01)
        fout.seek(0)
        ferr.seek(0)
        return {
            "code": os.waitstatus_to_exitcode(status),
            "out": fout.read().decode(errors="replace"),
            "err": ferr.read().decode(errors="replace"),
        }


def main() -> None:
    # the protocol on its own descriptors; anything an import prints goes to stderr
    requests, answers = os.fdopen(os.dup(0), "r"), os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    from trulyopen import cli, pipeline  # noqa: F401
    from trulyopen.serve import launch  # noqa: F401

    answers.write("ready\n")
    answers.flush()
    for line in requests:
        answers.write(json.dumps(run(json.loads(line))) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
