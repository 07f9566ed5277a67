"""Training: the deterministic loader, the loop, objectives, checkpoints, distributed setup."""

from trulyopen.errors import UserError


class TrainingError(UserError):
    """Training cannot go on (a NaN loss, say); the message names the step and the last checkpoint."""
