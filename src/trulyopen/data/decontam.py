"""Decontamination: drop training documents that share a word n-gram with an evaluation item.

The default n of 13 words follows GPT-3 and OLMo's practice. Evaluation sets are JSONL files (or
directories of them) with a text field; each set is named by its file, and the manifest records
how many training documents each set matched.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from trulyopen.data.ngrams import ngram_hashes, word_hashes
from trulyopen.data.sources import DataError


def eval_set_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        files.extend(sorted(p.rglob("*.jsonl")) if p.is_dir() else [p])
    return files


def load_eval_ngrams(files: list[Path], text_field: str, n: int) -> dict[str, np.ndarray]:
    """Sorted unique n-gram hashes of every evaluation set, keyed by the set's file path."""
    sets: dict[str, np.ndarray] = {}
    for path in files:
        grams = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: evaluation record is not valid JSON: {e.msg}") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: evaluation record has no text field '{text_field}'")
            grams.append(ngram_hashes(word_hashes(text), n))
        sets[str(path)] = np.unique(np.concatenate(grams)) if grams else np.empty(0, np.uint64)
    return sets


class Decontaminator:
    """Says which evaluation sets a training text overlaps with."""

    def __init__(self, eval_ngrams: dict[str, np.ndarray], n: int):
        self.eval_ngrams, self.n = eval_ngrams, n

    def matches(self, text: str) -> list[str]:
        if not self.eval_ngrams:
            return []
        grams = ngram_hashes(word_hashes(text), self.n)
        return [name for name, ref in self.eval_ngrams.items() if len(ref) and np.isin(grams, ref).any()]
