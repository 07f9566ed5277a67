"""Verifiable rewards: each verifier type, malformed specs, and the sandbox's limits really holding."""

from __future__ import annotations

import json
import os
import resource
import socket
import time
import uuid
from pathlib import Path

import pytest

from trulyopen.rewards import sandbox
from trulyopen.rewards.sandbox import NETWORK_ISOLATION, SandboxResult, run_many, run_python
from trulyopen.rewards.verifiers import VerifierError, extract_code, parse_verifier, score_all

# the limit tests use a short timeout; the margin covers two interpreter starts on a busy machine
TIMEOUT = 1.0
MARGIN = 2.5


# --- verifiers --------------------------------------------------------------------------------------


def test_exact_strips_and_respects_case() -> None:
    v = parse_verifier({"type": "exact", "answer": "Paris"})
    assert v.kind == "exact"
    assert v.score("  Paris\n") == 1.0
    assert v.score("paris") == 0.0
    assert v.score("Paris, France") == 0.0
    assert parse_verifier({"type": "exact", "answer": "Paris", "case_sensitive": False}).score("PARIS") == 1.0
    assert parse_verifier({"type": "exact", "answer": "Paris", "strip": False}).score(" Paris") == 0.0


def test_regex_search_versus_fullmatch() -> None:
    search = parse_verifier({"type": "regex", "pattern": r"\d+"})
    full = parse_verifier({"type": "regex", "pattern": r"\d+", "fullmatch": True})
    assert search.score("the answer is 42") == 1.0
    assert full.score("the answer is 42") == 0.0
    assert full.score("42\n") == 1.0  # stripped first
    assert search.score("no digits here") == 0.0


def test_numeric_takes_the_last_number() -> None:
    v = parse_verifier({"type": "numeric", "answer": -1234.5})
    assert v.score("First 3 apples, then the total is -1,234.5.") == 1.0
    assert v.score("-1,234.5 at first, but finally 7") == 0.0
    assert v.score("no number at all") == 0.0
    assert parse_verifier({"type": "numeric", "answer": 1000}).score("about 1e3") == 1.0
    # relative tolerance for large numbers, absolute near zero
    big = parse_verifier({"type": "numeric", "answer": 1e9, "tolerance": 1e-6})
    assert big.score("1,000,000,500") == 1.0
    assert big.score("1,000,002,000") == 0.0
    assert parse_verifier({"type": "numeric", "answer": 0, "tolerance": 1e-3}).score("0.0005") == 1.0
    # an answer written as text, as GSM8K stores it
    assert parse_verifier({"type": "numeric", "answer": "1,234"}).score("so 1234") == 1.0


ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0"


def test_python_passes_and_fails_tests() -> None:
    v = parse_verifier({"type": "python", "tests": ADD_TESTS})
    assert v.kind == "python"
    assert v.score("def add(a, b):\n    return a + b\n") == 1.0
    assert v.score("def add(a, b):\n    return a - b\n") == 0.0
    assert v.score("def add(a, b) return a + b") == 0.0  # a syntax error


def test_python_takes_code_from_the_fenced_block() -> None:
    completion = (
        "Here is a shell command:\n```bash\nexit 1\n```\n"
        "And the function:\n```python\ndef add(a, b):\n    return a + b\n```\nIt adds."
    )
    assert extract_code(completion) == "def add(a, b):\n    return a + b\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```py\nx = 1") == "x = 1"  # cut off before the closing fence
    assert extract_code("x = 1") == "x = 1"
    assert parse_verifier({"type": "python", "tests": ADD_TESTS}).score(completion) == 1.0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([1, 2], "JSON object"),
        ({"answer": "1"}, "missing field 'type'"),
        ({"type": "llm-judge"}, "unknown verifier type 'llm-judge'"),
        ({"type": ["exact"]}, "unknown verifier type"),
        ({"type": "numeric", "answer": 10**400}, "'answer'"),
        ({"type": "exact"}, "missing field 'answer'"),
        ({"type": "exact", "answer": 42}, "'answer'"),
        ({"type": "exact", "answer": "4", "strip": "yes"}, "'strip'"),
        ({"type": "exact", "answer": "4", "case_sensitive": 1}, "'case_sensitive'"),
        ({"type": "regex"}, "missing field 'pattern'"),
        ({"type": "regex", "pattern": "(unclosed"}, "'pattern' is not a valid regular expression"),
        ({"type": "regex", "pattern": "a", "fullmatch": "no"}, "'fullmatch'"),
        ({"type": "numeric"}, "missing field 'answer'"),
        ({"type": "numeric", "answer": "forty-two"}, "'answer'"),
        ({"type": "numeric", "answer": True}, "'answer'"),
        ({"type": "numeric", "answer": 1, "tolerance": -1}, "'tolerance'"),
        ({"type": "numeric", "answer": 1, "tolerence": 0.1}, "unknown field(s) 'tolerence'"),
        ({"type": "python"}, "missing field 'tests'"),
        ({"type": "python", "tests": ["assert True"]}, "'tests'"),
        ({"type": "python", "tests": "  "}, "'tests'"),
        ({"type": "python", "tests": "pass", "timeout_s": 0}, "'timeout_s'"),
        ({"type": "python", "tests": "pass", "memory_mb": 1.5}, "'memory_mb'"),
    ],
)
def test_malformed_specs_are_errors_naming_the_problem(spec: object, message: str) -> None:
    with pytest.raises(VerifierError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_verifier(spec)


def test_score_all_keeps_order_across_types() -> None:
    exact = parse_verifier({"type": "exact", "answer": "4"})
    code = parse_verifier({"type": "python", "tests": ADD_TESTS})
    slow = parse_verifier({"type": "python", "tests": ADD_TESTS, "timeout_s": 3})
    right = "def add(a, b):\n    return a + b"
    wrong = "def add(a, b):\n    return 0"
    pairs = [(code, wrong), (exact, "4"), (code, right), (slow, right), (exact, "5"), (slow, wrong)]
    assert score_all(pairs, workers=2) == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


# --- sandbox limits ---------------------------------------------------------------------------------


def test_run_python_reports_output_and_exit_status() -> None:
    ok = run_python("import sys\nprint(sys.stdin.read().upper())", stdin="hello")
    assert isinstance(ok, SandboxResult)
    assert (ok.status, ok.returncode, ok.stdout, ok.ok) == ("ok", 0, "HELLO\n", True)
    failed = run_python("raise ValueError('boom')")
    assert failed.status == "error" and not failed.ok
    assert "ValueError: boom" in failed.stderr
    assert run_python("import sys; sys.exit(3)").returncode == 3
    assert len(run_python("print('x' * 50_000)", max_output=100).stdout) == 100


def test_an_infinite_loop_times_out() -> None:
    start = time.monotonic()
    result = run_python("while True: pass", timeout_s=TIMEOUT)
    assert result.status == "timeout" and not result.ok
    assert time.monotonic() - start < TIMEOUT + MARGIN
    v = parse_verifier({"type": "python", "tests": "pass", "timeout_s": TIMEOUT})
    assert v.score("while True:\n    pass") == 0.0


@pytest.mark.parametrize(
    "bomb",
    ["x = bytearray(10**10)", "x = []\nwhile True:\n    x.append(' ' * 10**6)"],
    ids=["bytearray", "growing-list"],
)
def test_a_memory_bomb_is_stopped_without_harming_the_parent(bomb: str) -> None:
    limits_before = resource.getrlimit(resource.RLIMIT_AS)
    result = run_python(bomb, memory_mb=128, timeout_s=5)
    assert result.status == "memory", result
    v = parse_verifier({"type": "python", "tests": "pass", "memory_mb": 128})
    assert v.score(bomb) == 0.0
    # the limit applied to the child only: the parent can still allocate freely
    assert resource.getrlimit(resource.RLIMIT_AS) == limits_before
    assert len(bytearray(256 << 20)) == 256 << 20


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


@pytest.mark.parametrize(
    ("then", "status"),
    [("time.sleep(0.5)\nwhile True: pass", "timeout"), ("time.sleep(0.5)", "ok")],
    ids=["parent-times-out", "parent-exits"],
)
def test_children_do_not_outlive_the_run(then: str, status: str) -> None:
    marker = f"sleeper-{uuid.uuid4().hex}"
    start = time.monotonic()
    result = run_python(_spawner(marker, then), timeout_s=TIMEOUT + 1)
    assert result.status == status, result
    # a leftover child holding stdout must not make us wait for the timeout either
    assert time.monotonic() - start < TIMEOUT + 1 + MARGIN
    assert _gone(marker)


@pytest.mark.skipif(not sandbox._isolation().pid_namespace, reason="no PID namespace on this machine")
def test_a_child_that_leaves_the_process_group_dies_with_the_pid_namespace() -> None:
    marker = f"escaper-{uuid.uuid4().hex}"
    result = run_python(_spawner(marker, "time.sleep(0.5)", setsid=True), timeout_s=TIMEOUT + 1)
    assert result.ok, result
    assert _gone(marker)


CONNECT = """
import socket, sys
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
    print("CONNECTED")
except OSError as e:
    print("BLOCKED", type(e).__name__, e)
"""


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    yield server
    server.close()


def _assert_nobody_connected(server: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        server.accept()


def test_the_network_is_unreachable(listener: socket.socket) -> None:
    # sanity: from the parent the port does accept connections
    socket.create_connection(listener.getsockname(), timeout=2).close()
    listener.accept()[0].close()

    result = run_python(CONNECT.format(port=listener.getsockname()[1]))
    assert NETWORK_ISOLATION in ("network namespace", "socket guard")
    assert result.ok, result
    assert result.stdout.startswith("BLOCKED"), result.stdout
    _assert_nobody_connected(listener)


def test_the_socket_guard_blocks_the_network_but_not_local_sockets(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # force the fallback used on machines without unprivileged namespaces
    monkeypatch.setattr(sandbox, "_isolation", lambda: sandbox._GUARD)
    code = CONNECT.format(port=listener.getsockname()[1]) + (
        "import asyncio\nasyncio.run(asyncio.sleep(0))\nprint('asyncio ok')\n"  # needs a socketpair
        "try:\n    socket.getaddrinfo('example.com', 80)\nexcept PermissionError as e:\n    print(e)\n"
    )
    result = run_python(code)
    assert result.ok, result
    assert result.stdout.splitlines() == [
        "BLOCKED PermissionError network is disabled in the sandbox",
        "asyncio ok",
        "network is disabled in the sandbox",
    ]
    _assert_nobody_connected(listener)


def test_secrets_in_the_environment_are_not_inherited(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-a-real-key")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    result = run_python("import os, json\nprint(json.dumps(dict(os.environ)))")
    env = json.loads(result.stdout)
    assert "OPENAI_API_KEY" not in env and "HF_TOKEN" not in env
    assert "sk-not-a-real-key" not in result.stdout
    assert set(env) <= {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR"}


def test_the_working_directory_is_fresh_and_removed() -> None:
    code = (
        "import os, json\nprint(json.dumps([os.getcwd(), os.listdir('.')]))\n"
        "open('scratch.txt', 'w').write('left behind')"
    )
    first = run_python(code)
    second = run_python(code)
    cwd, listing = json.loads(first.stdout)
    assert listing == []  # the first run's file is not there either
    assert cwd != os.getcwd() and cwd != json.loads(second.stdout)[0]
    assert not Path(cwd).exists()
    assert not Path(cwd).parent.exists()  # the program's file and outputs went with it


def test_run_many_keeps_order() -> None:
    # the first program finishes last, yet its result comes first
    codes = ["import time; time.sleep(0.5); print(0)", "print(1)", "print(2)", "raise SystemExit(4)"]
    results = run_many(codes, workers=2, timeout_s=5)
    assert [r.stdout for r in results[:3]] == ["0\n", "1\n", "2\n"]
    assert results[3].returncode == 4
