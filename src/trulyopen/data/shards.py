"""The shards stage: tokenise the corpus into flat memory-mapped token arrays, one task at a time.

Each split's corpus file is cut into line-aligned byte ranges (tasks; the layout depends on the
corpus only). A task encodes its documents, each followed by the end-of-text token, and writes its
own shard files as numpy arrays, starting a new one past `shard_tokens` tokens:

    data/shards/train_00000_00.bin   tokens, little-endian uint16 (uint32 when the vocabulary needs it)
    data/shards/train_00000_00.idx   int64 offsets: document k is tokens[idx[k]:idx[k+1]]
    data/shards/train_00000_00.ids   one document id per line, in the same order

Encoding uses fastokens (a Rust re-implementation of `tokenizers`' encoder, tens of times faster on
one core) where it is installed and gives the same ids as `tokenizers` on each task's first chunk;
otherwise `tokenizers` itself. The tasks run through the data stage's executor (local processes,
Ray, Slurm) and hand back only file names and hashes, never tokens. `shards.json` then indexes
every file in order, with its sha256 and a fingerprint of the whole tokenised set (the tokenizer's
hash and every shard's hash, in order), which later stages use to tie training order and
checkpoints to exactly this data. The bytes do not depend on where or on how many workers the
tasks ran.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from trulyopen.data.executor import TaskStep, open_work, run_step
from trulyopen.data.tasks import line_ranges, task_size
from trulyopen.files import atomic_open, remember_sha256, sha256_bytes, sha256_file, write_json
from trulyopen.recipe import ShardsConfig

CHUNK_DOCS = 256  # documents per encode_batch call
CHECK_DOCS = 16  # documents of each task encoded by both encoders, which must agree
TASK_BYTES = 64_000_000  # largest task of corpus JSONL


@functools.cache
def _tokenizer(path: str, stamp: tuple[int, int]):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


@functools.cache
def _fast_tokenizer(path: str, stamp: tuple[int, int]):
    """fastokens' Rust re-implementation of the same tokenizer.json (tens of MB/s on one core, where
    `tokenizers` does one or two), or None where it is not installed or cannot load this file."""
    try:
        import fastokens

        return fastokens.Tokenizer.from_file(path)
    except Exception:  # not installed, or a tokenizer.json feature it lacks: `tokenizers` does it all
        return None


def _encoder(path: str, texts: list[str]):
    """The fastest encoder that gives the same ids as `tokenizers` on these texts (a task's first
    CHECK_DOCS documents: `tokenizers` takes as long on them as fastokens on the whole chunk)."""
    st = os.stat(path)
    reference = _tokenizer(path, (st.st_mtime_ns, st.st_size))
    fast = _fast_tokenizer(path, (st.st_mtime_ns, st.st_size))
    slow = getattr(reference, "encode_batch_fast", reference.encode_batch)  # no offsets (>= 0.21)
    if fast is not None:
        want = [e.ids for e in slow(texts, add_special_tokens=False)]
        if [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)] == want:
            return fast.encode_batch, "fastokens"
    return slow, "tokenizers"


class ShardWriter:
    """Streams documents' tokens into numbered shard files: tokens go to the .bin file as they come
    (hashed on the way), so a task holds its offsets and ids, not its tokens; each file is renamed
    into place when complete."""

    def __init__(self, out_dir: Path, prefix: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.prefix, self.shard_tokens = out_dir, prefix, shard_tokens
        self.dtype = dtype.newbyteorder("<")
        self.shards: list[dict[str, Any]] = []
        self._open()

    def _open(self) -> None:
        self.name = f"{self.prefix}_{len(self.shards):02d}"
        self.bin = self.out_dir / f"{self.name}.bin"
        self.tmp = self.bin.with_name(f"{self.bin.name}.tmp-{os.getpid()}")
        self.file = open(self.tmp, "wb")
        self.hash = hashlib.sha256()
        self.offsets = [0]
        self.ids: list[str] = []

    def add(self, doc_id: str, ids: np.ndarray) -> None:
        blob = ids.astype(self.dtype, copy=False).tobytes()
        self.file.write(blob)
        self.hash.update(blob)
        self.offsets.append(self.offsets[-1] + len(ids))
        self.ids.append(doc_id)
        if self.offsets[-1] >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        self.file.close()
        if not self.ids:
            self.tmp.unlink()
            return
        os.replace(self.tmp, self.bin)  # no fsync: its hash (in shards.json and the ledger) stands for it
        files = {"bin": {"path": self.bin.name, "sha256": self.hash.hexdigest()}}
        for ext, blob in (
            ("idx", np.asarray(self.offsets, dtype="<i8").tobytes()),
            ("ids", ("\n".join(self.ids) + "\n").encode()),
        ):
            path = self.out_dir / f"{self.name}.{ext}"
            with atomic_open(path, "wb", durable=False) as f:
                f.write(blob)
            files[ext] = {"path": path.name, "sha256": sha256_bytes(blob)}
        self.shards.append(
            {"name": self.name, "docs": len(self.ids), "tokens": self.offsets[-1], "files": files}
        )
        self._open()

    def close(self) -> None:
        """Finish the last shard (none is left open)."""
        self.flush()
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def shard_task(ctx: dict, task: dict) -> dict[str, Any]:
    """Tokenise one byte range of a split's corpus file into the task's own shard files."""
    from trulyopen.data.sources import read_lines

    eot = ctx["eot_id"]
    dtype = np.dtype(ctx["dtype"])
    writer = ShardWriter(Path(ctx["out"]), f"{task['split']}_{task['index']:05d}", dtype, ctx["shard_tokens"])
    ids, texts, docs, nbytes = [], [], 0, 0
    encode, encoder = None, None

    def flush() -> None:
        nonlocal encode, encoder
        if encode is None:  # checked against `tokenizers` on the task's first chunk
            encode, encoder = _encoder(ctx["tokenizer"], texts[:CHECK_DOCS])
        for doc_id, enc in zip(ids, encode(texts, add_special_tokens=False), strict=True):
            tokens = np.empty(len(enc.ids) + 1, dtype=dtype)
            tokens[:-1] = enc.ids
            tokens[-1] = eot
            writer.add(doc_id, tokens)
        ids.clear()
        texts.clear()

    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per task: the tasks fill the cores
    try:
        for line in read_lines(task["file"], task["start"], task["stop"]):
            rec = json.loads(line)
            ids.append(rec["id"])
            texts.append(rec["text"])
            docs += 1
            nbytes += len(line) + 1
            if len(texts) == CHUNK_DOCS:
                flush()
        flush()
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
    writer.close()
    return {"docs": docs, "bytes": nbytes, "shards": writer.shards, "encoder": encoder}


def build_shards(
    corpus_dir: Path,
    tokenizer_dir: Path,
    out_dir: Path,
    cfg: ShardsConfig,
    executor: Any,
    key: dict[str, Any],
    fresh: bool = False,
) -> dict:
    """Tokenise train and val splits into `out_dir`; return the shards record (also shards.json).
    Finished tasks (data/shards_work/) are kept for the same key, so a killed stage resumes."""
    from tokenizers import Tokenizer

    from trulyopen.data.tokenizer import EOT

    tokenizer_file = tokenizer_dir / "tokenizer.json"
    tok = Tokenizer.from_file(str(tokenizer_file))
    vocab = tok.get_vocab_size()
    dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)
    work = out_dir.with_name(out_dir.name + "_work")
    open_work(work, key, fresh)
    if not (work / "steps").exists():  # a new start: shards of an earlier, different run of this stage go
        shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = {
        "tokenizer": str(tokenizer_file),
        "eot_id": tok.token_to_id(EOT),
        "dtype": dtype.name,
        "out": str(out_dir),
        "shard_tokens": cfg.shard_tokens,
    }
    tasks = []
    for split in ("train", "val"):
        corpus = corpus_dir / f"{split}.jsonl"
        size = task_size(corpus.stat().st_size, TASK_BYTES)
        for a, b, _ in line_ranges(corpus, size):
            tasks.append(
                {
                    "split": split,
                    "index": sum(t["split"] == split for t in tasks),
                    "file": str(corpus),
                    "start": a,
                    "stop": b,
                }
            )
    step = TaskStep("shards", "trulyopen.data.shards:shard_task", ctx, tasks, str(work / "steps" / "shards"))
    results = run_step(executor, step)
    splits = {}
    for split in ("train", "val"):
        parts = [s for t, r in zip(tasks, results, strict=True) if t["split"] == split for s in r["shards"]]
        splits[split] = {
            "docs": sum(s["docs"] for s in parts),
            "tokens": sum(s["tokens"] for s in parts),
            "shards": parts,
        }
    for shard in (s for split in splits.values() for s in split["shards"]):  # hashed by the tasks
        for f in shard["files"].values():
            remember_sha256(out_dir / f["path"], f["sha256"])
    tokenizer_sha = sha256_file(tokenizer_file)
    fp = hashlib.sha256(tokenizer_sha.encode())
    for split in ("train", "val"):
        for shard in splits[split]["shards"]:
            for ext in ("bin", "idx", "ids"):
                fp.update(shard["files"][ext]["sha256"].encode())
    record = {
        "encoders": sorted({r["encoder"] for r in results if r["encoder"]}),
        "dtype": dtype.name,
        "vocab_size": vocab,
        "eot_id": tok.token_to_id(EOT),
        "tokenizer_sha256": tokenizer_sha,
        "splits": splits,
        "fingerprint": fp.hexdigest(),
    }
    write_json(out_dir / "shards.json", record)
    for stale in out_dir.glob("*.tmp-*"):  # left by a task that was killed
        stale.unlink()
    shutil.rmtree(work, ignore_errors=True)
    return record


def read_document(shard_dir: Path, name: str, k: int) -> np.ndarray:
    """Tokens of document k of shard `name`, read through a memory map (no full load)."""
    meta = json.loads((shard_dir / "shards.json").read_text())
    offsets = np.memmap(shard_dir / f"{name}.idx", dtype="<i8", mode="r")
    tokens = np.memmap(shard_dir / f"{name}.bin", dtype=np.dtype(meta["dtype"]).newbyteorder("<"), mode="r")
    return np.asarray(tokens[offsets[k] : offsets[k + 1]])


def read_documents(shard_dir: Path, name: str, dtype: str) -> list[np.ndarray]:
    """Every document of shard `name` (`dtype`: shards.json's), without its end-of-text token."""
    tokens = np.fromfile(shard_dir / f"{name}.bin", dtype=np.dtype(dtype).newbyteorder("<"))
    offsets = np.fromfile(shard_dir / f"{name}.idx", dtype="<i8")
    return [tokens[a : b - 1] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
