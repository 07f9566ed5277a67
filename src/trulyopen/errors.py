"""What a user sees when something goes wrong: one line, never a traceback.

    a mistake the user can fix   ─► `error: <file, field, line or flag>: <what>; <what to do>`, exit 2
    a bug (anything else)        ─► `error: internal error (<type>: ...); ... crash report is <file>`, exit 1
    Ctrl-C                       ─► `interrupted; finished work is kept: rerun ... to resume`,   exit 130

Every module raises its own `UserError` subclass (RecipeError, DataError, ...), so only this
file and the CLI (`cli._Contract`, around every verb) know about exit codes. The crash report,
written to the run directory when one is known, holds what a bug report needs: the traceback, the
versions and the command.

This module imports nothing heavy: `trulyopen` with a bad argument answers in a fraction of a
second.
"""

from __future__ import annotations

import errno
import os
import platform
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path


class UserError(Exception):
    """A mistake in the user's input (a file, a field, a flag): exit code 2 and the message alone.

    The message names where the mistake is and, after `; `, what to do about it."""


class MissingPath(UserError, FileNotFoundError):
    """A path the user gave that does not exist (one message argument, so that it pickles from a
    worker process)."""


def missing(path: Path | str, what: str = "file or directory", hint: str = "check the path") -> MissingPath:
    return MissingPath(f"{path}: no such {what}; {hint}")


_run_dir: Path | None = None  # where a crash report goes; set once a command knows its run directory


def set_run_dir(path: Path | None) -> None:
    global _run_dir
    _run_dir = Path(path) if path is not None else None


def warn(message: str) -> None:
    """A suspicious outcome the run goes on with: one line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


@contextmanager
def reading(path: Path | str, what: str, local: bool = True) -> Iterator[None]:
    """Turn a failure to read a user's file (truncated, corrupt, wrong format) into one line naming
    it. Keep the block to the read itself: any exception in it is put down to the file (the
    libraries raise anything from ValueError to a bare Exception for a bad file). `local=False`
    lets OSError through: a hub name that could not be fetched is another message."""
    try:
        yield
    except UserError:
        raise
    except OSError as e:
        if not local:
            raise
        raise _unreadable(path, what, e) from None
    except Exception as e:
        raise _unreadable(path, what, e) from None


def _unreadable(path: Path | str, what: str, e: BaseException) -> UserError:
    detail = " ".join(str(e).split())[:200] or type(e).__name__
    return UserError(f"{path}: the {what} cannot be read ({detail}); restore it, or make it again")


def os_error_message(e: OSError) -> str | None:
    """The one-line message for an OS error the user can fix (full disk, permissions), else None."""
    where = e.filename or "writing a file"
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"{where}: no space left on the device (or file size limit reached); free space and rerun"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            f"{where}: permission denied; choose a writable location (e.g. --run-dir) or fix its permissions"
        )
    if e.errno == errno.EADDRINUSE:
        return f"{where}: address already in use; choose another --port or stop the other server"
    if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError)) and e.filename:
        kind = {
            FileNotFoundError: "no such file or directory",
            NotADirectoryError: "not a directory",
            IsADirectoryError: "is a directory, a file was expected",
        }[type(e)]
        return f"{where}: {kind}; check the path"
    return None


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("trulyopen", "torch", "transformers", "tokenizers", "datasets", "fastapi", "pydantic"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_crash_report(exc: BaseException) -> Path:
    """The traceback, versions and command of an internal error, in the run directory (else
    ./runs/crash-reports, else the temporary directory); returns the file."""
    import tempfile

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    lines = [
        f"trulyopen crash report, {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"command: {' '.join(sys.argv)}",
        f"cwd: {os.getcwd()}",
        *(f"{k}: {v}" for k, v in _versions().items()),
        "",
        *traceback.format_exception(exc),
    ]
    text = "\n".join(lines)
    candidates = [_run_dir, Path("runs") / "crash-reports", Path(tempfile.gettempdir())]
    for folder in (c for c in candidates if c is not None):
        target = folder / f"crash-{stamp}-{os.getpid()}.txt"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            return target.resolve()
        except OSError:
            continue
    return Path("(crash report not written: no writable directory)")
