"""A release's code/requirements.txt reinstalls, in one command, the versions the release was made with.

The install test asks pip, in a fresh virtual environment, what `pip install -r code/requirements.txt`
would install (`--dry-run --report`), and checks that it is exactly the pinned versions plus
trulyopen from the bundled source: a full install would take minutes and prove no more about the
file. It needs the package index, so it is skipped only when PyPI cannot be reached.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from trulyopen.release import bundle
from trulyopen.release.requirements import dependency_closure, requirements_txt


def _pins(text: str) -> dict[str, str]:
    lines = [line for line in text.splitlines() if "==" in line and not line.startswith("#")]
    return {canonicalize_name(name): version for name, version in (line.split("==") for line in lines)}


def test_the_closure_is_the_runtime_dependencies_at_their_installed_versions() -> None:
    pins = dependency_closure()
    names = {canonicalize_name(name) for name in pins}
    # direct dependencies, theirs (transformers -> huggingface-hub), and extras (uvicorn[standard])
    assert {"torch", "transformers", "huggingface-hub", "uvicorn", "uvloop", "httptools"} <= names
    assert "trulyopen" not in names
    assert not names & {"pytest", "ruff", "selenium"}  # the dev extra is not what the release ran on
    assert all(metadata.version(name) == version for name, version in pins.items())


def test_the_file_pins_each_package_once_and_ends_with_the_bundled_source() -> None:
    text = requirements_txt({"torch": "2.13.0+cpu", "Jinja2": "3.1.6", "anyio": "4.0"})
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == ["anyio==4.0", "Jinja2==3.1.6", "torch==2.13.0+cpu", "./code"]
    assert "pip install -r code/requirements.txt" in text
    assert "download.pytorch.org/whl/cpu" in text  # says where a +cpu build comes from
    assert "download.pytorch.org" not in requirements_txt({"torch": "2.13.0"})


def test_the_bundle_writes_them_and_an_installable_pyproject(tmp_path: Path) -> None:
    bundle._code(tmp_path)
    text = (tmp_path / "code" / "requirements.txt").read_text()
    assert _pins(text) == {canonicalize_name(name): v for name, v in dependency_closure().items()}
    assert text.splitlines()[-1] == "./code"
    assert 'where = ["."]' in (tmp_path / "code" / "pyproject.toml").read_text()


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _pypi_reachable(), reason="PyPI is not reachable")
def test_pip_would_install_exactly_the_pinned_versions(tmp_path: Path) -> None:
    release = tmp_path / "release"
    bundle._code(release)
    pins = _pins((release / "code" / "requirements.txt").read_text())
    venv = tmp_path / "venv"
    # no pip in the fresh environment: this interpreter's pip works on it (--python), in seconds
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    report = tmp_path / "report.json"
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet"]
    done = subprocess.run(
        [*pip, "--dry-run", "--report", str(report), "-r", "code/requirements.txt"],
        cwd=release,  # where the file says to run it: ./code is relative to here
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]  # it resolves: no pin conflicts with another
    chosen = {
        canonicalize_name(item["metadata"]["name"]): item
        for item in json.loads(report.read_text())["install"]
    }
    ours = chosen.pop("trulyopen")
    assert ours["metadata"]["version"] == metadata.version("trulyopen")
    assert ours["download_info"]["url"] == (release / "code").as_uri()  # the bundled source
    assert {name: item["metadata"]["version"] for name, item in chosen.items()} == pins
