"""Where the model is, whatever the user pointed at: every verb that takes a model takes all of these.

    runs/x/                            a run directory  ─► its newest finetune, else pretrain checkpoint
    runs/x/release/                    a release        ─► release/model/ (a Hugging Face directory)
    runs/x/checkpoints/pretrain/step_N a checkpoint     ─► itself (full weights, or an adapter)
    path/to/model/                     a Hugging Face directory (it has a config.json; `merge` writes
                                       one with a ledger.jsonl beside it)
    Qwen/Qwen2.5-0.5B                  a hub name: anything that is not a path

A path that does not exist is reported as a missing path, never passed on to the hub as a name.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from trulyopen.errors import UserError, missing, reading, set_run_dir
from trulyopen.train.layout import newest

ACCEPTED = "a run directory, a release, a checkpoint, a Hugging Face model directory or hub name"


@dataclass(frozen=True)
class Located:
    kind: Literal["checkpoint", "hf-dir", "hub"]
    path: str  # a directory, or the hub name


def looks_like_path(target: str) -> bool:
    """A hub name is `name` or `owner/name`; anything with more to it, or whose first part is a
    local directory (`runs/typo`), is meant as a path."""
    return (
        target.startswith(("/", ".", "~"))
        or ("/" in target and Path(target.split("/")[0]).is_dir())
        or "\\" in target
        or target.count("/") > 1
        or target.endswith((".yaml", ".yml", ".json", ".jsonl", ".safetensors", ".pt", ".gguf"))
        or target == ""
    )


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run: post-training first, else pretraining."""
    for stage in ("finetune", "pretrain"):
        found = newest(run_dir / "checkpoints" / stage)
        if found is not None:
            return found
    return None


def locate(target: str | Path, field: str = "") -> Located:
    """Classify `target` (see the module docstring); `field` (e.g. "finetune.base") prefixes errors."""
    where = f"{field}: " if field else ""
    text = str(target)
    path = Path(text).expanduser()
    if not path.exists():
        if looks_like_path(text):
            raise missing(f"{where}{text}", hint=f"give {ACCEPTED}")
        return Located("hub", text)
    if path.is_file():
        hint = f" (a recipe: run it with `trulyopen run {text}`)" if path.suffix in (".yaml", ".yml") else ""
        raise UserError(f"{where}{text}: a file, not a model{hint}; give {ACCEPTED}")
    if (path / "state.json").exists():
        return Located("checkpoint", str(path))
    if path.name.startswith("step_") and path.name.endswith(".tmp"):
        raise UserError(
            f"{where}{text}: an unfinished checkpoint (killed while written); give a finished one"
        )
    if (path / "model" / "config.json").exists():
        return Located("hf-dir", str(path / "model"))  # a release: its model/ folder
    if (path / "config.json").exists():  # a model directory, with a ledger too if `merge` made it
        return Located("hf-dir", str(path))
    if (path / "ledger.jsonl").exists():
        ckpt = newest_checkpoint(path)
        if ckpt is None:
            raise UserError(
                f"{where}{text}: a run directory with no checkpoint yet; pretrain or finetune first "
                f"(`trulyopen pretrain {path / 'recipe.yaml'}`)"
            )
        return Located("checkpoint", str(ckpt))
    raise UserError(
        f"{where}{text}: a directory, but not a model (no config.json, state.json, ledger.jsonl or "
        f"model/ in it); give {ACCEPTED}"
    )


def check_model(target: str | Path) -> Located:
    """`locate` a model a verb was given (cheaply: no torch); a run directory also receives any
    crash report."""
    found = locate(target)
    if (Path(target) / "ledger.jsonl").is_file():
        set_run_dir(Path(target))
    return found


@contextmanager
def loading(name_or_dir: str, what: str, field: str = "") -> Iterator[None]:
    """Around a `from_pretrained` call: a local directory that cannot be read, or a hub name that
    cannot be fetched, as one line (with `field`, e.g. "finetune.base", in front)."""
    where = f"{field}: {name_or_dir}" if field else name_or_dir
    local = Path(name_or_dir).exists()
    try:
        with reading(where, what, local=local):
            yield
    except OSError as e:  # not local: a hub name the hub does not have, or no network
        raise hub_error(name_or_dir, e, field) from None


def hub_error(name: str, e: Exception, field: str = "") -> UserError:
    """A hub name that could not be loaded (no such model, or no network), as one line."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    where = f"{field}: " if field else ""
    return UserError(
        f"{where}{name}: not a local path, and no Hugging Face hub model of that name could be loaded "
        f"({first[:160]}); check the name, or give {ACCEPTED}"
    )
