"""Word n-gram hashing shared by near-duplicate detection and decontamination.

A document becomes an array of 64-bit word hashes; n-gram hashes are then computed for all
positions at once with numpy (a polynomial rolling combination followed by a bit mixer), instead
of hashing every n-gram string in Python. This is what makes our MinHash fast.

Words are runs of letters, digits and underscores, lower-cased: punctuation and whitespace do not
separate near duplicates.
"""

from __future__ import annotations

import re

import numpy as np
import xxhash

WORD = re.compile(r"\w+")
_MULT = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio constant: a good odd multiplier
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


class WordHasher:
    """Hashes words with xxh64, remembering each word it has seen (vocabularies repeat a lot)."""

    def __init__(self) -> None:
        self.cache: dict[str, int] = {}

    def __call__(self, text: str) -> np.ndarray:
        ws = words(text)
        cache = self.cache
        for w in set(ws).difference(cache):  # set operations and map() run at C speed
            cache[w] = xxhash.xxh64_intdigest(w.encode())
        return np.fromiter(map(cache.__getitem__, ws), dtype=np.uint64, count=len(ws))


def ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """64-bit hash of every run of `n` consecutive words (empty when the text has fewer words)."""
    count = len(word_hashes) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = word_hashes[:count].copy()
        for j in range(1, n):
            h = h * _MULT + word_hashes[j : j + count]
        # splitmix64 finaliser: spreads every input bit over the whole word
        h ^= h >> np.uint64(30)
        h *= _MIX1
        h ^= h >> np.uint64(27)
        h *= _MIX2
        h ^= h >> np.uint64(31)
    return h
