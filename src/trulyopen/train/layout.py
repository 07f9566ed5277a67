"""Where checkpoints lie, without torch: `checkpoints/<stage>/step_000050/`, whole once state.json is in
it. `train.checkpoint` reads and writes them; `trulyopen.locate` finds them before torch is imported."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

PREFIX = "step_"


@dataclass
class StagePaths:
    """Where a training stage of a run writes: checkpoints/<stage>/ and <stage>/ (metrics, its files)."""

    run_dir: Path
    stage: ClassVar[str] = ""

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints" / self.stage

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / self.stage

    @property
    def metrics(self) -> Path:
        return self.stage_dir / "metrics.jsonl"


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
