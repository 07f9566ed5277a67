"""The run ledger: one JSON line per finished stage, the provenance record of a run.

Each entry says what a stage read and wrote (path, size, sha256 of every file), under which config
(a hash of the stage's resolved section of the recipe) and which code (package version, a hash of
the package's own source, and the git commit and dirty flag when run from a checkout), on which
machine, and when. The pipeline compares a stage's new inputs with its last entry to decide whether
the stage can be skipped, and `verify` (a later stage) re-checks every hash.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from trulyopen import __version__
from trulyopen.files import atomic_open, sha256_file

PACKAGE_DIR = Path(__file__).resolve().parent


def config_hash(*sections: BaseModel) -> str:
    """sha256 of recipe sections' canonical JSON: equal configs give equal hashes."""
    dumps = [s.model_dump(mode="json", exclude=set(getattr(s, "not_hashed", ()))) for s in sections]
    blob = json.dumps(dumps, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def file_record(path: Path | str, root: Path | None = None) -> dict[str, Any]:
    """{path, size, sha256} of a file; the path is relative to `root` when the file lies under it.
    An fsspec URL (a bucket's object) is read through fsspec and recorded by its URL."""
    if isinstance(path, str) and "://" in path:
        import fsspec

        h = hashlib.sha256()
        with fsspec.open(path, "rb") as f:
            size = 0
            while block := f.read(1 << 20):
                h.update(block)
                size += len(block)
        return {"path": path, "size": size, "sha256": h.hexdigest()}
    shown = path
    if root is not None:
        try:
            shown = path.resolve().relative_to(root.resolve())
        except ValueError:
            pass
    return {"path": str(shown), "size": path.stat().st_size, "sha256": sha256_file(path)}


def source_hash(package_dir: Path) -> str:
    """sha256 over a package's Python files (relative path and bytes, in sorted order)."""
    h = hashlib.sha256()
    for f in sorted(package_dir.rglob("*.py")):
        h.update(str(f.relative_to(package_dir)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


@functools.cache
def code_version() -> dict[str, Any]:
    """Which code ran: package version, source hash, and git commit / dirty flag from a checkout."""
    version: dict[str, Any] = {"package": __version__, "source_sha256": source_hash(PACKAGE_DIR)}
    repo = PACKAGE_DIR.parent.parent
    if (repo / ".git").exists():
        try:
            git = ["git", "-C", str(repo)]
            commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
            status = subprocess.run(
                [*git, "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            if commit.returncode == 0:
                version["git_commit"] = commit.stdout.strip()
                version["git_dirty"] = bool(status.stdout.strip())
        except (OSError, subprocess.TimeoutExpired):
            pass
    return version


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def machine_summary() -> dict[str, Any]:
    """CPU, cores, OS, Python, torch version and the accelerator, if any."""
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    device = "cpu"
    if torch_version is not None:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch_version,
        "device": device,
    }


class Ledger:
    """`ledger.jsonl` in a run directory. Appends rewrite the file atomically, so it is never torn."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "ledger.jsonl"

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [
            json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()
        ]

    def last(self, stage: str) -> dict[str, Any] | None:
        found = [e for e in self.entries() if e["stage"] == stage]
        return found[-1] if found else None

    def append(self, entry: dict[str, Any]) -> None:
        old = self.path.read_bytes() if self.path.exists() else b""
        with atomic_open(self.path, "wb") as f:
            f.write(old + json.dumps(entry, sort_keys=True, ensure_ascii=False).encode() + b"\n")
