"""Sources: where documents come from, each with a name, a licence and stable document ids.

A source is read one logical task at a time (`trulyopen.data.tasks` cuts it: groups of files,
line-aligned byte ranges of plain JSONL, one compressed file, ranges of Parquet row groups or of a
dataset's rows), streamed, so memory holds one record, not the corpus. It yields `Document`s and,
for input it cannot use, `Problem`s that name the file and line, row or compressed byte offset.
The caller decides whether a problem is skipped and counted or fatal (`data.strict`).

Document ids are `<source>/<relative path>` for file trees, `<source>/<file>:<line>` for JSONL and
`<source>/<file>#<row>` for tables, so the same input always gets the same id; with `id_field`, the
record's own id: `<source>/<id>`, with the location kept in the metadata. Local paths and fsspec
URLs (s3://, gs://, hf://, memory://) take the same code path: only opening and listing differ.
"""

from __future__ import annotations

import fnmatch
import json
import os
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from trulyopen.errors import UserError
from trulyopen.recipe import SourceConfig

File = Path | str  # a local path, or an fsspec URL

BINARY_SNIFF = 8192


@dataclass
class Document:
    id: str
    text: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Problem:
    """Input that could not be used: `file` (and `line` or `row`) and a one-line reason."""

    source: str
    file: str
    reason: str
    line: int | None = None
    row: int | None = None
    nbytes: int = 0  # input bytes that went unused because of it, where known

    def __str__(self) -> str:
        where = (
            self.file
            + (f":{self.line}" if self.line else "")
            + (f" row {self.row}" if self.row is not None else "")
        )
        return f"{where}: {self.reason}"


class DataError(UserError):
    """Data that cannot be used at all (strict mode, an empty corpus, an unusable table)."""


def stdlib_dir() -> Path:
    """The running interpreter's standard library (pure-Python part), found with sysconfig."""
    return Path(sysconfig.get_paths()["stdlib"])


def _matches(rel: str, patterns: list[str]) -> bool:
    """Glob match where `*` may cross '/', and a leading `**/` also matches at the top level."""
    return any(
        fnmatch.fnmatch(rel, p) or (p.startswith("**/") and fnmatch.fnmatch(rel, p[3:])) for p in patterns
    )


# What a source reads from a directory when the recipe leaves `include` at its default.
DEFAULT_INCLUDE = {
    "python-stdlib": ["**/*.py"],
    "text": ["**/*.txt"],
    "jsonl": ["**/*.jsonl", "**/*.jsonl.gz", "**/*.json.gz", "**/*.jsonl.zst", "**/*.jsonl.zstd"],
    "parquet": ["**/*.parquet"],
}
COMPRESSED = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}


def compression(file: File) -> str | None:
    """'gzip' or 'zstd' from the file name, None for a plain file."""
    return COMPRESSED.get(os.path.splitext(str(file))[1])


def is_url(file: File) -> bool:
    return isinstance(file, str) and "://" in file


def _include(cfg: SourceConfig) -> list[str]:
    return DEFAULT_INCLUDE.get(cfg.type, cfg.include) if cfg.include == ["**/*"] else cfg.include


def _root(cfg: SourceConfig) -> File:
    return stdlib_dir() if cfg.type == "python-stdlib" else cfg.path


def _url_fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def file_size(file: File) -> int:
    if is_url(file):
        fs, path = _url_fs(file)
        return int(fs.size(path))
    return os.path.getsize(file)


def open_raw(file: File) -> IO[bytes]:
    """The file's bytes as they lie on disk or in the bucket (not decompressed)."""
    if is_url(file):
        fs, path = _url_fs(file)
        return fs.open(path, "rb")
    return open(file, "rb")


def _walk(cfg: SourceConfig) -> list[tuple[str, File]]:
    """(relative path, file) of every file under the source's root, unfiltered."""
    root = _root(cfg)
    if is_url(root):
        fs, base = _url_fs(root)
        if fs.isfile(base):
            return [(base.rsplit("/", 1)[-1], root)]
        return [(relative(fs.unstrip_protocol(p), cfg), fs.unstrip_protocol(p)) for p in fs.find(base)]
    root = Path(root)
    if root.is_file():
        return [(root.name, root)]
    # The standard library's folder also holds installed packages: never walk into them.
    skip_dirs = (
        {"__pycache__", "site-packages", "dist-packages"} if cfg.type == "python-stdlib" else {"__pycache__"}
    )
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        prefix = os.path.relpath(dirpath, root)
        prefix = "" if prefix == "." else prefix.replace(os.sep, "/") + "/"
        found += [
            (prefix + n, root / (prefix + n)) for n in filenames if os.path.isfile(os.path.join(dirpath, n))
        ]
    return found


def input_files(cfg: SourceConfig) -> list[File]:
    """Every file the source reads, sorted, so the corpus order never depends on the file system."""
    if cfg.type == "hf-hub":
        return []
    if cfg.type == "hf-disk":
        return [f for _, f in sorted(_walk(cfg))]
    include, exclude = _include(cfg), list(cfg.exclude)
    single = len(walked := _walk(cfg)) == 1 and walked[0][1] == _root(cfg)
    return [
        f for rel, f in sorted(walked) if single or (_matches(rel, include) and not _matches(rel, exclude))
    ]


def relative(file: File, cfg: SourceConfig) -> str:
    """The file's path relative to its source's root (its name when the source is one file)."""
    root = _root(cfg)
    if is_url(root):
        base, path = _url_fs(root)[1].rstrip("/"), _url_fs(file)[1]
        return path[len(base) + 1 :] if path.startswith(base + "/") else path.rsplit("/", 1)[-1]
    root, file = Path(root), Path(file)
    return file.name if root.is_file() or not file.is_relative_to(root) else file.relative_to(root).as_posix()


def decode(data: bytes, policy: str) -> tuple[str | None, str | None]:
    """(text, None) when clean; (None, reason) when unusable; (text, reason) when bad bytes were
    replaced with U+FFFD under policy 'replace'."""
    if b"\x00" in data[:BINARY_SNIFF]:
        return None, "binary file (NUL bytes)"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        reason = f"invalid UTF-8 at byte {e.start}"
        return (data.decode("utf-8", errors="replace"), reason) if policy == "replace" else (None, reason)


# ----------------------------------------------------------------------------- one task's records


def _read_files(cfg: SourceConfig, files: list[File], policy: str) -> Iterator[Document | Problem]:
    for path in files:
        rel = relative(path, cfg)
        try:
            with open_raw(path) as f:
                data = f.read()
        except OSError as e:
            yield Problem(cfg.name, str(path), f"unreadable: {e.strerror or e}")
            continue
        text, reason = decode(data, policy)
        if text is None:
            yield Problem(cfg.name, str(path), reason, nbytes=len(data))
            continue
        meta = {"path": rel, "replaced_bytes": True} if reason else {"path": rel}
        yield Document(f"{cfg.name}/{rel}", text, cfg.name, meta)


class CorruptInput(Exception):
    """A compressed stream that ends early or holds bad data; `offset` is the compressed byte."""

    def __init__(self, message: str, offset: int):
        super().__init__(message)
        self.offset = offset


def _decompressed(raw: IO[bytes], kind: str, block: int) -> Iterator[bytes]:
    """Decompressed blocks of a gzip (possibly multi-member) or zstd stream, fed a block of
    compressed bytes at a time, so that everything before a cut or a bad byte is still read and
    the bad offset is known."""
    import zstandard

    def new():
        return (
            zlib.decompressobj(wbits=31) if kind == "gzip" else zstandard.ZstdDecompressor().decompressobj()
        )

    dec, offset, pending = new(), 0, b""
    while True:
        data = pending or raw.read(block)
        pending = b""
        if not data:
            break
        try:
            out = dec.decompress(data)
        except (zlib.error, zstandard.ZstdError) as e:
            raise CorruptInput(f"corrupt {kind} data ({e})", offset) from None
        offset += len(data) - len(dec.unused_data)
        if out:
            yield out
        if dec.eof and dec.unused_data:  # the next gzip member or zstd frame
            pending, dec = dec.unused_data, new()
        elif dec.eof:
            pending, dec = b"", new()
            nxt = raw.read(block)
            if not nxt:
                return
            pending = nxt
    if not dec.eof and offset:
        raise CorruptInput(f"truncated {kind} data (the stream ends before its end marker)", offset)


def read_lines(file: File, start: int, stop: int | None, block: int = 1 << 22) -> Iterator[bytes]:
    """Lines (without the newline) of bytes [start, stop) of a plain file, or of the whole
    decompressed stream of a compressed one, read in blocks."""
    kind = compression(file)
    with open_raw(file) as raw:
        if kind is None:
            raw.seek(start)
            left = stop - start if stop is not None else None
            blocks = iter(lambda: raw.read(block if left is None else min(block, left)), b"")
            if left is not None:
                blocks = _bounded(blocks, left)
        else:
            blocks = _decompressed(raw, kind, 1 << 16)
        carry = b""
        for data in blocks:
            parts = (carry + data).split(b"\n")
            carry = parts.pop()
            yield from parts
        if carry:
            yield carry


def _bounded(blocks: Iterator[bytes], left: int) -> Iterator[bytes]:
    for data in blocks:
        yield data[:left]
        left -= len(data)
        if left <= 0:
            return


def _fields(cfg: SourceConfig, record: dict, where: dict) -> tuple[str | None, dict | None, str | None]:
    """(document id suffix, metadata, problem) from a record's id and meta fields."""
    meta = dict(where)
    meta.update({f: record.get(f) for f in cfg.meta_fields})
    if cfg.id_field is None:
        return None, meta, None
    rid = record.get(cfg.id_field)
    if rid is None or isinstance(rid, bool) or not isinstance(rid, str | int) or rid == "":
        return (
            None,
            None,
            f"id field '{cfg.id_field}' " + ("missing" if rid is None else "not a string or integer"),
        )
    return str(rid), meta, None


def _read_jsonl(
    cfg: SourceConfig, file: File, start: int, stop: int | None, first_line: int, policy: str
) -> Iterator[Document | Problem]:
    rel = relative(file, cfg)
    lineno = first_line - 1
    try:
        for raw in read_lines(file, start, stop):
            lineno += 1
            where = {"line": lineno, "nbytes": len(raw) + 1}
            if not raw.strip():
                yield Problem(cfg.name, str(file), "empty line", **where)
                continue
            line, reason = decode(raw, policy)
            if line is None:
                yield Problem(cfg.name, str(file), reason, **where)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield Problem(cfg.name, str(file), f"invalid JSON: {e.msg}", **where)
                continue
            text = record.get(cfg.text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                what = (
                    "missing"
                    if not isinstance(record, dict) or cfg.text_field not in record
                    else "not a string"
                )
                yield Problem(cfg.name, str(file), f"field '{cfg.text_field}' {what}", **where)
                continue
            rid, meta, problem = _fields(cfg, record, {"path": rel, "line": lineno})
            if problem:
                yield Problem(cfg.name, str(file), problem, **where)
                continue
            yield Document(f"{cfg.name}/{rid or f'{rel}:{lineno}'}", text, cfg.name, meta)
    except CorruptInput as e:
        yield Problem(cfg.name, str(file), f"{e} at byte {e.offset}", line=lineno + 1)
    except OSError as e:
        yield Problem(cfg.name, str(file), f"unreadable: {e.strerror or e}")


def _rows(
    cfg: SourceConfig, file: str, rel: str, columns: dict[str, list], first_row: int = 0
) -> Iterator[Document | Problem]:
    """Documents from a table's columns; shared by Parquet row groups and `datasets` datasets."""
    wanted = [cfg.text_field] + ([cfg.id_field] if cfg.id_field else [])
    for name in wanted:
        if name not in columns:
            have = ", ".join(sorted(columns)) or "none"
            yield Problem(cfg.name, file, f"no column '{name}' (columns: {have})")
            return
    texts = columns[cfg.text_field]
    for i, text in enumerate(texts):
        row = first_row + i
        if not isinstance(text, str):
            yield Problem(
                cfg.name, file, f"column '{cfg.text_field}' is {type(text).__name__}, not text", row=row
            )
            continue
        record = {k: columns[k][i] if k in columns else None for k in {*cfg.meta_fields, *wanted[1:]}}
        rid, meta, problem = _fields(cfg, record, {"path": rel, "row": row})
        if problem:
            yield Problem(cfg.name, file, problem, row=row)
            continue
        yield Document(f"{cfg.name}/{rid or f'{rel}#{row}'}", text, cfg.name, _plain(meta))


def _plain(meta: dict) -> dict:
    """Metadata as JSON values: dates and other column types become text."""
    return {k: v if v is None or isinstance(v, str | int | float | bool) else str(v) for k, v in meta.items()}


def _columns(cfg: SourceConfig) -> list[str]:
    return [c for c in (cfg.text_field, cfg.id_field, *cfg.meta_fields) if c]


def _read_parquet(
    cfg: SourceConfig, file: File, groups: tuple[int, int], first_row: int
) -> Iterator[Document | Problem]:
    import pyarrow.parquet as pq

    try:
        with open_raw(file) as raw:
            pf = pq.ParquetFile(raw)
            present = set(pf.schema_arrow.names)
            wanted = [c for c in _columns(cfg) if c in present]
            row = first_row
            for g in range(*groups):
                table = pf.read_row_group(g, columns=wanted)
                cols = {n: table.column(n).to_pylist() for n in table.column_names}
                if cfg.text_field not in cols:  # report the table's own columns
                    cols = dict.fromkeys(present)
                yield from _rows(cfg, str(file), relative(file, cfg), cols, row)
                row += table.num_rows
    except Exception as e:  # pyarrow raises several types for a broken file
        yield Problem(cfg.name, str(file), f"not a readable Parquet file: {e}")


def load_dataset(cfg: SourceConfig):
    """The source's `datasets.Dataset` (hf-disk and hf-hub take the same path), or a Problem."""
    import datasets

    if cfg.type == "hf-disk":
        ds = datasets.load_from_disk(str(cfg.path))
    else:
        ds = datasets.load_dataset(cfg.dataset, split=cfg.split)
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            return Problem(cfg.name, dataset_where(cfg), f"no split '{cfg.split}' (splits: {', '.join(ds)})")
        ds = ds[cfg.split]
    return ds


def dataset_where(cfg: SourceConfig) -> str:
    return str(cfg.path) if cfg.type == "hf-disk" else f"hub:{cfg.dataset}"


def _read_dataset(cfg: SourceConfig, rows: tuple[int, int] | None) -> Iterator[Document | Problem]:
    ds = load_dataset(cfg)
    if isinstance(ds, Problem):
        yield ds
        return
    start, stop = rows if rows is not None else (0, len(ds))
    present = set(ds.column_names)
    if cfg.text_field not in present:
        yield from _rows(cfg, dataset_where(cfg), cfg.split, dict.fromkeys(ds.column_names))
        return
    part = ds.select_columns([c for c in _columns(cfg) if c in present])[start:stop]
    yield from _rows(cfg, dataset_where(cfg), cfg.split, part, start)


def read_task(cfg: SourceConfig, task: dict, policy: str) -> Iterator[Document | Problem]:
    """The documents of one task (see `trulyopen.data.tasks`), in order, with problems in between."""
    kind = task["kind"]
    if kind == "files":
        yield from _read_files(cfg, task["files"], policy)
    elif kind == "lines":
        yield from _read_jsonl(cfg, task["file"], task["start"], task["stop"], task["first"], policy)
    elif kind == "row_groups":
        yield from _read_parquet(cfg, task["file"], (task["start"], task["stop"]), task["first"])
    else:
        yield from _read_dataset(cfg, (task["start"], task["stop"]) if task.get("stop") is not None else None)


def read_source(cfg: SourceConfig, files: list[File], undecodable: str) -> Iterator[Document | Problem]:
    """All documents of one source, in a fixed order: its tasks one after another."""
    from trulyopen.data.tasks import source_tasks

    for task in source_tasks(cfg, files, task_bytes=1 << 62):
        yield from read_task(cfg, task, undecodable)
