"""Cleaning and quality filters, applied one document at a time.

Cleaning changes a document's text (Unicode normal form, control characters, personal data);
filters decide whether it is kept and, if not, give the reason that the manifest counts. The
repetition filters follow Gopher (Rae et al., 2021): a document made of repeated lines or
dominated by one repeated n-gram is rarely worth training on.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

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
    words = text.split()
    if len(words) < n:
        return 0.0
    grams = Counter(zip(*(words[i:] for i in range(n)), strict=False))
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    total = sum(map(len, words))
    return count * sum(map(len, gram)) / total if total else 0.0


def filter_reason(text: str, cfg: FilterConfig) -> str | None:
    """Why the document is dropped (a short reason the manifest counts), or None to keep it."""
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    if cfg.max_duplicate_line_fraction is not None:
        if duplicate_line_fraction(text) > cfg.max_duplicate_line_fraction:
            return "duplicate_lines"
    if cfg.max_top_ngram_char_fraction is not None:
        if top_ngram_char_fraction(text, cfg.top_ngram_size) > cfg.max_top_ngram_char_fraction:
            return "repeated_ngram"
    return None
