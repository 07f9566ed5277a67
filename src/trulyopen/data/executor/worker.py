"""Run one task of a step from its spec file: what a Slurm array element executes.

python -m trulyopen.data.executor.worker work/<step>/spec.json K    (runs task todo[K])
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from trulyopen.data.executor import TaskStep, run_task


def main(argv: list[str]) -> int:
    spec_file, k = Path(argv[0]), int(argv[1])
    step = TaskStep(**json.loads(spec_file.read_text()))
    todo = json.loads((spec_file.parent / "todo.json").read_text())
    run_task(step, todo[k])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
