"""datatrove's MinHash near-duplicate detection on a JSONL file of documents (benchmark helper).

Not a trulyopen module and not a trulyopen dependency: `benchmarks/data_pipeline.py` runs it with a
separate interpreter that has datatrove installed (`pip install 'datatrove[processing]' orjson spacy`):

    .venv-bench/bin/python benchmarks/_datatrove_minhash.py DOCS.jsonl OUT.json \
        --tokenizer spacy|whitespace [--repeat N] [--seed S]

DOCS.jsonl holds one {"text": ...} per line; the document's index is its line number (from 0).
It runs datatrove's stages 1-3 (signatures, buckets, clusters) in this process with one worker,
calling each step's `run()` directly as LocalPipelineExecutor would with tasks=1 (stage 2 once per
bucket, as datatrove requires world_size to be a multiple of num_buckets), with n_grams=5,
num_buckets=14, hashes_per_bucket=8 (112 permutations; datatrove's default 64-bit xxhash) and
--seed (default 1, datatrove's default), which seeds the permutations' parameters (MinhashConfig.seed);
the shingles' hashes do not depend on it.
Only stages 1-3 are timed; reading the JSONL, importing datatrove and loading spaCy are not.

OUT.json gets the seconds per stage of every repeat, and, from the last repeat, each document's
cluster id (-1: in no cluster) and the indices datatrove removes; with --pairs, also the exact
Jaccard similarity of the given document pairs on datatrove's shingles (computed untimed).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # stage 3 draws a tqdm bar

from datatrove.data import Document  # noqa: E402
from datatrove.pipeline.dedup.minhash import (  # noqa: E402
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupSignature,
)
from datatrove.utils.hashing import HashConfig  # noqa: E402
from datatrove.utils.typeshelper import Languages  # noqa: E402
from datatrove.utils.word_tokenizers import WordTokenizer  # noqa: E402
from loguru import logger  # noqa: E402

try:
    import orjson

    loads = orjson.loads
except ImportError:  # orjson only makes reading faster; it is not timed
    loads = json.loads


class WhitespaceTokenizer(WordTokenizer):
    """`str.split()` words: the cheapest tokenizer datatrove can be given (its default is spaCy)."""

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


def run_once(
    docs: list[Document], cfg: MinhashConfig, language, tmp: str
) -> tuple[dict, list[int], list[int]]:
    sigs, bkts, rem = f"{tmp}/sigs", f"{tmp}/buckets", f"{tmp}/remove"
    seconds = {}
    sig_step = MinhashDedupSignature(output_folder=sigs, config=cfg, language=language)
    sig_step.word_tokenizer.word_tokenize("warm up")  # spaCy loads lazily: not in the timed region

    t = time.perf_counter()
    sig_step.run(iter(docs), rank=0, world_size=1)
    seconds["signatures"] = time.perf_counter() - t

    t = time.perf_counter()
    buckets = MinhashDedupBuckets(input_folder=sigs, output_folder=bkts, config=cfg)
    for bucket in range(cfg.num_buckets):
        buckets.run(rank=bucket, world_size=cfg.num_buckets)
    seconds["buckets"] = time.perf_counter() - t

    t = time.perf_counter()
    MinhashDedupCluster(input_folder=bkts, output_folder=rem, config=cfg, save_cluster_id=True).run(
        world_size=1
    )
    seconds["clusters"] = time.perf_counter() - t

    # With one signature rank the outputs are 000000.remove ('<I' document indices to drop) and
    # 000000.clusters ('<2I' (document index, cluster id) for every document in some cluster).
    cluster = [-1] * len(docs)
    p = Path(rem, "000000.clusters")
    if p.exists():
        for i, c in struct.iter_unpack("<2I", p.read_bytes()):
            cluster[i] = c
    p = Path(rem, "000000.remove")
    removed = [i for (i,) in struct.iter_unpack("<I", p.read_bytes())] if p.exists() else []
    return seconds, cluster, removed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("docs", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokenizer", choices=["spacy", "whitespace"], default="spacy")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--n-grams", type=int, default=5)
    ap.add_argument("--buckets", type=int, default=14)
    ap.add_argument("--hashes-per-bucket", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1, help="MinhashConfig.seed (default 1, datatrove's)")
    ap.add_argument(
        "--pairs",
        type=Path,
        help="JSON [[i, j], ...]: report each pair's exact Jaccard on datatrove's shingles",
    )
    args = ap.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")

    with args.docs.open("rb") as f:
        docs = [Document(text=loads(line)["text"], id=str(i)) for i, line in enumerate(f)]
    cfg = minhash_config(args)
    # "eng" is what MinhashDedupSignature uses when no language is given: spacy.blank("en").
    language = Languages.english if args.tokenizer == "spacy" else WhitespaceTokenizer()
    runs = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="dt_minhash_") as tmp:
            seconds, cluster, removed = run_once(docs, cfg, language, tmp)
        runs.append(seconds)
    pair_jaccard = None
    if args.pairs:  # not timed: exact similarity of the given pairs on datatrove's own shingles
        with tempfile.TemporaryDirectory(prefix="dt_minhash_") as tmp:
            step = MinhashDedupSignature(output_folder=tmp, config=cfg, language=language)
            pair_jaccard = [
                jaccard(*(set(step.get_shingles(docs[k].text).ravel().tolist()) for k in (i, j)))
                for i, j in json.loads(args.pairs.read_text())
            ]
    import datatrove  # for the version only

    result = {
        "datatrove": getattr(datatrove, "__version__", None) or _version("datatrove"),
        "spacy": _version("spacy"),
        "python": sys.version.split()[0],
        "tokenizer": args.tokenizer,
        "seed": args.seed,
        "config": str(cfg),
        "docs": len(docs),
        "runs": runs,
        "cluster": cluster,
        "removed": removed,
        "pair_jaccard": pair_jaccard,
    }
    args.out.write_text(json.dumps(result))


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def minhash_config(args: argparse.Namespace) -> MinhashConfig:
    """datatrove's MinHash settings from the command line (shared with _datatrove_scale.py)."""
    return MinhashConfig(
        n_grams=args.n_grams,
        num_buckets=args.buckets,
        hashes_per_bucket=args.hashes_per_bucket,
        seed=args.seed,
        hash_config=HashConfig(precision=64, hash_fc="xxhash"),
    )


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
