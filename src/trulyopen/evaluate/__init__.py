"""Evaluation: bits per byte, multiple choice, generation tasks, contamination."""
