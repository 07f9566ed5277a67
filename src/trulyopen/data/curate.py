"""The data stage: read every source, clean, filter, deduplicate, decontaminate and split, by task.

    plan      inputs cut into logical tasks (trulyopen.data.tasks), fixed by the corpus
    analyse   per task: read ─► clean ─► filter; content hash, MinHash signature and LSH band keys,
              eval n-gram matches (one broadcast set); written as per-task files
    exact     per hash partition: documents with the same content hash; the first in corpus order stays
    bands     per (band, key partition): LSH buckets ─► candidate pairs ─► verified on the signatures
    clusters  one process: connected components of the verified pairs; the smallest document stays
    write     per task: drop duplicates and eval overlap, split train/val by id hash
    gather    the per-task parts, concatenated in task order into data/corpus/{train,val}.jsonl

Each step runs its tasks through the executor (local processes, Ray, Slurm: `data.executor`) and
one process holds one task, never the corpus; a document's global id is (task << 32) | row, so
"smallest id" means "first in corpus order" wherever and on however many workers the tasks ran,
and the output bytes never depend on that. Every step records documents and bytes in and out and
why each removed document went; `data/removed.jsonl` lists every removed document.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trulyopen.data.clean import clean_text, filter_reasons
from trulyopen.data.decontam import Decontaminator, eval_set_files, load_eval_ngrams
from trulyopen.data.dedup import EMPTY, MinHasher, band_keys, bucket_pairs, find
from trulyopen.data.executor import TaskStep, open_work, run_step
from trulyopen.data.sources import DataError, Document, File, Problem, read_task
from trulyopen.data.tasks import plan as plan_tasks
from trulyopen.files import atomic_open, remember_sha256, write_json
from trulyopen.recipe import DataConfig

CHUNK_DOCS = 256  # documents filtered and signed together (numpy calls per batch, not per text)
MAX_EXACT_PARTITIONS = 64
TASKS_PER_BAND_PARTITION = 16  # each band is cut so that one of its partitions holds ~16 tasks' keys
LENGTH_BINS = np.logspace(0, 8, 81)  # document length histogram: characters, 10 bins per decade
FIRST_PROBLEMS = 100  # problems kept in curation.json; all of them are in problems.jsonl
GID_SHIFT = np.uint64(32)


@dataclass
class Step:
    """Documents and bytes into and out of one step, and the reasons for what it removed."""

    name: str
    docs_in: int = 0
    bytes_in: int = 0
    docs_out: int = 0
    bytes_out: int = 0
    removed: Counter = field(default_factory=Counter)
    removed_bytes: Counter = field(default_factory=Counter)
    changed: Counter = field(default_factory=Counter)  # edits that keep the document (PII, control chars)

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.name,
            "docs_in": self.docs_in,
            "bytes_in": self.bytes_in,
            "docs_out": self.docs_out,
            "bytes_out": self.bytes_out,
            "removed": dict(sorted(self.removed.items())),
            "removed_bytes": dict(sorted(self.removed_bytes.items())),
            "changed": dict(sorted(self.changed.items())),
        }

    def add(self, other: dict[str, Any]) -> None:
        """Add a task's tally of this step (its as_dict())."""
        for k in ("docs_in", "bytes_in", "docs_out", "bytes_out"):
            setattr(self, k, getattr(self, k) + other[k])
        for k in ("removed", "removed_bytes", "changed"):
            getattr(self, k).update(other[k])

    def remove(self, reason: str, nbytes: int) -> None:
        self.removed[reason] += 1
        self.removed_bytes[reason] += nbytes


def split_of(doc_id: str, val_fraction: float) -> str:
    """'val' or 'train' from a hash of the document id: stable when other documents come and go."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")
    return "val" if h < val_fraction * 2**64 else "train"


def _task_dir(ctx: dict, step: str, t: int) -> Path:
    return Path(ctx["work"]) / step / f"{t:05d}"


@functools.cache
def _config(blob: str) -> DataConfig:
    return DataConfig.model_validate(json.loads(blob))


@functools.cache
def _minhasher(blob: str) -> MinHasher:
    return MinHasher(_config(blob).dedup)


@functools.cache
def _decontaminator(path: str, stamp: tuple[int, int], n: int) -> Decontaminator:
    with np.load(path) as z:
        names = json.loads(str(z["names"]))
        return Decontaminator({name: z[f"set{k}"] for k, name in enumerate(names)}, n)


def _removed_record(doc_id: str, fields: dict, step: str, reason: str, **extra: Any) -> str:
    """A removed.jsonl line; the source's meta_fields travel with it, where it has any."""
    record = {"id": doc_id, "step": step, "reason": reason, **extra}
    if fields:
        record["meta"] = fields
    return json.dumps(record, ensure_ascii=False) + "\n"


# ----------------------------------------------------------------------------- analyse (per input task)


def analyse_task(ctx: dict, task: dict) -> dict[str, Any]:
    """Read, clean and filter one task's documents; hash, sign and check the ones that stay."""
    cfg = _config(ctx["config"])
    src = cfg.sources[task["source"]]
    t = task["index"]
    out = _task_dir(ctx, "analyse", t)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    read, clean, filt = Step("read"), Step("clean"), Step("filter")
    read.bytes_in = task["bytes"]
    minhasher = _minhasher(ctx["config"]) if cfg.dedup.near else None
    decon = None
    if ctx["eval_ngrams"]:  # cached per process, keyed by the file's identity
        st = Path(ctx["eval_ngrams"]).stat()
        decon = _decontaminator(ctx["eval_ngrams"], (st.st_mtime_ns, st.st_size), cfg.decontamination.ngram)
    n_problems, nbytes, chars, val, hashes, sigs, contaminated, ids = 0, [], [], [], [], [], [], []
    chunk: list[tuple[Document, str, bytes]] = []  # (document, cleaned text, its UTF-8), filtered together

    def flush(kept, removed) -> None:
        reasons = filter_reasons([text for _, text, _ in chunk], cfg.filters)
        passed = []
        for (doc, text, data), reason in zip(chunk, reasons, strict=True):
            size = len(data)
            if reason is not None:
                filt.remove(reason, size)
                fields = {f: doc.meta[f] for f in src.meta_fields}
                removed.write(_removed_record(doc.id, fields, "filter", reason))
                continue
            row = len(nbytes)
            record = {"id": doc.id, "source": doc.source, "meta": doc.meta, "text": text}
            kept.write(json.dumps(record, ensure_ascii=False) + "\n")
            ids.append(doc.id)
            nbytes.append(size)
            chars.append(len(text))
            val.append(split_of(doc.id, cfg.split.val_fraction) == "val")
            hashes.append(hashlib.sha256(data).digest()[:16])
            matches = decon.matches(text) if decon is not None else []
            if matches:
                contaminated.append([row, matches])
            passed.append(text)
        if minhasher is not None and passed:
            sigs.append(minhasher.signatures(passed))
        chunk.clear()

    with (
        open(tmp / "kept.jsonl", "w", encoding="utf-8") as kept,
        open(tmp / "removed.jsonl", "w", encoding="utf-8") as removed,
        open(tmp / "problems.jsonl", "w", encoding="utf-8") as problems,
    ):
        for item in read_task(src, task, cfg.clean.undecodable):
            if isinstance(item, Problem):
                if cfg.strict:
                    raise DataError(f"{item} (data.strict is set; unset it to skip and count such input)")
                n_problems += 1
                problems.write(json.dumps(vars(item), ensure_ascii=False) + "\n")
                reason = item.reason.split(" at ")[0]  # "invalid UTF-8 at byte 3" counts as "invalid UTF-8"
                read.docs_in += 1
                read.remove(reason, item.nbytes)
                continue
            doc: Document = item
            read.docs_in += 1
            read.docs_out += 1
            read.bytes_out += len(doc.text.encode())
            if doc.meta.pop("replaced_bytes", False):
                read.changed["invalid_utf8_replaced"] += 1
            text, changes = clean_text(doc.text, cfg.clean, cfg.pii)
            clean.changed.update(changes)
            data = text.encode()
            clean.bytes_out += len(data)
            chunk.append((doc, text, data))
            if len(chunk) == CHUNK_DOCS:
                flush(kept, removed)
        flush(kept, removed)
    clean.docs_in = clean.docs_out = filt.docs_in = read.docs_out
    clean.bytes_in = read.bytes_out
    filt.bytes_in = clean.bytes_out
    filt.docs_out, filt.bytes_out = len(nbytes), int(sum(nbytes))

    n = len(nbytes)
    np.save(tmp / "nbytes.npy", np.asarray(nbytes, dtype=np.int64))
    np.save(tmp / "chars.npy", np.asarray(chars, dtype=np.int64))
    np.save(tmp / "val.npy", np.asarray(val, dtype=bool))
    _write_ids(tmp, ids)
    h = np.frombuffer(b"".join(hashes), dtype="<u8").reshape(n, 2) if n else np.zeros((0, 2), np.uint64)
    row_ids = np.arange(n, dtype=np.uint64)
    _write_partitioned(tmp / "exact", h[:, 0], np.column_stack([h, row_ids]), ctx["exact_partitions"])
    if minhasher is not None:
        sig = np.concatenate(sigs) if sigs else np.zeros((0, cfg.dedup.num_perm), np.uint32)
        np.save(tmp / "sig.npy", sig)
        rows = np.flatnonzero((sig != EMPTY).any(axis=1))  # a text without shingles is never clustered
        keys = band_keys(sig, cfg.dedup.bands)  # [n, bands]
        parts = ctx["band_partitions"]
        # one entry per (document, band), ordered by partition = band * parts + key % parts
        band = np.repeat(np.arange(cfg.dedup.bands, dtype=np.uint64)[None], len(rows), 0).ravel()
        key = keys[rows].ravel()
        where = band * np.uint64(parts) + key % np.uint64(parts)
        entries = np.stack([key, np.repeat(rows.astype(np.uint64), cfg.dedup.bands)], axis=1)
        _write_partitioned(tmp / "bands", where, entries, cfg.dedup.bands * parts)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {
        "docs": read.docs_in,
        "bytes": read.bytes_out,  # text read (decompressed): what the progress line counts
        "kept": n,
        "problems": n_problems,
        "contaminated": contaminated,
        "steps": [s.as_dict() for s in (read, clean, filt)],
    }


def _write_ids(folder: Path, ids: list[str]) -> None:
    """ids.txt (one JSON string per line) and ids_offsets.npy (byte offsets), for lookups by row."""
    lines = [(json.dumps(i, ensure_ascii=False) + "\n").encode() for i in ids]
    np.save(folder / "ids_offsets.npy", np.cumsum([0] + [len(x) for x in lines]).astype(np.int64))
    (folder / "ids.txt").write_bytes(b"".join(lines))


def _write_partitioned(base: Path, partition: np.ndarray, rows: np.ndarray, parts: int) -> None:
    """Entries (whose last column is the row) sorted stably by partition, with each partition's
    offsets: base.npy, base_offsets.npy. A later step reads only its own partition's slice."""
    part = (partition % np.uint64(parts)).astype(np.int64)
    order = np.argsort(part, kind="stable")
    np.save(f"{base}.npy", np.ascontiguousarray(rows[order]))
    np.save(f"{base}_offsets.npy", np.r_[0, np.cumsum(np.bincount(part, minlength=parts))].astype(np.int64))


def _gather_partition(ctx: dict, name: str, p: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(entries of partition p from every analyse task, without the row column; their global ids)."""
    parts, gids = [], []
    for t in ctx["kept_tasks"]:
        folder = _task_dir(ctx, "analyse", t)
        off = np.load(folder / f"{name}_offsets.npy")
        if off[p + 1] > off[p]:
            data = np.asarray(np.load(folder / f"{name}.npy", mmap_mode="r")[off[p] : off[p + 1]])
            parts.append(data[:, :-1])
            gids.append(data[:, -1] | (np.uint64(t) << GID_SHIFT))
    if not parts:
        return np.zeros((0, width), np.uint64), np.zeros(0, np.uint64)
    return np.concatenate(parts), np.concatenate(gids)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        np.save(f, array)


def _cluster_sizes(rep_of_removed: np.ndarray) -> dict[str, int]:
    """cluster size -> number of clusters, from the representative of every removed document."""
    copies = Counter(Counter(rep_of_removed.tolist()).values())
    return {str(k + 1): v for k, v in sorted(copies.items())}


# ----------------------------------------------------------------------------- exact dedup (per partition)


def exact_task(ctx: dict, task: dict) -> dict[str, Any]:
    """Documents of one hash partition with the same content hash: all but the first go."""
    p = task["partition"]
    h, gid = _gather_partition(ctx, "exact", p, 2)
    pairs = np.zeros((0, 2), np.uint64)
    if len(gid):
        order = np.lexsort((gid, h[:, 1], h[:, 0]))  # by hash, then corpus order
        h, gid = h[order], gid[order]
        first = np.r_[True, (h[1:] != h[:-1]).any(axis=1)]
        rep = gid[np.maximum.accumulate(np.where(first, np.arange(len(gid)), 0))]
        pairs = np.stack([gid[~first], rep[~first]], axis=1)
        pairs = pairs[np.argsort(pairs[:, 0])]
    _save(Path(ctx["work"]) / "exact" / f"{p:05d}.npy", pairs)
    return {"clusters": _cluster_sizes(pairs[:, 1])}


def _exact_removed(ctx: dict) -> np.ndarray:
    """Global ids of every exact duplicate (small: duplicates only), sorted."""
    parts = [np.load(f)[:, 0] for f in sorted((Path(ctx["work"]) / "exact").glob("*.npy"))]
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)


# ----------------------------------------------------------------------------- near dedup


def _signature_rows(ctx: dict, gids: np.ndarray) -> np.ndarray:
    """Signatures of documents by global id, read from their tasks' memory-mapped files."""
    out = np.empty((len(gids), _config(ctx["config"]).dedup.num_perm), np.uint32)
    tasks, rows = gids >> GID_SHIFT, gids & np.uint64(0xFFFFFFFF)
    for t in np.unique(tasks):
        sel = tasks == t
        sig = np.load(_task_dir(ctx, "analyse", int(t)) / "sig.npy", mmap_mode="r")
        out[sel] = sig[rows[sel].astype(np.int64)]
    return out


def band_task(ctx: dict, task: dict) -> dict[str, Any]:
    """One (band, key partition): LSH buckets, their candidate pairs, and the pairs whose
    signatures agree on at least `threshold` of the permutations."""
    cfg = _config(ctx["config"]).dedup
    p = task["partition"]
    keys, gid = _gather_partition(ctx, "bands", p, 1)
    alive = ~np.isin(gid, np.load(Path(ctx["work"]) / "exact_removed.npy"))  # as if after exact dedup
    keys, gid = keys[alive, 0], gid[alive]
    order = np.lexsort((gid, keys))
    keys, gid = keys[order], gid[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    sizes = np.diff(np.r_[starts, len(keys)])
    pairs = [bucket_pairs(gid[a : a + n]) for a, n in zip(starts[sizes > 1], sizes[sizes > 1], strict=True)]
    verified = np.zeros((0, 2), np.uint64)
    candidates = 0
    if pairs:
        cand = np.unique(np.concatenate(pairs), axis=0)
        candidates = len(cand)
        similar = (_signature_rows(ctx, cand[:, 0]) == _signature_rows(ctx, cand[:, 1])).mean(axis=1)
        verified = cand[similar >= cfg.threshold]
    _save(Path(ctx["work"]) / "bands" / f"{p:05d}.npy", verified)
    return {"candidates": candidates, "verified": len(verified)}


def clusters_task(ctx: dict, task: dict) -> dict[str, Any]:
    """Connected components of every verified pair; each keeps its smallest global id."""
    files = sorted((Path(ctx["work"]) / "bands").glob("*.npy"))
    edges = np.concatenate([np.load(f) for f in files]) if files else np.zeros((0, 2), np.uint64)
    removed = np.zeros((0, 2), np.uint64)
    if len(edges):
        edges = np.unique(edges, axis=0)
        nodes, inverse = np.unique(edges, return_inverse=True)  # sorted: a smaller index is a smaller id
        inverse = inverse.reshape(-1, 2)
        parent = np.arange(len(nodes))
        for i, j in inverse:
            ri, rj = find(parent, int(i)), find(parent, int(j))
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
        rep = np.array([find(parent, i) for i in range(len(nodes))])
        moved = rep != np.arange(len(nodes))
        removed = np.stack([nodes[moved], nodes[rep[moved]]], axis=1)
    _save(Path(ctx["work"]) / "near_removed.npy", removed)
    return {"clusters": _cluster_sizes(removed[:, 1]), "edges": len(edges)}


# ----------------------------------------------------------------------------- write (per input task)


class _Ids:
    """Document ids by global id, read from the analyse tasks' ids files (duplicates' originals).
    One per write task: its cache of offsets goes with it (a worker runs many tasks)."""

    def __init__(self, ctx: dict):
        self.ctx = ctx
        self.offsets: dict[int, np.ndarray] = {}

    def __getitem__(self, gid: int) -> str:
        t, row = gid >> 32, gid & 0xFFFFFFFF
        folder = _task_dir(self.ctx, "analyse", t)
        if t not in self.offsets:
            self.offsets[t] = np.load(folder / "ids_offsets.npy")
        offsets = self.offsets[t]
        with open(folder / "ids.txt", "rb") as f:
            f.seek(int(offsets[row]))
            return json.loads(f.read(int(offsets[row + 1] - offsets[row])))


def _task_slice(pairs: np.ndarray, t: int) -> dict[int, int]:
    """row -> representative global id, for the removed documents of task t."""
    lo, hi = np.searchsorted(pairs[:, 0], [np.uint64(t) << GID_SHIFT, np.uint64(t + 1) << GID_SHIFT])
    return {int(g) & 0xFFFFFFFF: int(r) for g, r in pairs[lo:hi]}


def write_task(ctx: dict, task: dict) -> dict[str, Any]:
    """The task's documents that stay, split into train and val; removed ones named with their
    step and reason."""
    cfg = _config(ctx["config"])
    t = task["index"]
    src = Path(ctx["work"]) / "analyse" / f"{t:05d}"
    out = _task_dir(ctx, "write", t)
    work = Path(ctx["work"])
    exact: dict[int, int] = {}
    for f in sorted((work / "exact").glob("*.npy")):
        exact.update(_task_slice(np.load(f, mmap_mode="r"), t))
    near = _task_slice(np.load(work / "near_removed.npy", mmap_mode="r"), t) if cfg.dedup.near else {}
    contaminated = {row: sets for row, sets in task["contaminated"]}
    nbytes, chars, val = (np.load(src / f"{name}.npy") for name in ("nbytes", "chars", "val"))
    steps = {name: Step(name) for name in ("exact_dedup", "near_dedup", "decontamination")}
    splits = {s: {"docs": 0, "bytes": 0} for s in ("train", "val")}
    contamination: Counter = Counter()
    lengths: list[int] = []
    ids = _Ids(ctx)
    out.mkdir(parents=True, exist_ok=True)
    row = -1
    with (
        open(src / "kept.jsonl", encoding="utf-8") as kept,
        atomic_open(out / "train.jsonl", durable=False) as train,
        atomic_open(out / "val.jsonl", durable=False) as val_file,
        atomic_open(out / "removed.jsonl", durable=False) as removed,
    ):
        for row, line in enumerate(kept):
            size = int(nbytes[row])
            verdict = None
            if row in exact:
                verdict = ("exact_dedup", "exact_duplicate", {"duplicate_of": ids[exact[row]]})
            elif row in near:
                verdict = ("near_dedup", "near_duplicate", {"duplicate_of": ids[near[row]]})
            elif row in contaminated:
                contamination.update(contaminated[row])
                verdict = ("decontamination", "eval_overlap", {"eval_sets": contaminated[row]})
            for name, st in steps.items():  # a document passes every step before the one removing it
                st.docs_in += 1
                st.bytes_in += size
                if verdict and verdict[0] == name:
                    st.remove(verdict[1], size)
                    break
                st.docs_out += 1
                st.bytes_out += size
            if verdict is not None:
                record = json.loads(line)
                fields = {f: record["meta"].get(f) for f in cfg.sources[task["source"]].meta_fields}
                removed.write(_removed_record(record["id"], fields, verdict[0], verdict[1], **verdict[2]))
                continue
            name = "val" if val[row] else "train"
            (val_file if name == "val" else train).write(line)
            splits[name]["docs"] += 1
            splits[name]["bytes"] += size
            lengths.append(int(chars[row]))
    if row + 1 != len(nbytes):  # a per-task file a power cut shortened (they are not flushed to the disk)
        raise DataError(
            f"{src / 'kept.jsonl'}: {row + 1} lines where its task wrote {len(nbytes)}; run again"
        )
    return {
        "docs": len(nbytes),
        "bytes": int(nbytes.sum()),
        "sizes": {
            name: (out / name).stat().st_size for name in ("train.jsonl", "val.jsonl", "removed.jsonl")
        },
        "steps": [s.as_dict() for s in steps.values()],
        "splits": splits,
        "contamination": dict(contamination),
        "lengths": np.histogram(lengths, LENGTH_BINS)[0].tolist(),
    }


# ----------------------------------------------------------------------------- the stage


def _concat(parts: list[Path], out: Path) -> None:
    """The parts one after another, hashed on the way (the ledger then need not read it again)."""
    h = hashlib.sha256()
    with atomic_open(out, "wb", durable=False) as f:  # the ledger's hash stands for its integrity
        for part in parts:
            with open(part, "rb") as src:
                while block := src.read(1 << 22):
                    h.update(block)
                    f.write(block)
    remember_sha256(out, h.hexdigest())


def _check_sizes(work: Path, tasks: list[dict], written: list[dict]) -> None:
    """Per-task files are not flushed to the disk (a power cut could shorten them): each must still
    have the size its task recorded, or the run stops rather than gather it."""
    for t, w in zip(tasks, written, strict=True):
        for name, size in w["sizes"].items():
            path = work / "write" / f"{t['index']:05d}" / name
            if not path.is_file() or path.stat().st_size != size:
                raise DataError(f"{path}: not the {size} bytes its task wrote; run again with --force data")


def curate(
    cfg: DataConfig,
    out_dir: Path,
    files: dict[str, list[File]],
    executor: Any,
    key: dict[str, Any],
    fresh: bool = False,
) -> dict[str, Any]:
    """Run the data stage into `out_dir` (the run's data/); return the curation record. `key` ties
    finished tasks in data/work/ to the config and inputs: a stage killed part-way resumes from them."""
    work = out_dir / "work"
    open_work(work, key, fresh)
    layout = plan_tasks(cfg, files)
    tasks = layout["tasks"]
    eval_files = eval_set_files(cfg.decontamination.eval_files)
    ngrams = load_eval_ngrams(eval_files, cfg.decontamination.text_field, cfg.decontamination.ngram)
    ngram_file = ""
    if ngrams:
        ngram_file = str(work / "eval_ngrams.npz")
        with atomic_open(ngram_file, "wb") as f:
            np.savez(
                f, names=json.dumps(list(ngrams)), **{f"set{k}": v for k, v in enumerate(ngrams.values())}
            )
    n_tasks = max(1, len(tasks))
    band_parts = -(-n_tasks // TASKS_PER_BAND_PARTITION)
    ctx = {
        "config": cfg.model_dump_json(),
        "work": str(work),
        "eval_ngrams": ngram_file,
        "exact_partitions": min(n_tasks, MAX_EXACT_PARTITIONS),
        "band_partitions": band_parts,
    }

    def step(name: str, fn: str, items: list[dict]) -> list[dict]:
        return run_step(
            executor, TaskStep(name, f"trulyopen.data.curate:{fn}", ctx, items, str(work / "steps" / name))
        )

    analysed = step("analyse", "analyse_task", tasks)
    ctx["kept_tasks"] = [t["index"] for t, a in zip(tasks, analysed, strict=True) if a["kept"]]
    exact_sizes: dict[str, int] = {}
    if cfg.dedup.exact:
        parts = [{"partition": p} for p in range(ctx["exact_partitions"])]
        exact_sizes = _merge_counts(r["clusters"] for r in step("exact", "exact_task", parts))
    else:
        (work / "exact").mkdir(exist_ok=True)
    _save(work / "exact_removed.npy", _exact_removed(ctx))
    near_sizes: dict[str, int] = {}
    if cfg.dedup.near:
        parts = [{"partition": p} for p in range(cfg.dedup.bands * band_parts)]
        step("bands", "band_task", parts)
        near_sizes = step("clusters", "clusters_task", [{}])[0]["clusters"]
    writes = [{**t, "contaminated": a["contaminated"]} for t, a in zip(tasks, analysed, strict=True)]
    written = step("write", "write_task", writes)

    steps = {
        name: Step(name)
        for name in ("read", "clean", "filter", "exact_dedup", "near_dedup", "decontamination")
    }
    for result in analysed:
        for s in result["steps"]:
            steps[s["step"]].add(s)
    splits = {s: {"docs": 0, "bytes": 0} for s in ("train", "val")}
    contamination: Counter = Counter()
    lengths = np.zeros(len(LENGTH_BINS) - 1, np.int64)
    for result in written:
        for s in result["steps"]:
            steps[s["step"]].add(s)
        for name in splits:
            for k in ("docs", "bytes"):
                splits[name][k] += result["splits"][name][k]
        contamination.update(result["contamination"])
        lengths += np.asarray(result["lengths"])
    per_source = {
        s.name: {"docs_read": 0, "problems": 0, "docs_kept": 0, "bytes_kept": 0} for s in cfg.sources
    }
    for t, a, w in zip(tasks, analysed, written, strict=True):
        tally = per_source[cfg.sources[t["source"]].name]
        tally["docs_read"] += a["steps"][0]["docs_out"]
        tally["problems"] += a["problems"]
        tally["docs_kept"] += sum(w["splits"][name]["docs"] for name in splits)
        tally["bytes_kept"] += sum(w["splits"][name]["bytes"] for name in splits)
    kept_steps = [
        s
        for s in steps.values()
        if s.name not in ("exact_dedup", "near_dedup") or getattr(cfg.dedup, s.name.split("_")[0])
    ]
    _concat(
        [work / "analyse" / f"{t['index']:05d}" / "problems.jsonl" for t in tasks], out_dir / "problems.jsonl"
    )
    problems = []
    with open(out_dir / "problems.jsonl", encoding="utf-8") as f:
        for line in f:
            if len(problems) == FIRST_PROBLEMS:
                break
            problems.append(json.loads(line))
    if not splits["train"]["docs"] + splits["val"]["docs"]:
        raise DataError(_empty_corpus(cfg, files, per_source, kept_steps, problems, out_dir))

    _check_sizes(work, tasks, written)
    corpus = out_dir / "corpus"
    for split in ("train", "val"):
        _concat(
            [work / "write" / f"{t['index']:05d}" / f"{split}.jsonl" for t in tasks],
            corpus / f"{split}.jsonl",
        )
    removed = [work / d / f"{t['index']:05d}" / "removed.jsonl" for t in tasks for d in ("analyse", "write")]
    _concat(removed, out_dir / "removed.jsonl")
    record = {
        "steps": [s.as_dict() for s in kept_steps],
        "problems": problems,
        "problem_count": sum(a["problems"] for a in analysed),
        "dedup": {
            "exact_clusters": exact_sizes,
            "near_clusters": near_sizes,
            "near_params": cfg.dedup.model_dump(),
        },
        "contamination": {
            "ngram": cfg.decontamination.ngram,
            "eval_sets": {str(p): contamination.get(str(p), 0) for p in eval_files},
        },
        "splits": splits,
        "sources": per_source,
        "length_histogram": {"edges": LENGTH_BINS.tolist(), "counts": lengths.tolist()},
        "tasks": {
            "count": len(tasks),
            "task_bytes": layout["task_bytes"],
            "exact_partitions": ctx["exact_partitions"],
            "band_partitions": cfg.dedup.bands * band_parts,
            "layout": [{k: v for k, v in t.items() if k != "files"} | _files_of(t) for t in tasks],
        },
    }
    write_json(out_dir / "curation.json", record)
    shutil.rmtree(work, ignore_errors=True)  # finished: the per-task files are in the outputs now
    return record


def _empty_corpus(
    cfg: DataConfig,
    files: dict[str, list[File]],
    per_source: dict[str, dict],
    steps: list[Step],
    problems: list[dict],
    out_dir: Path,
) -> str:
    """Why no document is left, naming the sources, the first bad records or the steps."""
    if not any(files.values()):
        where = "; ".join(
            f"data.sources.{i} ({s.name}): {s.path}" + (f" with include {s.include}" if s.include else "")
            for i, s in enumerate(cfg.sources)
        )
        return f"the corpus is empty: no input file was found ({where}); check each source's path and include"
    bad = sum(t["problems"] for t in per_source.values())
    read = sum(t["docs_read"] for t in per_source.values())
    if not read and not bad:
        return "the corpus is empty: the input files hold no records; check each source's path and include"
    if not read:
        first = "; ".join(str(Problem(**p)) for p in problems[:3])
        return (
            f"the corpus is empty: all {bad:,} input records were bad ({first}"
            f"{'; ...' if bad > 3 else ''}); fix them (every one is listed in {out_dir / 'problems.jsonl'})"
        )
    why = "; ".join(
        f"{s.name} removed {sum(s.removed.values()):,} ({dict(s.removed)})" for s in steps if s.removed
    )
    return f"the corpus is empty: {read:,} documents were read but {why}; loosen data.filters or data.dedup"


def _files_of(task: dict) -> dict:
    files = task.get("files")
    return (
        {"files": [files[0], files[-1]] if len(files) > 2 else files, "file_count": len(files)}
        if files
        else {}
    )


def _merge_counts(parts) -> dict[str, int]:
    total: Counter = Counter()
    for p in parts:
        total.update(p)
    return {k: total[k] for k in sorted(total, key=int)}
