"""The editor setup in .vscode/: every verb that `trulyopen --help` lists has a debug configuration
in launch.json whose module and arguments really run (`python -m trulyopen VERB --help` exits 0,
the recipes it names exist, a picked stage is a real stage); pytest runs in one process (-n 0) so
that breakpoints hold; ruff formats on save; and git does not ignore the folder. VS Code reads JSON
with comments, but these files stay strict JSON so that this test reads them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
VSCODE = ROOT / ".vscode"

# `python -m trulyopen VERB --help` for each verb, in one process: runpy runs the package's
# __main__ as -m does (each exit is caught, so every verb is tried)
RUN_EACH = """
import json, runpy, sys
codes = {}
for verb in json.loads(sys.argv[1]):
    sys.argv = ["trulyopen", verb, "--help"]
    try:
        runpy.run_module("trulyopen", run_name="__main__", alter_sys=True)
        codes[verb] = 0
    except SystemExit as e:
        codes[verb] = e.code
print("CODES " + json.dumps(codes))
"""


def load(name: str) -> dict:
    return json.loads((VSCODE / name).read_text())


def listed_verbs() -> set[str]:
    """The verbs `trulyopen --help` lists: the app's commands, each found in the help's table."""
    import typer

    from trulyopen.cli import app

    verbs = {name for name, command in typer.main.get_command(app).commands.items() if not command.hidden}
    out = subprocess.run(
        [sys.executable, "-m", "trulyopen", "--help"], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert all(re.search(rf"^\W*{verb}\s", out.stdout, re.MULTILINE) for verb in verbs), out.stdout
    return verbs


def test_every_verb_has_a_debug_configuration_that_runs():
    from trulyopen.pipeline import STAGE_NAMES

    launch = load("launch.json")
    ours = [c for c in launch["configurations"] if c.get("module") == "trulyopen"]
    verbs = listed_verbs()
    assert len(verbs) >= 18, verbs  # the table was read
    assert verbs <= {c["args"][0] for c in ours}, (
        f"verbs without a configuration: {verbs - {c['args'][0] for c in ours}}"
    )
    inputs = {i["id"]: i for i in launch.get("inputs", [])}
    for c in ours:
        assert (c["type"], c["request"], c["justMyCode"]) == ("debugpy", "launch", False), c["name"]
        for arg in c["args"]:
            if arg.startswith("recipes/"):
                assert (ROOT / arg).is_file(), f"{c['name']}: {arg} is not there"
            for name in re.findall(r"\$\{input:(\w+)\}", arg):
                assert set(inputs[name]["options"]) <= set(STAGE_NAMES), inputs[name]
    used = sorted({c["args"][0] for c in ours})
    out = subprocess.run(
        [sys.executable, "-c", RUN_EACH, json.dumps(used)], capture_output=True, text=True, cwd=ROOT
    )
    codes = json.loads(out.stdout.split("CODES ", 1)[1])
    assert codes == dict.fromkeys(used, 0), codes


def test_pytest_runs_in_one_process_and_ruff_formats_on_save():
    tests = [c for c in load("launch.json")["configurations"] if c.get("module") == "pytest"]
    assert tests and all(c["args"][c["args"].index("-n") + 1] == "0" for c in tests)
    settings = load("settings.json")
    args = settings["python.testing.pytestArgs"]
    assert settings["python.testing.pytestEnabled"] and args[args.index("-n") + 1] == "0"
    python = settings["[python]"]
    assert python["editor.defaultFormatter"] == "charliermarsh.ruff" and python["editor.formatOnSave"]
    assert "charliermarsh.ruff" in load("extensions.json")["recommendations"]


def test_the_folder_is_not_ignored_by_git():
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    for name in ("launch.json", "settings.json", "extensions.json"):
        ignored = subprocess.run(["git", "check-ignore", "-q", f".vscode/{name}"], cwd=ROOT)
        assert ignored.returncode == 1, f".vscode/{name} is ignored by git"
