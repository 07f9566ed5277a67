r"""Word n-gram hashing shared by near-duplicate detection and decontamination.

A text becomes an array of 64-bit word hashes, and n-gram hashes are computed for all positions at
once; nothing loops over words in Python. Words are runs of letters and digits (`str.isalnum`) in
the lower-cased text, and every run of digits counts as the number `0`, as in datatrove and Dolma.
Underscores separate words like other punctuation, so `snake_case_names` give several words: a
one-line edit in code then changes a smaller share of the shingles, and texts that differ only in
numbers (versions, constants, line numbers) share theirs.

Each word's hash is a polynomial hash of its code points, taken from prefix sums over the text:

    S[i] = sum_{k<i} cp[k] * P^k            (mod 2^64)
    hash(word at [s, e)) = (S[e] - S[s]) * P^-s   (P is odd, so P^-s exists mod 2^64)

and a splitmix64 finaliser spreads the bits. The same word gives the same hash wherever it stands.
"""

from __future__ import annotations

import functools

import numpy as np

_P = 0x100000001B3  # FNV prime: odd, so invertible modulo 2^64
_P_INV = pow(_P, -1, 2**64)
_MULT = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio constant: a good odd multiplier
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_ZERO = ord("0")

_powers = np.ones(1, dtype=np.uint64)
_inverse_powers = np.ones(1, dtype=np.uint64)


BMP = 0x10000


WORD, DIGIT = 1, 2  # bits of a character's class


def _char_class(c: str) -> int:
    """WORD for letters and digits, DIGIT for decimal digits (what `re` calls \\d)."""
    return (WORD if c.isalnum() else 0) | (DIGIT if c.isdecimal() else 0)


@functools.cache
def _bmp_classes() -> np.ndarray:
    """The class of every code point of the Basic Multilingual Plane, built once per process."""
    return np.array([_char_class(chr(cp)) for cp in range(BMP)], dtype=np.uint8)


def _classes(cps: np.ndarray) -> np.ndarray:
    """The class of each code point; the rare ones beyond the BMP are looked up one by one."""
    table = _bmp_classes()
    if cps.max() < BMP:
        return table[cps]
    classes = table[np.minimum(cps, BMP - 1)]
    for cp in np.unique(cps[cps >= BMP]):
        classes[cps == cp] = _char_class(chr(cp))
    return classes


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


def mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: every input bit affects every output bit."""
    h = h ^ (h >> np.uint64(30))
    h *= _MIX1
    h ^= h >> np.uint64(27)
    h *= _MIX2
    h ^= h >> np.uint64(31)
    return h


def word_hashes(text: str) -> np.ndarray:
    """64-bit hash of every word of `text`, in order."""
    return batch_word_hashes([text])[0]


def batch_word_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(hash of every word of every text, in order; the index of the text each word is in).

    The texts are hashed as one string joined by newlines (which end any word), so numpy is called
    a few times per batch instead of per text; a word's hash is the same as in `word_hashes(text)`.
    """
    joined = "\n".join(texts).lower()
    cps = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    if not len(cps):
        return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    text_starts = np.r_[0, np.cumsum(lengths + 1)[:-1]]  # where each text starts in the joined string
    classes = _classes(cps)
    position = None  # original position of each kept code point, where digits were collapsed
    is_digit = (classes & DIGIT).astype(bool)
    if is_digit.any():  # every run of digits becomes a single "0"
        keep = ~(is_digit & np.concatenate([[False], is_digit[:-1]]))
        position = np.flatnonzero(keep)
        cps, classes = np.where(is_digit, np.uint32(_ZERO), cps)[keep], classes[keep]
    edges = np.diff((classes & WORD).astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    hashes = span_hashes(cps, starts, ends)
    at = starts if position is None else position[starts]
    return hashes, np.searchsorted(text_starts, at, side="right") - 1


def span_hashes(cps: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """64-bit hash of each span [start, end) of the code points, the same wherever it stands."""
    powers, inverse = _power_tables(len(cps))
    with np.errstate(over="ignore"):
        prefix = np.zeros(len(cps) + 1, dtype=np.uint64)
        np.cumsum(cps * powers[: len(cps)], out=prefix[1:])
        return mix((prefix[ends] - prefix[starts]) * inverse[starts])


def batch_ngram_hashes(hashes: np.ndarray, owner: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n-gram hashes of a batch from `batch_word_hashes`, without the n-grams that cross from one
    text into the next; and the text each n-gram belongs to."""
    grams = ngram_hashes(hashes, n)
    if not len(grams):
        return grams, np.empty(0, dtype=np.int64)
    inside = owner[: len(grams)] == owner[n - 1 :]
    return grams[inside], owner[: len(grams)][inside]


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """64-bit hash of every run of `n` consecutive words (empty when the text has fewer words)."""
    count = len(hashes) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = hashes[:count].copy()
        for j in range(1, n):
            h = h * _MULT + hashes[j : j + count]
        return mix(h)
