r"""Learning-rate schedules: linear warmup, then cosine decay or warmup-stable-decay (WSD).

    cosine: /‾‾‾‾‾‾‾‾\___      lr falls along a half cosine from the peak to min_lr after warmup
    wsd:    /‾‾‾‾‾‾‾‾‾‾‾\_     lr stays at the peak, then falls linearly over the last decay_fraction

A pure function of the step, so a resumed run needs nothing but the step to continue exactly.
"""

from __future__ import annotations

import math


def learning_rate(
    step: int, total: int, peak: float, warmup: int, schedule: str, min_ratio: float, decay_fraction: float
) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`."""
    floor = peak * min_ratio
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    if schedule == "cosine":
        progress = (step - warmup) / max(total - warmup, 1)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "wsd":
        decay_steps = max(int(total * decay_fraction), 1)
        start = total - decay_steps
        if step < start:
            return peak
        return peak - (peak - floor) * min((step - start + 1) / decay_steps, 1.0)
    raise ValueError(f"pretrain.schedule: unknown schedule {schedule!r} (cosine, wsd, constant)")
