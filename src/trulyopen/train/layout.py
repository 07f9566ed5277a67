"""Where checkpoints lie, without torch: `checkpoints/<stage>/step_000050/`, whole once state.json is in
it. `train.checkpoint` reads and writes them; `trulyopen.locate` finds them before torch is imported."""

from __future__ import annotations

from pathlib import Path

PREFIX = "step_"


def path_for(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:06d}"


def step_of(path: Path) -> int | None:
    """The step of a checkpoint directory's name, or None for anything else (e.g. a .tmp directory)."""
    tail = path.name[len(PREFIX) :]
    return int(tail) if path.name.startswith(PREFIX) and tail.isdigit() else None


def complete(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if step_of(p) is not None and (p / "state.json").exists()]
    return sorted(found, key=step_of)


def newest(root: Path) -> Path | None:
    found = complete(root)
    return found[-1] if found else None
