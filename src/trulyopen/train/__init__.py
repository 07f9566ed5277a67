"""Training: the deterministic loader, the loop, objectives, checkpoints, distributed setup."""
