"""Word n-gram hashing shared by near-duplicate detection and decontamination.

A text becomes an array of 64-bit word hashes, and n-gram hashes are computed for all positions at
once; nothing loops over words in Python. Words are runs of ASCII letters, digits and underscores
or of non-ASCII characters, in the lower-cased UTF-8 bytes: punctuation and whitespace do not
separate near duplicates.

Each word's hash is a polynomial hash of its bytes, taken from prefix sums over the whole text:

    S[i] = sum_{k<i} byte[k] * P^k            (mod 2^64)
    hash(word at [s, e)) = (S[e] - S[s]) * P^-s   (P is odd, so P^-s exists mod 2^64)

and a splitmix64 finaliser spreads the bits. The same word gives the same hash wherever it stands.
"""

from __future__ import annotations

import numpy as np

_P = 0x100000001B3  # FNV prime: odd, so invertible modulo 2^64
_P_INV = pow(_P, -1, 2**64)
_MULT = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio constant: a good odd multiplier
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)

WORD_BYTE = np.zeros(256, dtype=bool)
for _lo, _hi in ((ord("0"), ord("9")), (ord("a"), ord("z")), (ord("A"), ord("Z")), (128, 255)):
    WORD_BYTE[_lo : _hi + 1] = True
WORD_BYTE[ord("_")] = True

_powers = np.ones(1, dtype=np.uint64)
_inverse_powers = np.ones(1, dtype=np.uint64)


def _power_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P^k and P^-k mod 2^64 for k < n, grown (doubling) and kept between calls."""
    global _powers, _inverse_powers
    if len(_powers) < n:
        size = max(n, 2 * len(_powers))
        _powers, _inverse_powers = (np.full(size, base, dtype=np.uint64) for base in (_P, _P_INV))
        _powers[0] = _inverse_powers[0] = 1
        with np.errstate(over="ignore"):
            np.cumprod(_powers, out=_powers)
            np.cumprod(_inverse_powers, out=_inverse_powers)
    return _powers, _inverse_powers


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: every input bit affects every output bit."""
    h = h ^ (h >> np.uint64(30))
    h *= _MIX1
    h ^= h >> np.uint64(27)
    h *= _MIX2
    h ^= h >> np.uint64(31)
    return h


def word_hashes(text: str) -> np.ndarray:
    """64-bit hash of every word of `text`, in order."""
    data = np.frombuffer(text.lower().encode("utf-8"), dtype=np.uint8)
    if not len(data):
        return np.empty(0, dtype=np.uint64)
    edges = np.diff(WORD_BYTE[data].astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    powers, inverse = _power_tables(len(data))
    with np.errstate(over="ignore"):
        prefix = np.zeros(len(data) + 1, dtype=np.uint64)
        np.cumsum(data * powers[: len(data)], out=prefix[1:])
        return _mix((prefix[ends] - prefix[starts]) * inverse[starts])


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """64-bit hash of every run of `n` consecutive words (empty when the text has fewer words)."""
    count = len(hashes) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = hashes[:count].copy()
        for j in range(1, n):
            h = h * _MULT + hashes[j : j + count]
        return _mix(h)
