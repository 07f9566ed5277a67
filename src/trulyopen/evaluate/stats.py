"""The numbers a result is reported with: mean, standard error, number of instances, pass@k."""

from __future__ import annotations

import math
from math import comb


def mean_and_stderr(values: list[float]) -> dict:
    """{value, stderr, n}: the standard error of the mean with the sample standard deviation, as
    lm-eval reports it (0 for fewer than two values)."""
    n = len(values)
    if n == 0:
        return {"value": float("nan"), "stderr": float("nan"), "n": 0}
    mean = sum(values) / n
    if n < 2:
        return {"value": mean, "stderr": 0.0, "n": n}
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return {"value": mean, "stderr": math.sqrt(var / n), "n": n}


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """The unbiased estimate of P(at least one of k samples passes) from `samples` with `correct`
    passing (Chen et al., 2021): 1 - C(n - c, k) / C(n, k)."""
    if samples - correct < k:
        return 1.0
    return 1.0 - comb(samples - correct, k) / comb(samples, k)
