"""Probe: datatrove's MinHash near-duplicate detection, in-process and offline.

Run with the separate bench venv (datatrove is NOT a trulyopen dependency):

    /work/main/.venv-bench/bin/python benchmarks/_datatrove_probe.py [--workers 2] [--tokenizer spacy|whitespace]

Corpus: the stdlib's .py files (site-packages excluded), cut into chunks of at most
CHUNK_LINES lines, N_BASE of them picked evenly; then N_PLANT near duplicates are
appended (a copy of a base doc with ~5% of its lines deleted or edited).
Runs datatrove stages 1-3 (signature, buckets, cluster) with n_grams=5,
num_buckets=14, hashes_per_bucket=8 (datatrove defaults: xxhash, 64-bit, seed=1)
and reports time, docs/s and the recall on the planted pairs.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import struct
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # stage 3 draws a tqdm bar

from loguru import logger  # noqa: E402

from datatrove.data import Document  # noqa: E402
from datatrove.pipeline.dedup.minhash import (  # noqa: E402
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.utils.hashing import HashConfig  # noqa: E402
from datatrove.utils.word_tokenizers import WordTokenizer  # noqa: E402

N_BASE = 1900
N_PLANT = 100
CHUNK_LINES = 400
EDIT_FRACTION = 0.05


class WhitespaceSplitTokenizer(WordTokenizer):
    """Offline-trivial alternative to datatrove's default ("eng" -> spacy.blank("en"))."""

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


def build_corpus(seed: int = 0) -> tuple[list[Document], list[tuple[int, int]]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    chunks: list[tuple[str, str]] = []
    for p in files:
        lines = p.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        for start in range(0, max(len(lines), 1), CHUNK_LINES):
            text = "".join(lines[start : start + CHUNK_LINES])
            if len(text.split()) >= 20:
                chunks.append((f"{p.relative_to(stdlib)}:{start}", text))
    if len(chunks) < N_BASE:
        sys.exit(f"only {len(chunks)} chunks in {stdlib}")
    step = len(chunks) / N_BASE
    base = [chunks[int(i * step)] for i in range(N_BASE)]
    docs = [Document(text=t, id=i) for i, t in base]

    rng = random.Random(seed)
    candidates = [i for i, d in enumerate(docs) if d.text.count("\n") >= 40]
    pairs = []
    for src in rng.sample(candidates, N_PLANT):
        lines = docs[src].text.splitlines(keepends=True)
        k = max(1, round(EDIT_FRACTION * len(lines)))
        edited = list(lines)
        for li in sorted(rng.sample(range(len(lines)), k), reverse=True):
            if rng.random() < 0.5:
                del edited[li]
            else:
                edited[li] = f"# planted edit {rng.randrange(10**9)} replaces this line\n"
        pairs.append((src, len(docs)))
        docs.append(Document(text="".join(edited), id=f"planted-{src}"))
    return docs, pairs


def shard(docs: list[Document], world_size: int, rank: int) -> list[Document]:
    n = len(docs)
    return docs[rank * n // world_size : (rank + 1) * n // world_size]


def shard_reader(docs, data=None, rank: int = 0, world_size: int = 1):
    yield from shard(docs, world_size, rank)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=1, help="1: direct run() calls; >1: LocalPipelineExecutor")
    ap.add_argument("--tokenizer", choices=["spacy", "whitespace"], default="spacy")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    if not args.verbose:
        logger.remove()
        logger.add(sys.stderr, level="WARNING")

    t = time.perf_counter()
    docs, pairs = build_corpus()
    print(f"corpus: {len(docs)} docs, {sum(len(d.text) for d in docs) / 1e6:.1f} MB, "
          f"{len(pairs)} planted pairs (built in {time.perf_counter() - t:.1f}s)")

    cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, seed=1,
                        hash_config=HashConfig(precision=64, hash_fc="xxhash"))
    language = "eng" if args.tokenizer == "spacy" else WhitespaceSplitTokenizer()
    W = args.workers

    with tempfile.TemporaryDirectory(prefix="dt_minhash_") as tmp:
        sigs, bkts, rem = f"{tmp}/sigs", f"{tmp}/buckets", f"{tmp}/remove_ids"
        times = {}
        # tokenizer objects are lazy: warm spaCy up outside the timed region
        sig_step = MinhashDedupSignature(output_folder=sigs, config=cfg, language=language)
        sig_step.word_tokenizer.word_tokenize("warm up")

        t = time.perf_counter()
        if W == 1:
            sig_step.run(iter(docs), rank=0, world_size=1)
        else:
            from datatrove.executor import LocalPipelineExecutor

            LocalPipelineExecutor(
                pipeline=[functools.partial(shard_reader, docs), sig_step],
                tasks=W, workers=W, logging_dir=f"{tmp}/logs1",
            ).run()
        times["1 signature"] = time.perf_counter() - t

        t = time.perf_counter()
        b_step = MinhashDedupBuckets(input_folder=sigs, output_folder=bkts, config=cfg)
        if W == 1:
            for bucket in range(cfg.num_buckets):  # world_size must be a multiple of num_buckets
                b_step.run(rank=bucket, world_size=cfg.num_buckets)
        else:
            from datatrove.executor import LocalPipelineExecutor

            LocalPipelineExecutor(pipeline=[b_step], tasks=cfg.num_buckets, workers=W,
                                  logging_dir=f"{tmp}/logs2").run()
        times["2 buckets"] = time.perf_counter() - t

        t = time.perf_counter()
        MinhashDedupCluster(input_folder=bkts, output_folder=rem, config=cfg,
                            save_cluster_id=True).run(world_size=1)
        times["3 cluster"] = time.perf_counter() - t

        # Read back. Files are per signature rank r: {r:06d}.remove = '<I' local doc indices
        # to drop; {r:06d}.clusters = '<2I' (local doc index, cluster id) for every doc in a cluster.
        offsets = [r * len(docs) // W for r in range(W)]
        removed, cluster_of = set(), {}
        for r in range(W):
            p = Path(rem, f"{r:06d}.remove")
            if p.exists():
                removed |= {offsets[r] + i for (i,) in struct.iter_unpack("<I", p.read_bytes())}
            p = Path(rem, f"{r:06d}.clusters")
            if p.exists():
                cluster_of |= {offsets[r] + i: c for i, c in struct.iter_unpack("<2I", p.read_bytes())}

        # Optional stage 4 (not timed in the total): the filter yields the kept docs.
        t = time.perf_counter()
        kept = sum(
            sum(1 for _ in MinhashDedupFilter(input_folder=rem).run(iter(shard(docs, W, r)), rank=r, world_size=W))
            for r in range(W)
        )
        t_filter = time.perf_counter() - t

    total = sum(times.values())
    for k, v in times.items():
        print(f"  stage {k:12s} {v:8.2f} s")
    print(f"dedup stages 1-3: {total:.2f} s, {len(docs) / total:.1f} docs/s "
          f"(workers={W}, tokenizer={args.tokenizer}, cpus={os.cpu_count()})")
    print(f"  stage 4 filter {t_filter:.2f} s (not in total): kept {kept}, dropped {len(docs) - kept}")

    detected = sum(1 for s, c in pairs if s in cluster_of and cluster_of.get(c) == cluster_of[s])
    planted = {c for _, c in pairs}
    print(f"recall on planted pairs: {detected}/{len(pairs)} = {detected / len(pairs):.2f}")
    print(f"removed: {len(removed)} docs ({len(removed & planted)} planted copies, "
          f"{len(removed - planted)} others); docs in some cluster: {len(cluster_of)}")

    # exact Jaccard of the planted pairs, on datatrove's own shingles
    jac, missed = [], []
    for s, c in pairs:
        a, b = (set(sig_step.get_shingles(docs[i].text).ravel().tolist()) for i in (s, c))
        j = len(a & b) / max(1, len(a | b))
        jac.append(j)
        if not (s in cluster_of and cluster_of.get(c) == cluster_of[s]):
            missed.append(round(j, 3))
    jac.sort()
    print(f"planted-pair Jaccard: min {jac[0]:.3f} median {jac[len(jac) // 2]:.3f} max {jac[-1]:.3f}; "
          f"missed pairs' Jaccard: {sorted(missed)}")

if __name__ == "__main__":
    main()
