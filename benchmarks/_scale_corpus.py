"""A generated web-like corpus of gzip-compressed JSONL with planted near duplicates (benchmark helper).

    python benchmarks/_scale_corpus.py OUT_DIR --gb 0.1 --files 8 [--seed 0] [--plant-fraction 0.02]

or, from Python, `generate(out_dir, total_compressed_bytes, files, seed=0, plant_fraction=0.02)`.
Standard library and numpy only; not a trulyopen module.

OUT_DIR gets `part-00000.jsonl.gz` ... `part-<files-1>.jsonl.gz`, filled one after the other, each to
about total_compressed_bytes / files (a file's last batches are sized from its compression ratio so
far; the total comes out within about 1% above the target), and `planted.json`. Each line is one
document,

    {"id":"doc-<n>","url":"https://example.org/<n>","date":"2026-MM-DD","text":"..."}

with n counting from 0 over all files in order. The text is English-like: VOCAB synthetic lower-case
words (letters drawn with English letter frequencies; frequent words short, as in English) drawn from
a Zipf-Mandelbrot distribution, P_PHRASE of the time as one of PHRASES stock phrases of 2-5 words
(themselves Zipf-distributed), which gives gzip the repeated word sequences it finds in real text; in
sentences of about 15 words with commas, capitalised first words and full stops, in paragraphs
separated by a blank line. Documents are about 200-8000 characters, log-normally distributed (median
LEN_MEDIAN, mean about 1,500; a copy's length differs from its original's by its edits). The JSONL
compresses 2.7x with gzip level 1 (written here), 2.9x at level 3 and 3.2x at level 6, like real web
text; texts are ASCII, so characters and UTF-8 bytes are the same count.

A `plant_fraction` of the documents are near duplicates of an earlier document: the original is drawn
uniformly from a reservoir sample of all earlier documents, of every file written so far, and is
copied at most once; copies are never copied. About `edit_fraction` of the original's words are
edited, in spans of 1..`edit_span` units (a word or a phrase; a span is cut short rather than edit
more than the remaining words, but for a phrase), each span deleted or replaced by as many fresh
units (even odds). Spans, like the edited lines of benchmarks/data_pipeline.py's plants, keep most
5-word shingles: on 5-word shingles of the lower-cased words the planted pairs' Jaccard similarity
has a median of about 0.83 (10th percentile 0.73), so 14x8 LSH finds about 0.90 of them; unrelated
documents are at about 0.005. 5% of words edited one at a time (edit_span=1 on words) would leave
(1-0.05)^5 / (2 - (1-0.05)^5) = 0.63, which 14x8 LSH finds about a third of the time.

planted.json: {"pairs": [[original id, copy id], ...], "docs", "raw_text_bytes" (UTF-8 of the texts),
"jsonl_bytes" (the files uncompressed), "compressed_bytes", "planted", "compression_ratio" (JSONL /
compressed), "text_compression_ratio", "files" (the byte and document counts per file), "params"}.
`generate` returns the same dict without "pairs" and with "seconds".

Deterministic: the same arguments give the same bytes (numpy's PCG64 from `seed`; gzip headers carry
no name and mtime 0; batch sizes depend on the data only, not on timing). Text is generated in one
thread, about 33 MB/s of text per core, while a second thread compresses the previous batch (zlib
level 1, about 75 MB/s of JSONL; zlib releases the GIL): about 36 MB/s of text on two cores.
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

VOCAB = 50_000
ZIPF_S, ZIPF_Q = 1.1, 2.7  # p(rank r) ~ 1 / (r + q)^s, for words and for phrases
PHRASES, P_PHRASE = 20_000, 0.6  # a text unit is a stock phrase with probability P_PHRASE
PHRASE_WORDS = (2, 5)
TABLE_BITS = 20  # uniform integer -> rank lookup tables
LETTERS = "etaoinshrdlcumwfgypbvkjxqz"
LETTER_FREQ = [
    12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8,
    2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5, 1.0, 0.8, 0.15, 0.15, 0.1, 0.07,
]  # fmt: skip
P_PERIOD, P_COMMA, P_PARAGRAPH = 1 / 7, 1 / 7, 0.2  # per unit; P_PARAGRAPH: of full stops
# A unit's bytes are followed by " ", ", ", ". ", ".\n\n" (JSON-escaped) or "." (a document's end).
PUNCT = [b" ", b", ", b". ", b".\\n\\n", b"."]
SPACE, COMMA, PERIOD, PARAGRAPH, END = range(5)
WIDTH = 32  # bytes of a row of the unit table; phrases are at most WIDTH - 5 bytes
MIN_CHARS, MAX_CHARS = 200, 8000
LEN_MEDIAN, LEN_SIGMA = 1100.0, 0.8
EDIT_FRACTION, EDIT_SPAN = 0.05, 4
RESERVOIR = 20_000  # earlier documents that a copy's original is drawn from
BATCH_CHARS = 4_000_000  # raw text per batch
COMPRESSLEVEL = 1
PREFIX = b'{"id":"doc-%d","url":"https://example.org/%d","date":"2026-%02d-%02d","text":"'


def _rank_table(n: int) -> np.ndarray:
    p = 1.0 / (np.arange(n) + ZIPF_Q) ** ZIPF_S
    cdf = np.cumsum(p / p.sum())
    grid = (np.arange(1 << TABLE_BITS) + 0.5) / (1 << TABLE_BITS)
    return np.minimum(np.searchsorted(cdf, grid), n - 1).astype(np.int32)


class _Units:
    """Words and phrases (units 0..VOCAB-1 are the words), and a table of every unit's ten variants
    (capitalised or not, times the five PUNCT endings) as JSON bytes, one padded row each."""

    def __init__(self, rng: np.random.Generator):
        letters = np.frombuffer(LETTERS.encode(), dtype=np.uint8)
        freq = np.asarray(LETTER_FREQ) / sum(LETTER_FREQ)
        n = 2 * VOCAB  # candidates; duplicates dropped
        lens = np.minimum(18, 1 + rng.poisson(1.2 + 0.6 * np.log1p(np.arange(n))))
        chars = letters[rng.choice(len(letters), size=int(lens.sum()), p=freq)].tobytes()
        ends = np.cumsum(lens).tolist()
        words, seen, start = [], set(), 0
        for end in ends:  # frequent words short: the mean length grows with log(rank)
            w = chars[start:end]
            start = end
            if w not in seen:
                seen.add(w)
                words.append(w)
                if len(words) == VOCAB:
                    break
        if len(words) < VOCAB:  # never seen: 2 * VOCAB candidates hold far more distinct words
            raise RuntimeError(f"only {len(words)} distinct words drawn")
        self.word_table = _rank_table(VOCAB)
        self.phrase_table = _rank_table(PHRASES)
        phrases = []
        while len(phrases) < PHRASES:
            k = rng.integers(PHRASE_WORDS[0], PHRASE_WORDS[1] + 1, PHRASES)
            ws = self.draw_words(rng, int(k.sum())).tolist()
            at = 0
            for m in k.tolist():
                p = b" ".join(words[i] for i in ws[at : at + m])
                at += m
                if len(p) <= WIDTH - 5 and len(phrases) < PHRASES:
                    phrases.append(p)
        base = words + phrases
        self.n_words = np.array([1] * VOCAB + [p.count(b" ") + 1 for p in phrases], dtype=np.int32)
        nu = len(base)
        rows = np.zeros((nu, WIDTH), dtype=np.uint8)
        blen = np.array([len(b) for b in base], dtype=np.int64)
        mask = np.arange(WIDTH)[None, :] < blen[:, None]
        rows[mask] = np.frombuffer(b"".join(base), dtype=np.uint8)
        table = np.repeat(rows[:, None, :], 10, axis=1)  # (unit, variant, byte)
        table[:, 5:, 0] -= 32  # capitalised
        vlen = np.repeat(blen[:, None], 10, axis=1)
        for v, punct in enumerate(PUNCT):
            for j, ch in enumerate(punct):
                table[np.arange(nu), v, blen + j] = ch
                table[np.arange(nu), v + 5, blen + j] = ch
            vlen[:, v] += len(punct)
            vlen[:, v + 5] += len(punct)
        self.table = table.reshape(nu * 10, WIDTH)
        self.vlen = vlen.reshape(-1).astype(np.int8)
        escapes = np.array([0, 0, 0, 2, 0] * 2, dtype=np.int64)  # ".\\n\\n": 5 JSON bytes, 3 chars
        self.raw_len = (vlen - escapes[None, :]).reshape(-1).astype(np.int32)
        # expected raw characters per unit, to size batches
        pu = np.bincount(self.word_table, minlength=VOCAB) / (1 << TABLE_BITS)
        pp = np.bincount(self.phrase_table, minlength=PHRASES) / (1 << TABLE_BITS)
        p_unit = np.concatenate([(1 - P_PHRASE) * pu, P_PHRASE * pp])
        self.mean_raw = float(p_unit @ blen) + 1 + P_COMMA + P_PERIOD * (1 + 2 * P_PARAGRAPH)

    def draw_words(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.word_table[rng.integers(0, 1 << TABLE_BITS, size=n, dtype=np.int32)]

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n units: each a phrase with probability P_PHRASE, else a word."""
        r = rng.integers(0, 1 << (TABLE_BITS + 8), size=n, dtype=np.int32)  # 20 bits: rank, 8: kind
        rank = r & ((1 << TABLE_BITS) - 1)
        phrase = (r >> TABLE_BITS) < round(P_PHRASE * 256)
        return np.where(phrase, VOCAB + self.phrase_table[rank], self.word_table[rank])

    def bytes_of(self, var: np.ndarray) -> bytes:
        """The variants' bytes, concatenated."""
        rows = self.table[var]
        return rows[np.arange(WIDTH, dtype=np.int8)[None, :] < self.vlen[var][:, None]].tobytes()


def _punct(rng: np.random.Generator, n: int) -> np.ndarray:
    u = rng.random(n)
    p = np.zeros(n, dtype=np.int32)
    p[u < P_PERIOD + P_COMMA] = COMMA
    p[u < P_PERIOD] = PERIOD
    p[u < P_PERIOD * P_PARAGRAPH] = PARAGRAPH
    return p


def _variants(units: np.ndarray, punct: np.ndarray) -> np.ndarray:
    """Each unit's variant: capitalised after a full stop (and at the start of a batch)."""
    cap = np.ones(len(punct), dtype=np.int32)
    cap[1:] = punct[:-1] >= PERIOD
    return units * 10 + cap * 5 + punct


class _Generator:
    """Documents in batches; keeps the reservoir of earlier documents that copies are made from."""

    def __init__(self, seed: int, plant_fraction: float, edit_fraction: float, edit_span: int):
        self.rng = np.random.default_rng(seed)
        self.units = _Units(self.rng)
        self.plant_fraction, self.edit_fraction, self.edit_span = plant_fraction, edit_fraction, edit_span
        self.reservoir: list[tuple[int, np.ndarray, np.ndarray]] = []
        self.fresh_seen = 0
        self.pairs: list[tuple[int, int]] = []
        self.n = 0  # documents so far
        self.ratio = 2.7  # JSONL bytes / compressed bytes, before a file has been compressed

    def edit(self, units: np.ndarray, punct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A near duplicate: about edit_fraction of the words, in spans of 1..edit_span units, each
        deleted or replaced by as many fresh units."""
        rng = self.rng
        n = len(units)
        nw = self.units.n_words[units]
        units, keep = units.copy(), np.ones(n, dtype=bool)
        target, edited = max(1, round(self.edit_fraction * int(nw.sum()))), 0
        while edited < target:
            span = int(rng.integers(1, self.edit_span + 1))
            start = int(rng.integers(0, max(1, n - span + 1)))
            while span > 1 and nw[start : start + span].sum() > target - edited:  # no overshoot past
                span -= 1  # one unit (a phrase is up to five words)
            sl = slice(start, min(n, start + span))
            edited += int(nw[sl].sum())
            if rng.random() < 0.5:
                keep[sl] = False
            else:
                units[sl] = self.units.draw(rng, sl.stop - sl.start)
        if not keep.any():
            keep[0] = True
        units, punct = units[keep], punct[keep].copy()
        punct[-1] = END
        return units, punct

    def batch(self, chars: float) -> tuple[bytes, int, int]:
        """About `chars` characters of documents as JSONL lines: (lines, raw text bytes, docs)."""
        rng, U = self.rng, self.units
        n_docs = max(1, round(chars / (LEN_MEDIAN * np.exp(LEN_SIGMA**2 / 2))))
        target = np.clip(rng.lognormal(np.log(LEN_MEDIAN), LEN_SIGMA, n_docs), MIN_CHARS, MAX_CHARS - 60)
        need = float(target.sum())
        n_units = int(need / U.mean_raw * 1.03) + 64
        units, punct = U.draw(rng, n_units), _punct(rng, n_units)
        cum = np.cumsum(U.raw_len[_variants(units, punct)])
        while cum[-1] < need:  # rare: draw more
            k = n_units // 8 + 64
            units, punct = np.concatenate([units, U.draw(rng, k)]), np.concatenate([punct, _punct(rng, k)])
            cum = np.cumsum(U.raw_len[_variants(units, punct)])
        ends = np.searchsorted(cum, np.cumsum(target)) + 1  # document k: units [ends[k-1], ends[k])
        ends = np.unique(ends)
        starts = np.concatenate([[0], ends[:-1]])
        n_docs = len(ends)
        ids = np.arange(self.n, self.n + n_docs)
        self.n += n_docs
        punct[ends - 1] = END

        # planted copies: some documents' units are replaced by an edited earlier document's
        is_copy = rng.random(n_docs) < self.plant_fraction
        u_parts, p_parts, lens = [], [], ends - starts
        prev = 0
        for k in np.flatnonzero(is_copy).tolist():
            if not self.reservoir:
                is_copy[k] = False
                continue
            j = int(rng.integers(len(self.reservoir)))
            orig, ou, op = self.reservoir[j]
            self.reservoir[j] = self.reservoir[-1]
            self.reservoir.pop()
            cu, cp = self.edit(ou, op)
            u_parts += [units[prev : starts[k]], cu]
            p_parts += [punct[prev : starts[k]], cp]
            lens[k] = len(cu)
            prev = ends[k]
            self.pairs.append((orig, int(ids[k])))
        u_parts.append(units[prev : ends[-1]])
        p_parts.append(punct[prev : ends[-1]])
        # originals for later copies: a reservoir sample (algorithm R) of every fresh document so far
        fresh = np.flatnonzero(~is_copy)
        seen = self.fresh_seen + 1 + np.arange(len(fresh))
        self.fresh_seen += len(fresh)
        slots = rng.integers(0, seen)
        for k, slot in zip(fresh.tolist(), slots.tolist(), strict=True):
            if len(self.reservoir) < RESERVOIR:  # (copies take originals out of it)
                slot = len(self.reservoir)
                self.reservoir.append(None)  # type: ignore[arg-type]
            elif slot >= RESERVOIR:
                continue
            s, e = starts[k], ends[k]
            self.reservoir[slot] = (int(ids[k]), units[s:e].copy(), punct[s:e].copy())

        units, punct = np.concatenate(u_parts), np.concatenate(p_parts)
        var = _variants(units, punct)
        text = U.bytes_of(var)
        byte_end = np.cumsum(U.vlen[var], dtype=np.int64)[np.cumsum(lens) - 1]
        byte_start = np.concatenate([[0], byte_end[:-1]])
        months, days = rng.integers(1, 13, n_docs), rng.integers(1, 29, n_docs)
        mv = memoryview(text)
        out: list = []
        for i, s, e, m, d in zip(
            ids.tolist(), byte_start.tolist(), byte_end.tolist(), months.tolist(), days.tolist(), strict=True
        ):
            out += [PREFIX % (i, i, m, d), mv[s:e], b'"}\n']
        n_para = int(np.count_nonzero(punct == PARAGRAPH))
        return b"".join(out), len(text) - 2 * n_para, n_docs


class _Compressor:
    """gzip-compresses one file's batches in a second thread (zlib releases the GIL)."""

    def __init__(self, path: Path):
        self.f = path.open("wb")
        self.z = zlib.compressobj(COMPRESSLEVEL, zlib.DEFLATED, 31)  # gzip wrapper: mtime 0, no name
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.jobs: list[tuple[int, Future]] = []  # (JSONL bytes, compressed bytes written)

    def _compress(self, data: bytes) -> int:
        out = self.z.compress(data)
        self.f.write(out)
        return len(out)

    def put(self, data: bytes) -> None:
        self.jobs.append((len(data), self.pool.submit(self._compress, data)))

    def settled(self) -> tuple[int, int, int]:
        """(compressed bytes, their JSONL bytes) of every batch but the newest, once compressed; and
        the newest batch's JSONL bytes (it may still be compressing)."""
        if not self.jobs:
            return 0, 0, 0
        done = self.jobs[:-1]
        return sum(f.result() for _, f in done), sum(n for n, _ in done), self.jobs[-1][0]

    def close(self) -> int:
        written = sum(f.result() for _, f in self.jobs)
        self.pool.shutdown()
        tail = self.z.flush()
        self.f.write(tail)
        self.f.close()
        return written + len(tail)


def generate(
    out_dir: Path,
    total_compressed_bytes: int,
    files: int,
    seed: int = 0,
    plant_fraction: float = 0.02,
    edit_fraction: float = EDIT_FRACTION,
    edit_span: int = EDIT_SPAN,
) -> dict:
    """Write the corpus and planted.json into out_dir; return planted.json's dict without "pairs"."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    gen = _Generator(seed, plant_fraction, edit_fraction, edit_span)
    per_file = total_compressed_bytes / files
    file_stats = []
    for fi in range(files):
        path = out_dir / f"part-{fi:05d}.jsonl.gz"
        comp = _Compressor(path)
        jsonl = raw = docs = 0
        while True:
            # decide from the batches already compressed (all but the newest, which may still be
            # compressing) and the newest one's estimate: from the data alone, not thread timing
            known, known_jsonl, inflight = comp.settled()
            ratio = known_jsonl / known if known else gen.ratio
            remaining = per_file - known - inflight / ratio
            if remaining * ratio < 2 * MIN_CHARS:
                break
            # a batch's raw text is about 0.95 of its JSONL (ids, urls, dates, escapes)
            lines, b_raw, b_docs = gen.batch(min(BATCH_CHARS, remaining * ratio * 0.95))
            comp.put(lines)
            jsonl, raw, docs = jsonl + len(lines), raw + b_raw, docs + b_docs
        size = comp.close()
        gen.ratio = jsonl / size
        file_stats.append(
            {
                "file": path.name,
                "docs": docs,
                "raw_text_bytes": raw,
                "jsonl_bytes": jsonl,
                "compressed_bytes": size,
            }
        )
    seconds = time.perf_counter() - t0
    keys = ("docs", "raw_text_bytes", "jsonl_bytes", "compressed_bytes")
    totals = {k: sum(f[k] for f in file_stats) for k in keys}
    result = {
        **totals,
        "planted": len(gen.pairs),
        "compression_ratio": totals["jsonl_bytes"] / totals["compressed_bytes"],
        "text_compression_ratio": totals["raw_text_bytes"] / totals["compressed_bytes"],
        "params": {
            "total_compressed_bytes": total_compressed_bytes,
            "files": files,
            "seed": seed,
            "plant_fraction": plant_fraction,
            "edit_fraction": edit_fraction,
            "edit_span": edit_span,
            "vocab": VOCAB,
            "phrases": PHRASES,
            "p_phrase": P_PHRASE,
            "zipf_s_q": [ZIPF_S, ZIPF_Q],
            "doc_chars": [MIN_CHARS, MAX_CHARS],
            "doc_chars_lognormal_median_sigma": [LEN_MEDIAN, LEN_SIGMA],
            "gzip_compresslevel": COMPRESSLEVEL,
        },
        "files": file_stats,
    }
    pairs = [[f"doc-{a}", f"doc-{b}"] for a, b in gen.pairs]
    (out_dir / "planted.json").write_text(json.dumps({**result, "pairs": pairs}))
    return {**result, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--gb", type=float, default=0.1, help="total compressed size in GB (1e9 bytes)")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plant-fraction", type=float, default=0.02)
    ap.add_argument("--edit-fraction", type=float, default=EDIT_FRACTION)
    ap.add_argument(
        "--edit-span", type=int, default=EDIT_SPAN, help="edits are spans of 1..N words or phrases"
    )
    a = ap.parse_args()
    r = generate(a.out_dir, int(a.gb * 1e9), a.files, a.seed, a.plant_fraction, a.edit_fraction, a.edit_span)
    s = r["seconds"]
    print(
        f"{r['docs']:,} documents ({r['planted']:,} planted near duplicates) in {a.files} files: "
        f"{r['compressed_bytes'] / 1e6:,.1f} MB compressed, {r['jsonl_bytes'] / 1e6:,.1f} MB JSONL "
        f"({r['compression_ratio']:.2f}x), {r['raw_text_bytes'] / 1e6:,.1f} MB of text; {s:.1f} s: "
        f"{r['compressed_bytes'] / 1e6 / s:.1f} MB/s compressed, "
        f"{r['raw_text_bytes'] / 1e6 / s:.1f} MB/s of text"
    )
    print(json.dumps(r))


if __name__ == "__main__":
    main()
