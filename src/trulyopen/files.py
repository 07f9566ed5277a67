"""Writing files so that nobody ever reads a half-written one.

Everything trulyopen writes goes to a temporary name in the same directory, is flushed to disk, and
is renamed over the final name only when complete. A run killed at any moment leaves either the old
file or the new one, never a mix; the `NAME.tmp-PID` file it was writing is left behind, and the next
run removes it (`remove_leftovers`) before a stage can list it as an output or copy it into a release.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", durable: bool = True) -> Iterator[IO[Any]]:
    """Open `path` for writing under a temporary name; rename it into place on success.

    `durable` flushes the file to the disk before the rename, so that it survives a power cut too.
    Bulk data whose hash the ledger records (corpus, shards) passes False: the rename alone keeps a
    killed process from leaving a half-written file, and a file that a power cut damaged no longer
    matches its ledger hash, so its stage runs again. On a disk of 140 MB/s, fsync of a corpus
    costs more than making it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    kwargs = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None and e.errno is not None:  # a write that failed (a full disk): name the file
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_leftovers(root: str | Path) -> list[Path]:
    """Delete the temporary files under `root` of writers killed before they renamed them, and
    return their paths. A file whose writer is still alive stays: a worker that outlived its killed
    parent may still finish it."""
    removed = []
    for path in Path(root).rglob("*.tmp-*"):
        pid = path.name.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and path.is_file() and not _alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_json(path: str | Path, obj: Any) -> None:
    """Pretty, key-sorted JSON, so the same content always gives the same bytes."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


# sha256 of files this process wrote or read, by (path, size, mtime): a stage's outputs are hashed
# where they are made (a worker, a copy) and the ledger, and the next stage's inputs, reuse it.
_known_sha256: dict[tuple[str, int, int], str] = {}


def _stat_key(path: str | Path) -> tuple[str, int, int]:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns)


def remember_sha256(path: str | Path, digest: str) -> None:
    """Record the sha256 of a file just written (as it is now: a later change is seen by its stat)."""
    _known_sha256[_stat_key(path)] = digest


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    key = _stat_key(path)
    if key in _known_sha256:
        return _known_sha256[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    _known_sha256[key] = h.hexdigest()
    return _known_sha256[key]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
