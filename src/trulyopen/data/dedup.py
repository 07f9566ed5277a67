"""Exact and near-duplicate removal: content hashes, then MinHash with LSH banding.

Near duplicates, in four steps:

    text ──words──► shingles (word n-grams, 32-bit hashes)
         ──minhash──► signature: for each of P hash functions, the smallest hashed shingle
         ──LSH──► split the P values into B bands of R rows; documents whose band matches in any
                  band become candidates (probability 1-(1-s^R)^B for Jaccard similarity s)
         ──verify──► keep a candidate pair only if the signatures agree on >= threshold of P
                     (an unbiased estimate of the Jaccard similarity), then union-find clusters.

Each cluster keeps its first document in corpus order (sources in recipe order, files sorted), so
the choice is deterministic. Signatures are computed with numpy over many documents at once:
the hash functions are multiply-shift hashes h(x) = (a*x + b) mod 2^64 >> 32, which need no
modulo by a prime and vectorise well.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from trulyopen.data.ngrams import batch_ngram_hashes, batch_word_hashes, ngram_hashes, word_hashes
from trulyopen.recipe import DedupConfig

BLOCK_ROWS = 1 << 12  # shingles per numpy block: BLOCK_ROWS * P * 8 bytes stay in the CPU cache
EMPTY = np.iinfo(np.uint32).max
_KEY_MULT = np.uint64(0x100000001B3)
MAX_PAIRWISE_BUCKET = 64  # buckets up to this size verify every pair of members


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def exact_duplicates(hashes: Sequence[str]) -> list[int | None]:
    """For each document, the index of the earlier document with the same hash, or None."""
    first: dict[str, int] = {}
    out: list[int | None] = []
    for i, h in enumerate(hashes):
        j = first.setdefault(h, i)
        out.append(None if j == i else j)
    return out


def hash_functions(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) pairs of the multiply-shift hash family; `a` odd, both 64-bit."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
    return a, b


class MinHasher:
    """Turns texts into MinHash signatures (uint32, one row per document)."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.a, self.b = hash_functions(cfg.num_perm, cfg.seed)

    def shingles(self, text: str) -> np.ndarray:
        """32-bit shingle hashes of a text (repeats are harmless: the minimum is the same)."""
        return ngram_hashes(word_hashes(text), self.cfg.shingle_size) >> np.uint64(32)

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """One row per text: for each hash function, the smallest hash of the text's shingles.

        The shingles of all texts (hashed together, see `batch_word_hashes`), in text order, go
        through all hash functions at once in blocks of at most BLOCK_ROWS rows, so memory stays
        bounded; a text may span blocks, and its minimum is taken over all of them.
        """
        words, owner = batch_word_hashes(list(texts))
        shingles, owner = batch_ngram_hashes(words, owner, self.cfg.shingle_size)
        shingles >>= np.uint64(32)
        mins = np.full((len(texts), self.cfg.num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
        # one row per hash function, one column per shingle: reduceat then runs along contiguous
        # memory, which numpy does about 2.5x faster than down the columns
        block = np.empty((self.cfg.num_perm, BLOCK_ROWS), dtype=np.uint64)
        a, b = self.a[:, None], self.b[:, None]
        for start in range(0, len(shingles), BLOCK_ROWS):
            sh, own = shingles[start : start + BLOCK_ROWS], owner[start : start + BLOCK_ROWS]
            hashed = block[:, : len(sh)]
            with np.errstate(over="ignore"):  # multiply-shift hashing wraps modulo 2^64 on purpose
                np.multiply(a, sh[None, :], out=hashed)
                hashed += b
            first = np.flatnonzero(np.r_[True, own[1:] != own[:-1]])  # each text's first column here
            texts_here = own[first]
            mins[texts_here] = np.minimum(mins[texts_here], np.minimum.reduceat(hashed, first, axis=1).T)
        # The shift is monotonic, so taking it after the minimum gives the same values for less work;
        # a text without shingles keeps the maximum, which becomes EMPTY.
        return (mins >> np.uint64(32)).astype(np.uint32)


def find(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def bucket_pairs(members: np.ndarray) -> np.ndarray:
    """Candidate pairs of one LSH bucket: all pairs, or for a huge bucket (boilerplate) each member
    with the first and with its neighbour, so the work stays linear."""
    m = len(members)
    if m <= MAX_PAIRWISE_BUCKET:
        i, j = np.triu_indices(m, 1)
    else:
        i = np.r_[np.zeros(m - 1, dtype=np.int64), np.arange(1, m - 1)]
        j = np.r_[np.arange(1, m), np.arange(2, m)]
    return np.stack([members[i], members[j]], axis=1)


def band_keys(sig: np.ndarray, bands: int) -> np.ndarray:
    """A 64-bit key per (document, band) from the band's rows of the signature; a rare collision
    is caught by verification."""
    n, perm = sig.shape
    rows = perm // bands
    by_band = sig[:, : bands * rows].reshape(n, bands, rows).astype(np.uint64)
    keys = np.zeros((n, bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for r in range(rows):
            keys = keys * _KEY_MULT + by_band[:, :, r]
    return keys


def lsh_clusters(sig: np.ndarray, bands: int, threshold: float) -> np.ndarray:
    """For each document, the index of its cluster's representative (the smallest index).

    Documents without shingles (all-EMPTY signatures) are never clustered: exact dedup covers them.
    The data stage does the same by partitions (`trulyopen.data.curate`); this is the in-memory form.
    """
    n = len(sig)
    parent = np.arange(n)
    idx = np.flatnonzero((sig != EMPTY).any(axis=1))
    keys_all = band_keys(sig[idx], bands)
    pairs = []
    for b in range(bands):
        keys = keys_all[:, b]
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        sizes = np.diff(np.r_[starts, len(keys)])
        for start, size in zip(starts[sizes > 1], sizes[sizes > 1], strict=True):
            pairs.append(bucket_pairs(idx[order[start : start + size]]))
    if pairs:
        cand = np.unique(np.concatenate(pairs), axis=0)
        similar = (sig[cand[:, 0]] == sig[cand[:, 1]]).mean(axis=1) >= threshold
        for i, j in cand[similar]:
            ri, rj = find(parent, int(i)), find(parent, int(j))
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    return np.array([find(parent, i) for i in range(n)])


def near_duplicates(texts: Sequence[str], cfg: DedupConfig) -> np.ndarray:
    """Representative index per document (itself when it is kept); see `lsh_clusters`."""
    return lsh_clusters(MinHasher(cfg).signatures(texts), cfg.bands, cfg.threshold)
