"""The index stage: an infini-gram suffix-array index over the training shards, one per shard file.

Each train shard (`data/shards/train_TTTTT_SS.bin`, its documents' tokens) becomes a folder of
infini-gram's own files, which its engine opens together (one engine shard per folder):

    data/index/train_TTTTT_SS/tokenized.0   each document as 0xFFFF (the separator) + its tokens,
                                            uint16 little-endian (uint32, separator 0xFFFFFFFF,
                                            when the vocabulary does not fit 65,535 ids)
                              offset.0      uint64 byte offset of each document in tokenized.0
                              metadata.0    one JSON line a document: {"id", "source", "license"}
                              metaoff.0     uint64 byte offset of each line in metadata.0
                              unigram.0     "token count" lines (span unigram probabilities)
                              table.0       the suffix array: infini-gram's Rust indexer sorts it
    data/index/index.json                   the folders, each file's sha256, tokens, bytes per token

We write infini-gram's input format ourselves (the tokens are already in our shards; the document
ids, sources and licences are ours) and let its `rust_indexing` binary, which ships in the
`infini-gram` wheel, build the suffix array: make-part on byte ranges, merge, concat, exactly as its
own indexer does. A suffix array is unique for its text, so the bytes do not depend on how many
parts or workers built them. The end-of-text token that ends each document in the shards is left
out: the separator marks the boundary, so no span crosses from one document into the next.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from trulyopen.errors import UserError
from trulyopen.files import sha256_file, write_json
from trulyopen.recipe import IndexConfig

OVERLAP = 100_000  # bytes each part reads past its end (infini-gram's HACK): suffixes compare that far
FILES = ("tokenized", "offset", "metadata", "metaoff", "unigram", "table")


def rust_indexing() -> Path:
    """infini-gram's indexer binary, from the installed wheel."""
    try:
        import infini_gram
    except ImportError as e:
        raise UserError("index: needs the infini-gram package: pip install 'trulyopen[trace]'") from e
    return Path(infini_gram.__file__).parent / "rust_indexing"


def token_width(vocab_size: int) -> int:
    """Bytes a token: 2 while every id stays below the separator 0xFFFF, else 4."""
    return 2 if vocab_size < 0xFFFF else 4


def index_shard(ctx: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
    """Build one index folder from a run of consecutive train shards (a data-executor task; it
    returns file names and hashes only)."""
    shards, out = Path(ctx["shards"]), Path(ctx["out"]) / task["name"]
    width = ctx["width"]
    dtype = np.dtype("<u2" if width == 2 else "<u4")
    src = np.dtype(ctx["shard_dtype"]).newbyteorder("<")
    licences = ctx["licenses"]

    tmp = Path(tempfile.mkdtemp(prefix=f".{task['name']}.", dir=ctx["out"]))
    sep = np.iinfo(dtype).max
    counts = np.zeros(ctx["vocab_size"], dtype=np.int64)
    byte_offsets, meta_offsets, written, meta_written, docs = [], [], 0, 0, 0
    with open(tmp / "tokenized.0", "wb") as ds, open(tmp / "metadata.0", "wb") as mt:
        for name in task["shards"]:
            # a shard is doc, eot, doc, eot...; the index wants sep, doc, sep, doc: the same length,
            # shifted by one token, with each document's start (the previous one's eot) made sep
            tokens = np.fromfile(shards / f"{name}.bin", dtype=src)
            offsets = np.fromfile(shards / f"{name}.idx", dtype="<i8")
            shifted = np.roll(tokens.astype(dtype), 1)
            shifted[offsets[:-1]] = sep
            ds.write(shifted.tobytes())
            counts += np.bincount(tokens, minlength=len(counts))
            counts[ctx["eot_id"]] -= len(offsets) - 1  # the eots are not in the index
            byte_offsets.append(offsets[:-1] * width + written)
            written += len(shifted) * width
            lines = []
            for doc_id in (shards / f"{name}.ids").read_text().splitlines():
                source = doc_id.split("/", 1)[0]
                line = json.dumps({"id": doc_id, "source": source, "license": licences.get(source)}) + "\n"
                meta_offsets.append(meta_written)
                meta_written += len(line.encode())
                lines.append(line)
            mt.write("".join(lines).encode())
            docs += len(offsets) - 1
    byte_offsets = np.concatenate(byte_offsets) if byte_offsets else np.zeros(0, dtype=np.int64)
    np.array(byte_offsets, dtype="<u8").tofile(tmp / "offset.0")
    np.array(meta_offsets, dtype="<u8").tofile(tmp / "metaoff.0")
    lines = [f"{t} {int(c)}" for t, c in enumerate(counts) if c]
    lines.append(f"{sep} {docs}")  # the separators: the engine checks that every token is counted
    (tmp / "unigram.0").write_text("\n".join(lines) + "\n")
    _suffix_array(tmp / "tokenized.0", tmp / "table.0", width, ctx["part_bytes"], ctx["threads"])

    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    files = {n: {"path": f"{task['name']}/{n}.0", "sha256": sha256_file(out / f"{n}.0")} for n in FILES}
    tokens = written // width
    return {"name": task["name"], "from": task["shards"], "docs": docs, "tokens": tokens, "files": files}


def groups(shards: list[dict], group_tokens: int) -> list[list[str]]:
    """Consecutive train shards, gathered until a group holds `group_tokens` tokens: every query
    searches each index folder (infini-gram starts a thread for each), so a corpus cut into many
    small task shards is indexed as a few larger ones, and a large corpus keeps one per shard."""
    out: list[list[str]] = [[]]
    held = 0
    for s in shards:
        if out[-1] and held + s["tokens"] > group_tokens:
            out.append([])
            held = 0
        out[-1].append(s["name"])
        held += s["tokens"]
    return [g for g in out if g]


def _suffix_array(data: Path, table: Path, width: int, part_bytes: int, threads: int) -> None:
    """infini-gram's three steps: sort byte ranges (parts), merge them, concatenate the result."""
    binary, size = str(rust_indexing()), data.stat().st_size
    ratio = max(1, math.ceil(math.log2(size) / 8))  # bytes a pointer
    # the merge takes every part but the last to run exactly OVERLAP bytes past its range: ranges of
    # at least OVERLAP bytes keep that true
    parts = max(1, min(max(math.ceil(size / part_bytes), threads), size // (2 * OVERLAP)))
    step = -(-size // parts)
    step += (-step) % width  # whole tokens a part
    with tempfile.TemporaryDirectory(prefix="parts.", dir=data.parent) as work:
        parts_dir, merged = Path(work) / "parts", Path(work) / "merged"
        parts_dir.mkdir()
        merged.mkdir()
        common = ["--data-file", str(data), "--ratio", str(ratio), "--token-width", str(width)]
        starts = list(range(0, size, step))
        make = [binary, "make-part", *common, "--parts-dir", str(parts_dir)]
        for batch in range(0, len(starts), threads):  # `threads` parts sorted at once
            ranges = [(a, min(a + step + OVERLAP, size)) for a in starts[batch : batch + threads]]
            _run(*[[*make, "--start-byte", str(a), "--end-byte", str(b)] for a, b in ranges])
        _run([binary, "merge", *common, "--parts-dir", str(parts_dir), "--merged-dir", str(merged),
              "--num-threads", str(threads), "--hacksize", str(OVERLAP)])  # fmt: skip
        _run([binary, "concat", *common, "--merged-dir", str(merged), "--merged-file", str(table),
              "--num-threads", str(threads)])  # fmt: skip


def _run(*cmds: list[str]) -> None:
    """Run the commands side by side; raise if any fails."""
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in cmds]
    for cmd, proc in zip(cmds, procs, strict=True):
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"index: rust_indexing {cmd[1]} failed ({proc.returncode}): {err[-500:]}")


def build_index(
    shards_dir: Path,
    out_dir: Path,
    licenses: dict[str, str],
    executor: Any,
    cfg: IndexConfig,
    key: dict,
) -> dict:
    """Index every train shard of `shards_dir` into `out_dir`; return the record (also index.json)."""
    from trulyopen.data.executor import TaskStep, open_work, run_step

    record = json.loads((shards_dir / "shards.json").read_text())
    width = token_width(record["vocab_size"])
    work = out_dir.with_name(out_dir.name + "_work")
    open_work(work, key, fresh=False)
    if not (work / "steps").exists():
        shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".train_*"):  # a folder a killed task was building: built again
        shutil.rmtree(stale, ignore_errors=True)
    ctx = {
        "shards": str(shards_dir),
        "out": str(out_dir),
        "width": width,
        "shard_dtype": record["dtype"],
        "vocab_size": record["vocab_size"],
        "eot_id": record["eot_id"],
        "licenses": licenses,
        "part_bytes": cfg.part_bytes,
        "threads": 1,
    }
    train = record["splits"]["train"]["shards"]
    tasks = [{"name": f"train_{i:05d}", "shards": g} for i, g in enumerate(groups(train, cfg.group_tokens))]
    ctx["threads"] = max(1, (os.cpu_count() or 1) // max(1, len(tasks)))  # the cores the tasks leave
    step = TaskStep("index", "trulyopen.trace.index:index_shard", ctx, tasks, str(work / "steps" / "index"))
    results = run_step(executor, step)
    tokens = sum(r["tokens"] for r in results)
    size = sum((out_dir / f["path"]).stat().st_size for r in results for f in r["files"].values())
    index = {
        "engine": "infini-gram",
        "token_width": width,
        "eot_id": record["eot_id"],
        "vocab_size": record["vocab_size"],
        "tokenizer_sha256": record["tokenizer_sha256"],
        "shards_fingerprint": record["fingerprint"],
        "docs": sum(r["docs"] for r in results),
        "tokens": tokens,
        "bytes": size,
        "bytes_per_token": round(size / max(tokens, 1), 3),
        "shards": results,
    }
    write_json(out_dir / "index.json", index)
    shutil.rmtree(work, ignore_errors=True)
    return index


def index_files(out_dir: Path) -> list[Path]:
    index = json.loads((out_dir / "index.json").read_text())
    files = [out_dir / f["path"] for s in index["shards"] for f in s["files"].values()]
    return sorted([*files, out_dir / "index.json"])


def check_index(index_dir: Path, shards_dir: Path | None, samples: int = 2000) -> list[str]:
    """Problems with an index: files that are not the recorded ones, documents that are not the
    shards' (where the shards are at hand), a table that is not sorted (spot checks of adjacent
    suffixes). An empty list means it is sound."""
    problems: list[str] = []
    manifest = index_dir / "index.json"
    if not manifest.is_file():
        return [f"{manifest}: missing"]
    index = json.loads(manifest.read_text())
    width = index["token_width"]
    dtype = np.dtype("<u2" if width == 2 else "<u4")
    shards = json.loads((shards_dir / "shards.json").read_text()) if shards_dir else None
    if shards and shards["fingerprint"] != index["shards_fingerprint"]:
        problems.append(f"{manifest}: made from other shards (fingerprint differs from shards.json)")
    rng = np.random.default_rng(0)
    for shard in index["shards"]:
        for f in shard["files"].values():
            path = index_dir / f["path"]
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif sha256_file(path) != f["sha256"]:
                problems.append(f"{path}: changed since it was built (sha256 differs from index.json)")
        folder = index_dir / shard["name"]
        if not all((folder / f"{n}.0").is_file() for n in FILES):
            continue
        data = np.fromfile(folder / "tokenized.0", dtype=dtype)
        table = np.fromfile(folder / "table.0", dtype=np.uint8)
        if len(data) == 0 or len(table) % len(data):
            problems.append(f"{folder / 'table.0'}: {len(table)} bytes for {len(data)} tokens")
            continue
        ratio = len(table) // len(data)
        ptrs = np.zeros(len(data), dtype=np.uint64)
        for b in range(ratio):  # little-endian pointers of `ratio` bytes
            ptrs |= table[b::ratio].astype(np.uint64) << np.uint64(8 * b)
        if (ptrs % width).any() or (ptrs >= len(data) * width).any():
            problems.append(f"{folder / 'table.0'}: pointers outside the tokens")
            continue
        raw = data.tobytes()
        for i in rng.integers(0, len(ptrs) - 1, size=min(samples, len(ptrs) - 1)) if len(ptrs) > 1 else []:
            a, b = int(ptrs[i]), int(ptrs[i + 1])
            if raw[a : a + 64] > raw[b : b + 64]:  # infini-gram sorts suffixes as byte strings
                problems.append(f"{folder / 'table.0'}: not sorted at rank {i}")
                break
        if shards and all((shards_dir / f"{name}.bin").is_file() for name in shard["from"]):
            from trulyopen.data.shards import read_documents

            docs = [d for name in shard["from"] for d in read_documents(shards_dir, name, shards["dtype"])]
            if not np.array_equal(data[data != np.iinfo(dtype).max], np.concatenate(docs).astype(dtype)):
                problems.append(f"{folder / 'tokenized.0'}: not the tokens of {', '.join(shard['from'])}")
    return problems
