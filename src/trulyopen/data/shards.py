"""The shards stage: tokenise the corpus into flat memory-mapped token arrays.

For each split, documents are encoded in worker processes (fixed chunks, results in order) and
written one after another, each followed by the end-of-text token, into shard files:

    data/shards/train_0000.bin   tokens, little-endian uint16 (uint32 when the vocabulary needs it)
    data/shards/train_0000.idx   int64 offsets: document k is tokens[idx[k]:idx[k+1]]
    data/shards/train_0000.ids   one document id per line, in the same order

`shards.json` lists every file with its sha256 and a fingerprint of the whole tokenised set (the
tokenizer's hash and every shard's hash, in order), which later stages use to tie training order
and checkpoints to exactly this data. The bytes do not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from trulyopen.files import atomic_open, sha256_file, write_json
from trulyopen.parallel import ordered_map
from trulyopen.progress import Progress

CHUNK_DOCS = 64
_tok = None
_eot: int = 0


def _init(tokenizer_file: str, eot: str, threads: bool = True) -> None:
    global _tok, _eot
    if not threads:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _tok = Tokenizer.from_file(tokenizer_file)
    _eot = _tok.token_to_id(eot)


def _encode(texts: list[str]) -> list[list[int]]:
    # encode_batch_fast skips character offsets, which we do not need (tokenizers >= 0.21)
    encode = getattr(_tok, "encode_batch_fast", _tok.encode_batch)
    return [e.ids + [_eot] for e in encode(texts, add_special_tokens=False)]


def _chunks(corpus: Path):
    """(ids, texts) chunks of a corpus JSONL file."""
    ids, texts = [], []
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            ids.append(rec["id"])
            texts.append(rec["text"])
            if len(texts) == CHUNK_DOCS:
                yield ids, texts
                ids, texts = [], []
    if texts:
        yield ids, texts


class ShardWriter:
    """Writes documents' tokens into numbered shard files, each completed under a temporary name."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._open()

    def _open(self) -> None:
        self.name = f"{self.split}_{len(self.shards):04d}"
        self.tokens: list[np.ndarray] = []
        self.offsets = [0]
        self.ids: list[str] = []

    def add(self, doc_id: str, ids: list[int]) -> None:
        self.tokens.append(np.asarray(ids, dtype=self.dtype))
        self.offsets.append(self.offsets[-1] + len(ids))
        self.ids.append(doc_id)
        if self.offsets[-1] >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.ids:
            return
        files = {}
        for ext, blob in (
            ("bin", np.concatenate(self.tokens).astype(self.dtype.newbyteorder("<")).tobytes()),
            ("idx", np.asarray(self.offsets, dtype="<i8").tobytes()),
            ("ids", ("\n".join(self.ids) + "\n").encode()),
        ):
            path = self.out_dir / f"{self.name}.{ext}"
            with atomic_open(path, "wb") as f:
                f.write(blob)
            files[ext] = {"path": path.name, "sha256": sha256_file(path)}
        self.shards.append(
            {"name": self.name, "docs": len(self.ids), "tokens": self.offsets[-1], "files": files}
        )
        self._open()


def build_shards(
    corpus_dir: Path, tokenizer_dir: Path, out_dir: Path, shard_tokens: int, workers: int
) -> dict:
    """Tokenise train and val splits into `out_dir`; return the shards record (also shards.json)."""
    from tokenizers import Tokenizer

    from trulyopen.data.tokenizer import EOT

    tokenizer_file = tokenizer_dir / "tokenizer.json"
    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*_*.*"):  # shards of an earlier, different run of this stage
        old.unlink()
    splits = {}
    for split in ("train", "val"):
        writer = ShardWriter(out_dir, split, dtype, shard_tokens)
        chunks = list(_chunks(corpus_dir / f"{split}.jsonl"))
        n_docs = sum(len(ids) for ids, _ in chunks)
        with Progress(f"shards {split}", n_docs) as bar:
            # one tokenizer thread per process when the processes already use every core
            init_args = (str(tokenizer_file), EOT, workers <= 1)
            encoded = ordered_map(_encode, (texts for _, texts in chunks), workers, _init, init_args)
            for (ids, texts), token_lists in zip(chunks, encoded, strict=True):
                for doc_id, toks in zip(ids, token_lists, strict=True):
                    writer.add(doc_id, toks)
                bar.update(len(ids), sum(len(t.encode()) for t in texts))
        writer.flush()
        splits[split] = {
            "docs": sum(s["docs"] for s in writer.shards),
            "tokens": sum(s["tokens"] for s in writer.shards),
            "shards": writer.shards,
        }
    fp = hashlib.sha256(sha256_file(tokenizer_file).encode())
    for split in ("train", "val"):
        for shard in splits[split]["shards"]:
            for ext in ("bin", "idx", "ids"):
                fp.update(shard["files"][ext]["sha256"].encode())
    record = {
        "dtype": dtype.name,
        "vocab_size": vocab,
        "eot_id": Tokenizer.from_file(str(tokenizer_file)).token_to_id(EOT),
        "tokenizer_sha256": sha256_file(tokenizer_file),
        "splits": splits,
        "fingerprint": fp.hexdigest(),
    }
    write_json(out_dir / "shards.json", record)
    return record


def read_document(shard_dir: Path, name: str, k: int) -> np.ndarray:
    """Tokens of document k of shard `name`, read through a memory map (no full load)."""
    meta = json.loads((shard_dir / "shards.json").read_text())
    offsets = np.memmap(shard_dir / f"{name}.idx", dtype="<i8", mode="r")
    tokens = np.memmap(shard_dir / f"{name}.bin", dtype=np.dtype(meta["dtype"]).newbyteorder("<"), mode="r")
    return np.asarray(tokens[offsets[k] : offsets[k + 1]])
