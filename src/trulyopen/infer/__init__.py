"""Inference: a key-value cache per request slot, sampling, and a continuously batching engine."""
