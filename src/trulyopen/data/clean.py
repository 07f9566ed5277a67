"""Cleaning and quality filters, applied one document at a time.

Cleaning changes a document's text (Unicode normal form, control characters, personal data);
filters decide whether it is kept and, if not, give the reason that the manifest counts. The
repetition filters follow Gopher (Rae et al., 2021): a document made of repeated lines or
dominated by one repeated n-gram is rarely worth training on.
"""

from __future__ import annotations

import functools
import re
import unicodedata

import numpy as np

from trulyopen.data.ngrams import BMP, mix, ngram_hashes, span_hashes
from trulyopen.recipe import CleanConfig, FilterConfig, PIIConfig

# Control characters except tab, newline and carriage return.
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w.])")
# International or North-American style numbers: +44 20 7946 0958, (555) 123-4567, 555-123-4567.
PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?![\w])"
)

PII_PATTERNS = (("email", EMAIL, "<EMAIL>"), ("ip", IPV4, "<IP_ADDRESS>"), ("phone", PHONE, "<PHONE>"))


def clean_text(text: str, clean: CleanConfig, pii: PIIConfig) -> tuple[str, dict[str, int]]:
    """Return the cleaned text and counts of what was changed (control chars, PII kinds)."""
    counts: dict[str, int] = {}
    if clean.unicode_normalization != "none":
        normal = unicodedata.normalize(clean.unicode_normalization, text)
        if normal != text:
            counts["unicode_normalized"] = 1
        text = normal
    if clean.strip_control_chars:
        text, n = CONTROL.subn("", text)
        if n:
            counts["control_chars"] = n
    if pii.enabled:
        for kind, pattern, placeholder in PII_PATTERNS:
            if getattr(pii, kind):
                text, n = pattern.subn(placeholder, text)
                if n:
                    counts[f"pii_{kind}"] = n
    return text, counts


def duplicate_line_fraction(text: str) -> float:
    """Share of non-blank lines that repeat an earlier line (Gopher's dup_line_frac)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return 1 - len(set(lines)) / len(lines) if lines else 0.0


def top_ngram_char_fraction(text: str, n: int) -> float:
    """Share of word characters covered by the most frequent word n-gram (Gopher's top_n_gram)."""
    return float(top_ngram_char_fractions([text], n)[0])


@functools.cache
def _space_table() -> np.ndarray:
    """str.isspace() of every code point of the BMP (no whitespace lies beyond it)."""
    return np.array([chr(cp).isspace() for cp in range(BMP)], dtype=bool)


def top_ngram_char_fractions(texts: list[str], n: int) -> np.ndarray:
    """top_ngram_char_fraction of many texts at once, with numpy over their code points.

    Words are what `text.split()` gives (runs of non-whitespace). For each text, the word n-grams
    (hashed) are counted; the most frequent one (ties: the one seen first, as Counter.most_common
    picks) covers count x its words' characters of all word characters; 0 when no n-gram repeats.
    """
    out = np.zeros(len(texts))
    cps = np.frombuffer("\n".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    if not len(cps):
        return out
    space = _space_table()[np.minimum(cps, BMP - 1)] & (cps < BMP)
    edges = np.diff((~space).astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    owner = np.searchsorted(np.r_[0, np.cumsum(lengths + 1)[:-1]], starts, side="right") - 1
    chars = ends - starts
    total = np.bincount(owner, weights=chars, minlength=len(texts))
    grams = ngram_hashes(span_hashes(cps, starts, ends), n)
    if not len(grams):
        return out
    first_word = np.flatnonzero(owner[: len(grams)] == owner[n - 1 :])  # n-grams inside one text
    if not len(first_word):  # every text is shorter than n words (n-grams only across texts)
        return out
    text, gram = owner[first_word], grams[first_word]  # in text order, then position order
    csum = np.r_[0, np.cumsum(chars)]
    gram_chars = csum[first_word + n] - csum[first_word]
    # count each (text, n-gram): one sort of a key that mixes the text into the n-gram's hash
    key = gram ^ mix((text + 1).astype(np.uint64))
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    start = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
    group = np.empty(len(key), dtype=np.int64)
    group[order] = np.repeat(np.arange(len(start)), np.diff(np.r_[start, len(key)]))
    count = np.diff(np.r_[start, len(key)])[group]  # per occurrence, in text order
    # per text: the first occurrence of a most frequent n-gram is that n-gram's first occurrence
    t_start = np.flatnonzero(np.r_[True, text[1:] != text[:-1]])
    t_max = np.maximum.reduceat(count, t_start)
    hit = np.flatnonzero(count == np.repeat(t_max, np.diff(np.r_[t_start, len(text)])))
    best = hit[np.r_[True, text[hit][1:] != text[hit][:-1]]]
    t, c = text[best], count[best]
    repeated = c >= 2
    out[t[repeated]] = c[repeated] * gram_chars[best][repeated] / total[t[repeated]]
    return out


def filter_reasons(texts: list[str], cfg: FilterConfig) -> list[str | None]:
    """filter_reason of many texts at once (the repetition n-grams are counted for all together)."""
    fractions = (
        top_ngram_char_fractions(texts, cfg.top_ngram_size)
        if cfg.max_top_ngram_char_fraction is not None and texts
        else None
    )
    return [_reason(t, cfg, None if fractions is None else fractions[i]) for i, t in enumerate(texts)]


def filter_reason(text: str, cfg: FilterConfig) -> str | None:
    """Why the document is dropped (a short reason the manifest counts), or None to keep it."""
    return filter_reasons([text], cfg)[0]


def _reason(text: str, cfg: FilterConfig, top_ngram: float | None) -> str | None:
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    if cfg.max_duplicate_line_fraction is not None:
        if duplicate_line_fraction(text) > cfg.max_duplicate_line_fraction:
            return "duplicate_lines"
    if top_ngram is not None and top_ngram > cfg.max_top_ngram_char_fraction:
        return "repeated_ngram"
    return None
