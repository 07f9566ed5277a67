"""Training: the deterministic loader, the loop, objectives, checkpoints, distributed setup."""


class TrainingError(Exception):
    """Training cannot go on (a NaN loss, say); the message names the step and the last checkpoint."""
