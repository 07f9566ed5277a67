"""OLMoTrace on our index: the spans of a text that occur verbatim in the training data, and where.

    text ─► tokens ─► maximal spans found in the index      (infini-gram's `attribute`: for each
               │        (>= min_len tokens)                  start, the longest match; contained
               │                                              ones dropped)
               ├─► trimmed to word boundaries                 a span neither starts nor ends inside a
               │                                              word (decided on the tokens' text, with
               │                                              the neighbouring token: `foo.bar` has
               │                                              three word starts, `foobar` one)
               ├─► the least likely spans kept                by the sum of their tokens' unigram
               │                                              log-probabilities in the training data:
               │                                              ceil(keep * tokens) of them, as OLMoTrace
               └─► a few documents each                       id, source, licence, the text around it

`ngram` answers from the same index: how often a prefix occurs and which tokens follow it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trulyopen.errors import UserError
from trulyopen.files import sha256_file

MAX_TOKENS = 4096  # the longest text traced at once
MAX_COUNT = 100_000  # spans found more often than this are too common to point at a source


@dataclass(frozen=True)
class TraceOptions:
    min_len: int = 8  # tokens: shorter matches are common phrases, not a source
    keep: float = 0.05  # OLMoTrace keeps ceil(0.05 * tokens) spans, the least likely ones
    docs_per_span: int = 3
    context_tokens: int = 40  # on each side of a span in a document's excerpt


def find_index(target: str | Path) -> tuple[Path, Path]:
    """(index folder, tokenizer.json) of a release, a run directory or anything inside one."""
    start = Path(target).expanduser()
    if not start.exists():
        raise UserError(f"{target}: no such file or directory (trace takes a release or a run directory)")
    for root in [start.resolve(), *start.resolve().parents]:
        if (root / "data" / "index" / "index.json").is_file():
            return root / "data" / "index", root / "tokenizer" / "tokenizer.json"
        if (root / "ledger.jsonl").is_file() or (root / "SHA256SUMS").is_file():  # a run or a release
            raise UserError(
                f"{root}: has no trace index (data/index/index.json); add `index: {{}}` to its recipe and "
                f"rerun it (trulyopen run RECIPE builds only what is missing)"
            )
    raise UserError(f"{target}: not inside a run directory or a release, so there is no index to trace with")


class Tracer:
    """An open index and the tokenizer its tokens were made with."""

    def __init__(self, index_dir: Path, tokenizer_file: Path):
        from infini_gram.engine import InfiniGramEngine
        from tokenizers import Tokenizer

        self.meta = json.loads((index_dir / "index.json").read_text())
        if not tokenizer_file.is_file():
            raise UserError(f"{tokenizer_file}: missing (the index's tokens were made with it)")
        if self.meta.get("tokenizer_sha256") not in (None, sha256_file(tokenizer_file)):
            raise UserError(f"{tokenizer_file}: not the tokenizer the index in {index_dir} was built with")
        self.tok = Tokenizer.from_file(str(tokenizer_file))
        width = self.meta["token_width"]
        dirs = [str(index_dir / s["name"]) for s in self.meta["shards"]]
        self.engine = InfiniGramEngine(
            index_dir=dirs,
            eos_token_id=self.meta["eot_id"],
            vocab_size=0xFFFF if width == 2 else 0xFFFFFFFF,
            token_dtype="u16" if width == 2 else "u32",
            max_support=10_000,  # ntd counts every continuation up to this many (else samples)
        )
        self.logprob = _unigram_logprobs(index_dir, self.meta)
        word = [_is_word_edge(self.tok.decode([i])) for i in range(self.tok.get_vocab_size())]
        self.first_word = np.array([w[0] for w in word] + [False])  # the token's text starts in a word
        self.last_word = np.array([w[1] for w in word] + [False])  # ...and ends in one

    # ------------------------------------------------------------------------------------ trace

    def encode(self, text: str) -> Any:
        enc = self.tok.encode(text, add_special_tokens=False)
        if len(enc.ids) > MAX_TOKENS:
            raise UserError(f"text: {len(enc.ids):,} tokens; trace takes at most {MAX_TOKENS:,}")
        return enc

    def trace(self, text: str, opts: TraceOptions = TraceOptions()) -> dict[str, Any]:
        """The spans of `text` found verbatim in the training data, with their documents."""
        enc = self.encode(text)
        ids, n = list(enc.ids), len(enc.ids)
        found = self.engine.attribute(
            input_ids=ids, delim_ids=[], min_len=opts.min_len, max_cnt=MAX_COUNT, enforce_bow=False
        )
        if "error" in found:
            raise UserError(f"trace: {found['error']}")
        starts = self._word_starts(ids)
        spans: list[tuple[int, int]] = []
        for s in found["spans"]:
            a, b = s["l"], s["r"]
            while a < b and not starts[a]:
                a += 1
            while b > a and not starts[b]:
                b -= 1
            if b - a >= opts.min_len:
                spans.append((a, b))
        spans = [a for a in set(spans) if not any(b != a and b[0] <= a[0] and a[1] <= b[1] for b in spans)]
        scored = sorted((self._span_logprob(ids[a:b]), a, b) for a, b in spans)
        keep = sorted(scored[: max(1, math.ceil(opts.keep * n))], key=lambda t: t[1])
        out = [self._span(enc, text, a, b, lp, opts) for lp, a, b in keep]
        return {
            "text": text,
            "tokens": n,
            "options": opts.__dict__,
            "spans": out,
            "index": {k: self.meta[k] for k in ("docs", "tokens", "shards_fingerprint")},
        }

    def _word_starts(self, ids: list[int]) -> np.ndarray:
        """starts[i]: a word boundary lies just before token i (i == len: the end of the text)."""
        a = np.asarray(ids)
        starts = np.ones(len(ids) + 1, dtype=bool)
        starts[1:-1] = ~(self.first_word[a[1:]] & self.last_word[a[:-1]])
        return starts

    def _span_logprob(self, ids: list[int]) -> float:
        return float(sum(self.logprob.get(t, -20.0) for t in ids))

    def _span(self, enc: Any, text: str, first: int, end: int, logprob: float, opts: TraceOptions) -> dict:
        ids = enc.ids[first:end]
        found = self.engine.find(input_ids=ids)
        docs = []
        for s, (lo, hi) in enumerate(found["segment_by_shard"]):
            for rank in range(lo, min(hi, lo + opts.docs_per_span - len(docs))):
                docs.append(self._document(s, rank, len(ids), opts.context_tokens))
            if len(docs) >= opts.docs_per_span:
                break
        a, b = enc.offsets[first][0], enc.offsets[end - 1][1]
        while a < b and text[a].isspace():  # a token's leading space is not part of what was found
            a += 1
        return {
            "start": a,  # characters of the traced text
            "end": b,
            "text": text[a:b],
            "token_start": first,
            "token_end": end,
            "length": end - first,
            "count": found["cnt"],
            "unigram_logprob": round(logprob, 4),
            "docs": docs,
        }

    def _document(self, shard: int, rank: int, needle: int, context: int) -> dict[str, Any]:
        got = self.engine.get_doc_by_rank_2(s=shard, rank=rank, needle_len=needle, max_ctx_len=context)
        meta = json.loads(got["metadata"]) if got.get("metadata") else {}
        tokens, at = got["token_ids"], got["needle_offset"]
        before = self.tok.decode(tokens[:at])
        match = self.tok.decode(tokens[at : at + needle])
        after = self.tok.decode(tokens[at + needle :])
        return {
            "id": meta.get("id"),
            "source": meta.get("source"),
            "license": meta.get("license"),
            "doc_index": got["doc_ix"],
            "context": before + match + after,
            "match_start": len(before),
            "match_end": len(before) + len(match),
        }

    # ------------------------------------------------------------------------------------ n-grams

    def ngram(self, prefix: str, top: int = 10) -> dict[str, Any]:
        """How often `prefix` occurs in the training data, and the tokens that follow it."""
        ids = list(self.encode(prefix).ids)
        count = self.engine.count(input_ids=ids)["count"] if ids else self.meta["tokens"]
        ntd = self.engine.ntd(prompt_ids=ids) if ids else {"result_by_token_id": {}, "prompt_cnt": 0}
        nexts = sorted(ntd["result_by_token_id"].items(), key=lambda kv: (-kv[1]["cont_cnt"], kv[0]))
        follow = [
            {"token": self.tok.decode([t]) if t < self.tok.get_vocab_size() else "<end of document>",
             "id": t, "count": v["cont_cnt"], "prob": round(v["prob"], 6)}
            for t, v in nexts[:top]
        ]  # fmt: skip
        return {
            "prefix": prefix,
            "tokens": len(ids),
            "count": count,
            "approx": bool(ntd.get("approx", False)),
            "next": follow,
        }


def _is_word_edge(piece: str) -> tuple[bool, bool]:
    """(the piece's first character is a word character, its last one is)."""

    def word(c: str) -> bool:
        return c.isalnum() or c == "_"

    return (bool(piece) and word(piece[0]), bool(piece) and word(piece[-1]))


def _unigram_logprobs(index_dir: Path, meta: dict) -> dict[int, float]:
    counts: dict[int, int] = {}
    for shard in meta["shards"]:
        for line in (index_dir / shard["name"] / "unigram.0").read_text().splitlines():
            t, c = line.split()
            counts[int(t)] = counts.get(int(t), 0) + int(c)
    total = sum(counts.values())
    return {t: math.log(c / total) for t, c in counts.items()}
