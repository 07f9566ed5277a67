"""The sandbox: what model-written code tries is contained, and comes back as a failed sample with a
reason, never as a crash or a side effect in the parent.

Each escape runs under three setups where it makes sense: every layer (what production gets), the
audit hook alone (a machine without namespaces), and the kernel's barriers alone (the hook turned
off: what holds if code gets around the hook). With the hook the sample is "blocked" and says what
it tried; without it the attempt fails as an ordinary error, but still changes nothing outside.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import stat
import time
import uuid
from pathlib import Path

import pytest

from trulyopen.rewards import sandbox
from trulyopen.rewards.sandbox import SandboxResult, run_many, run_python
from trulyopen.rewards.verifiers import parse_verifier

# the limit tests use a short timeout; the margin covers interpreter starts on a busy machine
TIMEOUT = 1.0
MARGIN = 2.5

ALL_LAYERS, HOOK_ONLY, KERNEL_ONLY = "all layers", "hook only", "kernel only"


@pytest.fixture(params=[ALL_LAYERS, HOOK_ONLY, KERNEL_ONLY])
def layers(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == HOOK_ONLY:
        monkeypatch.setattr(sandbox, "_isolation", lambda: sandbox._GUARD)
    elif request.param == KERNEL_ONLY:
        if not sandbox._isolation().unshare_flags:
            pytest.skip("no namespaces on this machine: the audit hook is the only barrier")
        monkeypatch.setattr(sandbox, "_AUDIT_HOOK", False)
    return request.param


def assert_contained(result: SandboxResult, layers: str, category: str) -> None:
    """The sample failed, and said why: "blocked: <category>" where the hook ran, an error otherwise."""
    assert isinstance(result, SandboxResult)
    assert not result.ok, result
    if layers == KERNEL_ONLY:
        assert result.status == "error", result
    else:
        assert result.status == "blocked", result
        assert result.reason.startswith(f"blocked: {category}"), result.reason


def test_results_say_how_the_run_ended() -> None:
    ok = run_python("import sys\nprint(sys.stdin.read().upper())", stdin="hello")
    assert (ok.status, ok.returncode, ok.stdout, ok.ok, ok.reason) == ("ok", 0, "HELLO\n", True, "")
    failed = run_python("raise ValueError('boom')")
    assert failed.status == "error" and not failed.ok
    assert failed.reason == "ValueError: boom"
    # the traceback is the code's own, as `python main.py` prints it, with nothing of the sandbox
    assert failed.stderr.startswith("Traceback") and "_sandbox_child" not in failed.stderr
    assert run_python("x = (").reason.startswith("SyntaxError")
    assert run_python("import sys; sys.exit(3)").returncode == 3
    assert len(run_python("print('x' * 50_000)", max_output=100).stdout) == 100
    # the sandbox's own `from __future__ import annotations` does not leak into the code
    assert run_python("def f() -> int: ...\nprint(f.__annotations__)").stdout == "{'return': <class 'int'>}\n"


def test_isolation_is_reported() -> None:
    assert sandbox.NETWORK_ISOLATION in ("network namespace", "audit hook")
    assert sandbox.FILESYSTEM_ISOLATION in ("read-only mounts", "audit hook")


# --- (1) the network --------------------------------------------------------------------------------


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    # sanity: from the parent the port does accept connections
    socket.create_connection(server.getsockname(), timeout=2).close()
    server.accept()[0].close()
    yield server
    server.close()


def _assert_nobody_connected(server: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        server.accept()


NETWORK = {
    # the code catches the error and carries on: the attempt alone fails the sample
    "tcp-caught": (
        "import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "except OSError:\n    pass\nprint('carried on')"
    ),
    "tcp": "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
    "http": "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)",
    "udp": (
        "import socket\nudp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "udp.sendto(b'x', ('127.0.0.1', {port}))"
    ),
    "dns": "import socket\nsocket.getaddrinfo('example.com', 80)",
}


@pytest.mark.parametrize("program", NETWORK.values(), ids=NETWORK.keys())
def test_the_network_is_blocked(program: str, layers: str, listener: socket.socket) -> None:
    if layers == KERNEL_ONLY and sandbox.NETWORK_ISOLATION != "network namespace":
        pytest.skip("no network namespace on this machine")
    if layers == KERNEL_ONLY and program == NETWORK["tcp-caught"]:
        pytest.skip("without the hook, an error the code catches is its own business")
    result = run_python(program.format(port=listener.getsockname()[1]))
    assert_contained(result, layers, "network")
    assert "carried on" not in result.stdout
    _assert_nobody_connected(listener)


def test_local_sockets_still_work(layers: str) -> None:
    # asyncio's event loop wakes itself through a socketpair; sandboxed code may use asyncio
    result = run_python("import asyncio\nasyncio.run(asyncio.sleep(0))\nprint('asyncio ok')")
    assert result.ok, result
    assert result.stdout == "asyncio ok\n"


# --- (2) writing outside the working directory ------------------------------------------------------

WRITES = {
    "open": "open({target!r}, 'w').write('escaped')",
    "pathlib": "import pathlib\npathlib.Path({target!r}).write_text('escaped')",
    "os.open": "import os\nos.open({target!r}, os.O_WRONLY | os.O_CREAT)",
    # a link made inside the directory leads outside
    "symlink": "import os\nos.symlink({target!r}, 'link')\nopen('link', 'w').write('escaped')",
    "rename": "import os\nopen('made-here', 'w').write('escaped')\nos.rename('made-here', {target!r})",
    "copy": "import shutil\nopen('made-here', 'w').write('escaped')\nshutil.copy('made-here', {target!r})",
    "mkdir": "import os\nos.mkdir({target!r})",
    "mkfifo": "import os\nos.mkfifo({target!r})",
    "dir_fd": (
        "import os\nfd = os.open({parent!r}, os.O_RDONLY)\n"
        "os.mkdir({name!r}, dir_fd=fd)"  # relative to a directory outside
    ),
    "os.open-dir_fd": (
        "import os\nfd = os.open({parent!r}, os.O_RDONLY)\n"
        "os.open({name!r}, os.O_WRONLY | os.O_CREAT, dir_fd=fd)"
    ),
}


@pytest.mark.parametrize("program", WRITES.values(), ids=WRITES.keys())
def test_writing_outside_the_directory_is_blocked(
    program: str, layers: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if layers == KERNEL_ONLY and sandbox.FILESYSTEM_ISOLATION != "read-only mounts":
        pytest.skip("no mount namespace on this machine")
    monkeypatch.chdir(tmp_path)  # the parent's working directory: the place a careless write lands
    target = tmp_path / "escaped.txt"
    code = program.format(target=str(target), parent=str(tmp_path), name=target.name)
    result = run_python(code)
    assert_contained(result, layers, "file system")
    assert not target.exists() and not target.is_symlink()
    assert sorted(os.listdir(tmp_path)) == []


def test_changing_or_deleting_a_file_outside_is_blocked(layers: str, tmp_path: Path) -> None:
    if layers == KERNEL_ONLY and sandbox.FILESYSTEM_ISOLATION != "read-only mounts":
        pytest.skip("no mount namespace on this machine")
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    precious.chmod(0o644)
    changes = [
        "os.remove(PRECIOUS)",
        "os.chmod(PRECIOUS, 0o777)",
        "open(PRECIOUS, 'a').write('changed')",
        "os.link(PRECIOUS, 'here')\nopen('here', 'a').write('changed')",  # a hard link is no symlink
    ]
    for change in changes:
        result = run_python(f"import os\nPRECIOUS = {str(precious)!r}\n{change}")
        assert_contained(result, layers, "file system")
    assert precious.read_text() == "keep me"
    assert stat.S_IMODE(precious.stat().st_mode) == 0o644


def test_the_working_directory_is_fresh_writable_and_removed() -> None:
    code = (
        "import os, json, tempfile, shutil\n"
        "print(json.dumps([os.getcwd(), os.listdir('.')]))\n"
        "open('scratch.txt', 'w').write('left behind')\n"
        # a temporary directory (TMPDIR is the working directory) and its clean-up are fine
        "with tempfile.TemporaryDirectory() as d:\n"
        "    os.makedirs(os.path.join(d, 'a', 'b'))\n"
        "    open(os.path.join(d, 'a', 'b', 'c'), 'w').close()\n"
        "open('/dev/null', 'w').write('x')\n"
        "open('/dev/stderr', 'a').write('to stderr')\n"
    )
    first = run_python(code)
    second = run_python(code)
    assert first.ok and second.ok, (first, second)
    cwd, listing = json.loads(first.stdout)
    assert first.stderr == "to stderr"
    assert listing == []  # the first run's file is not there either
    assert cwd != os.getcwd() and cwd != json.loads(second.stdout)[0]
    assert not Path(cwd).exists()
    assert not Path(cwd).parent.exists()  # the program's file and outputs went with it


# --- (3) processes: fork bombs and children left behind ---------------------------------------------

BOMBS = {
    "os.fork": "import os\nwhile True:\n    os.fork()",
    "subprocess": "import subprocess, sys\nwhile True:\n    subprocess.Popen([sys.executable, '-c', 'pass'])",
    "os.system": "import os\nwhile True:\n    os.system('true')",
    "multiprocessing": (
        "import multiprocessing as mp\nif __name__ == '__main__':\n"
        "    while True:\n        mp.Process(target=print).start()"
    ),
    "posix_spawn": (
        "import os, sys\nwhile True:\n    os.posix_spawn(sys.executable, [sys.executable, '-V'], {{}})"
    ),
}


@pytest.mark.parametrize("bomb", BOMBS.values(), ids=BOMBS.keys())
@pytest.mark.parametrize("layers", [ALL_LAYERS, HOOK_ONLY], indirect=True)
def test_a_fork_bomb_is_stopped_at_the_first_process(bomb: str, layers: str) -> None:
    # never run unhooked: as root nothing else stops a fork bomb before the timeout (RLIMIT_NPROC
    # does not bind root), and the processes it makes meanwhile would be the machine's, not ours
    start = time.monotonic()
    result = run_python(bomb.format(), timeout_s=5)
    assert_contained(result, layers, "process")
    assert time.monotonic() - start < MARGIN  # stopped at once, not at the timeout
    assert run_python("print('still fine')").stdout == "still fine\n"


def _processes_with(marker: str) -> list[int]:
    """Pids of live processes whose command line contains marker (pid-namespace agnostic)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass  # exited while we looked
    return found


def _spawner(marker: str, then: str, setsid: bool = False) -> str:
    """A program that starts a child sleeping forever (marker in its command line), then does `then`."""
    child = f"import os, time\n{'os.setsid()' if setsid else ''}\ntime.sleep(1000)  # {marker}"
    spawn = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {child!r}])"
    return f"{spawn}\nimport time\n{then}\n"


def _gone(marker: str) -> bool:
    deadline = time.monotonic() + 1.0  # a killed process can take a moment to leave /proc
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _processes_with(marker)


@pytest.fixture
def unhooked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The audit hook off: the processes a program starts are what the kernel's layers must clean up."""
    monkeypatch.setattr(sandbox, "_AUDIT_HOOK", False)


@pytest.mark.parametrize(
    ("then", "status"),
    [("time.sleep(0.5)\nwhile True: pass", "timeout"), ("time.sleep(0.5)", "ok")],
    ids=["parent-times-out", "parent-exits"],
)
def test_children_do_not_outlive_the_run(then: str, status: str, unhooked: None) -> None:
    marker = f"sleeper-{uuid.uuid4().hex}"
    start = time.monotonic()
    result = run_python(_spawner(marker, then), timeout_s=TIMEOUT + 1)
    assert result.status == status, result
    # a leftover child holding stdout must not make us wait for the timeout either
    assert time.monotonic() - start < TIMEOUT + 1 + MARGIN
    assert _gone(marker)


@pytest.mark.skipif(not sandbox._isolation().pid_namespace, reason="no PID namespace on this machine")
def test_a_child_that_leaves_the_process_group_dies_with_the_pid_namespace(unhooked: None) -> None:
    marker = f"escaper-{uuid.uuid4().hex}"
    result = run_python(_spawner(marker, "time.sleep(0.5)", setsid=True), timeout_s=TIMEOUT + 1)
    assert result.ok, result
    assert _gone(marker)


def test_the_parent_cannot_be_signalled(layers: str) -> None:
    if layers == KERNEL_ONLY and not sandbox._isolation().pid_namespace:
        pytest.skip("without a PID namespace only the hook keeps the parent out of reach")
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append(1))
    try:
        result = run_python(f"import os, signal\nos.kill({os.getpid()}, signal.SIGUSR1)")
        time.sleep(0.1)  # a signal that got through would have arrived by now
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert_contained(result, layers, "signal")
    assert received == []


# --- (4) memory and (5) time ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bomb",
    ["x = bytearray(10**10)", "x = []\nwhile True:\n    x.append(' ' * 10**6)"],
    ids=["bytearray", "growing-list"],
)
def test_a_memory_bomb_is_stopped_without_harming_the_parent(bomb: str) -> None:
    limits_before = resource.getrlimit(resource.RLIMIT_AS)
    result = run_python(bomb, memory_mb=128, timeout_s=5)
    assert (result.status, result.reason) == ("memory", "memory limit"), result
    v = parse_verifier({"type": "python", "tests": "pass", "memory_mb": 128})
    assert v.score(bomb) == 0.0
    # the limit applied to the child only: the parent can still allocate freely
    assert resource.getrlimit(resource.RLIMIT_AS) == limits_before
    assert len(bytearray(256 << 20)) == 256 << 20


@pytest.mark.parametrize(
    "loop", ["while True: pass", "import time\nwhile True: time.sleep(1)"], ids=["busy", "idle"]
)
def test_an_infinite_loop_times_out(loop: str) -> None:
    start = time.monotonic()
    result = run_python(loop, timeout_s=TIMEOUT)
    assert (result.status, result.reason) == ("timeout", "timeout after 1s"), result
    assert time.monotonic() - start < TIMEOUT + MARGIN


def test_a_timeout_scores_zero() -> None:
    v = parse_verifier({"type": "python", "tests": "pass", "timeout_s": TIMEOUT})
    assert v.score("while True:\n    pass") == 0.0


# --- (6) the parent's environment -------------------------------------------------------------------


def test_the_parents_environment_is_not_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "secret-xyz")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    result = run_python("import os, json\nprint(json.dumps(dict(os.environ)))")
    env = json.loads(result.stdout)
    assert "OPENAI_API_KEY" not in env and "HF_TOKEN" not in env
    assert "secret-xyz" not in result.stdout
    assert set(env) <= {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR"}


@pytest.mark.parametrize("what", ["environ", "mem"])
def test_the_parents_process_cannot_be_read(what: str, layers: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # /proc/PID/environ is where the secret still is; as root the kernel would let anyone read it
    if layers == KERNEL_ONLY and not sandbox._isolation().pid_namespace:
        pytest.skip("without a PID namespace only the hook keeps the parent out of reach")
    monkeypatch.setenv("OPENAI_API_KEY", "secret-xyz")
    result = run_python(f"print(open('/proc/{os.getpid()}/{what}', 'rb').read(10**6))")
    assert_contained(result, layers, "other processes")
    assert "secret-xyz" not in result.stdout + result.stderr


def test_run_many_keeps_order() -> None:
    # the first program finishes last, yet its result comes first
    codes = ["import time; time.sleep(0.5); print(0)", "print(1)", "print(2)", "raise SystemExit(4)"]
    results = run_many(codes, workers=2, timeout_s=5)
    assert [r.stdout for r in results[:3]] == ["0\n", "1\n", "2\n"]
    assert results[3].returncode == 4
