"""Sources: where documents come from, each with a name, a licence and stable document ids.

A source yields `Document`s and, for input it cannot use, `Problem`s that name the file and line
or row. The caller decides whether a problem is skipped and counted or fatal (`data.strict`).

Document ids are `<source>/<relative path>` for file trees, `<source>/<file>:<line>` for JSONL and
`<source>/<file>#<row>` for tables, so the same input always gets the same id.
"""

from __future__ import annotations

import fnmatch
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trulyopen.recipe import SourceConfig

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


class DataError(Exception):
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
    "jsonl": ["**/*.jsonl"],
    "parquet": ["**/*.parquet"],
}


def _include(cfg: SourceConfig) -> list[str]:
    return DEFAULT_INCLUDE.get(cfg.type, cfg.include) if cfg.include == ["**/*"] else cfg.include


def _root(cfg: SourceConfig) -> Path:
    return stdlib_dir() if cfg.type == "python-stdlib" else Path(cfg.path)


def input_files(cfg: SourceConfig) -> list[Path]:
    """Every file the source reads, sorted, so the corpus order never depends on the file system."""
    if cfg.type == "hf-hub":
        return []
    root = _root(cfg)
    if root.is_file():
        return [root]
    include = _include(cfg) if cfg.type != "hf-disk" else ["**/*"]
    exclude = list(cfg.exclude)
    # The standard library's folder also holds installed packages: never walk into them.
    skip_dirs = (
        {"__pycache__", "site-packages", "dist-packages"} if cfg.type == "python-stdlib" else {"__pycache__"}
    )
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        prefix = os.path.relpath(dirpath, root)
        prefix = "" if prefix == "." else prefix.replace(os.sep, "/") + "/"
        for name in filenames:
            rel = prefix + name
            if (
                _matches(rel, include)
                and not _matches(rel, exclude)
                and os.path.isfile(os.path.join(dirpath, name))
            ):
                found.append(root / rel)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _rel(path: Path, cfg: SourceConfig) -> str:
    root = _root(cfg)
    return path.name if root.is_file() else path.relative_to(root).as_posix()


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


def _read_files(cfg: SourceConfig, files: list[Path], policy: str) -> Iterator[Document | Problem]:
    for path in files:
        rel = _rel(path, cfg)
        try:
            data = path.read_bytes()
        except OSError as e:
            yield Problem(cfg.name, str(path), f"unreadable: {e.strerror}")
            continue
        text, reason = decode(data, policy)
        if text is None:
            yield Problem(cfg.name, str(path), reason, nbytes=len(data))
            continue
        meta = {"path": rel, "replaced_bytes": True} if reason else {"path": rel}
        yield Document(f"{cfg.name}/{rel}", text, cfg.name, meta)


def _read_jsonl(cfg: SourceConfig, files: list[Path], policy: str) -> Iterator[Document | Problem]:
    for path in files:
        rel = _rel(path, cfg)
        try:
            data = path.read_bytes()
        except OSError as e:
            yield Problem(cfg.name, str(path), f"unreadable: {e.strerror}")
            continue
        lines = data.split(b"\n")
        if lines[-1] == b"":  # the newline that ends the file does not open an empty record
            lines.pop()
        for lineno, raw in enumerate(lines, start=1):
            where = {"line": lineno, "nbytes": len(raw) + 1}
            if not raw.strip():
                yield Problem(cfg.name, str(path), "empty line", **where)
                continue
            line, reason = decode(raw, policy)
            if line is None:
                yield Problem(cfg.name, str(path), reason, **where)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield Problem(cfg.name, str(path), f"invalid JSON: {e.msg}", **where)
                continue
            text = record.get(cfg.text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                what = (
                    "missing"
                    if not isinstance(record, dict) or cfg.text_field not in record
                    else "not a string"
                )
                yield Problem(cfg.name, str(path), f"field '{cfg.text_field}' {what}", **where)
                continue
            yield Document(f"{cfg.name}/{rel}:{lineno}", text, cfg.name, {"path": rel, "line": lineno})


def _rows(cfg: SourceConfig, file: str, rel: str, columns: dict[str, list]) -> Iterator[Document | Problem]:
    """Documents from a table's text column; shared by Parquet files and `datasets` datasets."""
    if cfg.text_field not in columns:
        have = ", ".join(sorted(columns)) or "none"
        yield Problem(cfg.name, file, f"no column '{cfg.text_field}' (columns: {have})")
        return
    for row, text in enumerate(columns[cfg.text_field]):
        if not isinstance(text, str):
            yield Problem(
                cfg.name, file, f"column '{cfg.text_field}' is {type(text).__name__}, not text", row=row
            )
            continue
        yield Document(f"{cfg.name}/{rel}#{row}", text, cfg.name, {"path": rel, "row": row})


def _read_parquet(cfg: SourceConfig, files: list[Path]) -> Iterator[Document | Problem]:
    import pyarrow.parquet as pq

    for path in files:
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a broken file
            yield Problem(cfg.name, str(path), f"not a readable Parquet file: {e}")
            continue
        yield from _rows(
            cfg, str(path), _rel(path, cfg), {n: table.column(n).to_pylist() for n in table.column_names}
        )


def _read_dataset(cfg: SourceConfig) -> Iterator[Document | Problem]:
    """hf-disk and hf-hub take the same path: load a `datasets.Dataset`, then read its text column."""
    import datasets

    if cfg.type == "hf-disk":
        ds = datasets.load_from_disk(str(cfg.path))
        where = str(cfg.path)
    else:
        ds = datasets.load_dataset(cfg.dataset, split=cfg.split)
        where = f"hub:{cfg.dataset}"
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            yield Problem(cfg.name, where, f"no split '{cfg.split}' (splits: {', '.join(ds)})")
            return
        ds = ds[cfg.split]
    columns = (
        {n: ds[n] for n in ds.column_names}
        if cfg.text_field in ds.column_names
        else dict.fromkeys(ds.column_names)
    )
    yield from _rows(cfg, where, cfg.split, columns)


def read_source(cfg: SourceConfig, files: list[Path], undecodable: str) -> Iterator[Document | Problem]:
    """All documents of one source, in a fixed order, with problems in between."""
    if cfg.type in ("python-stdlib", "directory", "text"):
        yield from _read_files(cfg, files, undecodable)
    elif cfg.type == "jsonl":
        yield from _read_jsonl(cfg, files, undecodable)
    elif cfg.type == "parquet":
        yield from _read_parquet(cfg, files)
    else:
        yield from _read_dataset(cfg)
