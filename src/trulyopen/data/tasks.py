"""Logical tasks: a corpus cut into pieces whose layout depends on the corpus, never on the workers.

    source files ─► tasks: groups of small files            (directory, text, python-stdlib)
                           line-aligned byte ranges          (plain JSONL)
                           one whole file                    (gzip / zstd JSONL: a stream cannot seek)
                           ranges of row groups              (Parquet)
                           ranges of rows                    (a dataset saved with `datasets`)

A task is at most `task_bytes` of input (a compressed file or a row group is never cut), and a small
corpus is cut into about TARGET_TASKS tasks of at least MIN_TASK_BYTES, so that a few workers have
work to share. Every step of the data stage then reads and writes per-task files, so one process
holds one task; the plan is recorded in the manifest. Tasks are plain JSON dictionaries, so the
same plan runs in local processes, in Ray tasks or in a Slurm job array.
"""

from __future__ import annotations

from typing import Any

from trulyopen.data.sources import File, compression, file_size, open_raw
from trulyopen.recipe import DataConfig, SourceConfig

TARGET_TASKS = 64
MIN_TASK_BYTES = 1_000_000
SCAN_BLOCK = 1 << 24


def task_size(total_bytes: int, task_bytes: int) -> int:
    """Bytes per task: at most `task_bytes`; a small corpus makes about TARGET_TASKS tasks."""
    return min(task_bytes, max(MIN_TASK_BYTES, -(-total_bytes // TARGET_TASKS)))


def line_ranges(file: File, size: int) -> list[tuple[int, int, int]]:
    """(start, stop, first line number) of consecutive line-aligned byte ranges of about `size`
    bytes covering a plain file, found in one sequential read."""
    total = file_size(file)
    if total <= size:
        return [(0, total, 1)]
    ranges, start, line, pos, target = [], 0, 1, 0, size
    newlines = 0  # newlines in [start, pos)
    with open_raw(file) as f:
        while block := f.read(SCAN_BLOCK):
            base = pos
            pos += len(block)
            offset = 0
            while target < pos:  # cut after the first newline at or beyond the target
                cut = block.find(b"\n", max(target - base, offset))
                if cut < 0:
                    break
                newlines += block.count(b"\n", offset, cut + 1)
                stop = base + cut + 1
                ranges.append((start, stop, line))
                line += newlines
                newlines, start, offset = 0, stop, cut + 1
                target = stop + size
            newlines += block.count(b"\n", offset)
    if start < total:
        ranges.append((start, total, line))
    return ranges


def _groups(sizes: list[int], size: int) -> list[tuple[int, int]]:
    """[start, stop) index ranges of consecutive items whose sizes add up to about `size`."""
    out, start, acc = [], 0, 0
    for i, n in enumerate(sizes):
        acc += n
        if acc >= size:
            out.append((start, i + 1))
            start, acc = i + 1, 0
    if start < len(sizes):
        out.append((start, len(sizes)))
    return out


def _parquet_tasks(file: File, size: int) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        with open_raw(file) as raw:
            meta = pq.ParquetFile(raw).metadata
    except Exception:  # the reader names the broken file
        return [{"kind": "row_groups", "file": str(file), "start": 0, "stop": 1, "first": 0, "bytes": 0}]
    groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
    rows = [0]
    for g in groups:
        rows.append(rows[-1] + g.num_rows)
    return [
        {
            "kind": "row_groups",
            "file": str(file),
            "start": a,
            "stop": b,
            "first": rows[a],
            "bytes": sum(g.total_byte_size for g in groups[a:b]),
        }
        for a, b in _groups([g.total_byte_size for g in groups], size)
    ]


def _dataset_tasks(cfg: SourceConfig, size: int) -> list[dict[str, Any]]:
    whole = [{"kind": "dataset", "start": None, "stop": None, "bytes": 0}]
    if cfg.type == "hf-hub":  # downloaded (and cached) by the one task that reads it
        return whole
    from trulyopen.data.sources import load_dataset

    ds = load_dataset(cfg)
    if not hasattr(ds, "num_rows") or ds.num_rows == 0:
        return whole
    nbytes = max(ds.data.nbytes, 1)
    per = max(1, int(ds.num_rows * size / nbytes))
    return [
        {
            "kind": "dataset",
            "start": a,
            "stop": min(a + per, ds.num_rows),
            "bytes": nbytes * per // ds.num_rows,
        }
        for a in range(0, ds.num_rows, per)
    ]


def source_tasks(cfg: SourceConfig, files: list[File], task_bytes: int) -> list[dict[str, Any]]:
    """The tasks of one source, in corpus order."""
    if cfg.type in ("hf-disk", "hf-hub"):
        return _dataset_tasks(cfg, task_bytes)
    if cfg.type == "parquet":
        return [t for f in files for t in _parquet_tasks(f, task_bytes)]
    if cfg.type == "jsonl":
        tasks = []
        for f in files:
            if compression(f):
                tasks.append({"kind": "lines", "file": str(f), "start": 0, "stop": None, "first": 1})
                tasks[-1]["bytes"] = file_size(f)
            else:
                tasks += [
                    {"kind": "lines", "file": str(f), "start": a, "stop": b, "first": line, "bytes": b - a}
                    for a, b, line in line_ranges(f, task_bytes)
                ]
        return tasks
    sizes = [file_size(f) for f in files]
    return [
        {"kind": "files", "files": [str(f) for f in files[a:b]], "bytes": sum(sizes[a:b])}
        for a, b in _groups(sizes, task_bytes)
    ]


def plan(cfg: DataConfig, files: dict[str, list[File]]) -> dict[str, Any]:
    """Every task of every source, numbered in corpus order (sources in recipe order)."""
    total = sum(file_size(f) for fs in files.values() for f in fs)
    size = task_size(total, cfg.task_bytes)
    tasks = []
    for i, src in enumerate(cfg.sources):
        part = source_tasks(src, files[src.name], size)
        if src.type in ("parquet", "hf-disk"):  # row bytes are estimates: count the files' bytes instead
            _rescale(part, sum(file_size(f) for f in files[src.name]))
        tasks += [{"index": len(tasks) + k, "source": i, **t} for k, t in enumerate(part)]
    return {"input_bytes": total, "task_bytes": size, "tasks": tasks}


def _rescale(tasks: list[dict[str, Any]], total: int) -> None:
    """Make the tasks' bytes add up to `total`, each in proportion to its estimate."""
    estimate = sum(t["bytes"] for t in tasks) or 1
    done = seen = 0
    for t in tasks:
        seen += t["bytes"]
        share = total * seen // estimate if t is not tasks[-1] else total
        t["bytes"], done = share - done, share
