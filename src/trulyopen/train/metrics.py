"""Training metrics: one JSON line per step in the run directory, and optionally TensorBoard or W&B.

`metrics.jsonl` is the record that stays with the run (and goes into a release); TensorBoard and
Weights & Biases are views of the same numbers for people who use them. Both are optional
dependencies, imported only when asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trulyopen.files import atomic_open


def keep_until(path: Path, step: int) -> None:
    """On resume, drop lines past the checkpoint's step: those steps will be run and written again."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    with atomic_open(path) as f:
        f.write("".join(ln + "\n" for ln in lines))


class MetricsLog:
    """Appends step records to metrics.jsonl and mirrors them to the sinks the recipe names."""

    def __init__(self, path: Path, sinks: list[str], run_name: str, config: dict[str, Any]):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.tensorboard = self.wandb = None
        if "tensorboard" in sinks:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("pretrain.log_to names tensorboard: pip install tensorboard") from None
            self.tensorboard = SummaryWriter(str(path.parent / "tensorboard"))
        if "wandb" in sinks:
            try:
                import wandb
            except ImportError:
                raise ImportError("pretrain.log_to names wandb: pip install wandb") from None
            self.wandb = wandb.init(project="trulyopen", name=run_name, config=config, dir=str(path.parent))

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, int | float)}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
