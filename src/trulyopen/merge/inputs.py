"""The models a merge reads: located as every verb locates a model, read tensor by tensor, checked alike.

    runs/x/checkpoints/pretrain/step_N  its model.safetensors, config.json, the run's tokenizer
    an adapter checkpoint (LoRA, QLoRA) merged into its base first (as `export`, `eval` and `serve`
                                        see it), written to a scratch directory beside the output
    a Hugging Face directory            model.safetensors or model.safetensors.index.json
    a hub name                          downloaded (config, safetensors, tokenizer), then as above

Nothing is loaded whole: a `Source` maps tensor names to the safetensors files holding them, and
`read` hands back one tensor at a time. Models that cannot be merged are refused before any tensor
is read, naming the first difference: the config (model type and every field that decides the
math), then the tensors' names and shapes, then the tokenizer's vocabulary.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from trulyopen.errors import reading
from trulyopen.locate import hub_error, locate
from trulyopen.merge.methods import MergeError

# config fields that leave the weights' meaning alone: bookkeeping, outputs asked for, initialisation,
# and token ids (the tokenizers are compared instead)
IGNORED = {
    "_name_or_path",
    "_commit_hash",
    "transformers_version",
    "architectures",
    "dtype",
    "torch_dtype",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "initializer_range",
    "id2label",
    "label2id",
    "problem_type",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]


@dataclass(frozen=True)
class Source:
    """One model to merge: where its tensors, config and tokenizer are, and which files made it."""

    arg: str  # as the user gave it
    kind: str  # checkpoint | adapter | hf-dir | hub
    config_dir: Path  # holds config.json (and generation_config.json, if the model has one)
    weights: dict[str, Path]  # tensor name -> safetensors file
    tokenizer: Path
    files: tuple[Path, ...]  # what the ledger hashes: the model as the user pointed at it
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. an adapter's base

    def record(self, role: str) -> dict[str, Any]:
        return {"model": self.arg, "role": role, "kind": self.kind, **self.extra}


def resolve(arg: str, scratch: Path, flag: str = "") -> Source:
    """Locate `arg` (`flag`, e.g. "--base", names it in errors) and say where its parts are."""
    found = locate(arg, flag)
    path = Path(found.path)
    if found.kind == "hub":
        return _hf_dir(arg, "hub", _download(arg))
    if found.kind == "hf-dir":
        return _hf_dir(arg, "hf-dir", path)
    from trulyopen.train.checkpoint import read_state, tokenizer_dir

    tok = tokenizer_dir(path)
    if tok is None:
        raise MergeError(f"{arg}: no tokenizer found for this checkpoint (its run's tokenizer/ is gone)")
    made = [path / n for n in ("config.json", "model.safetensors", "adapter.safetensors", "state.json")]
    files = (*(p for p in made if p.exists()), *_tokenizer_files(tok))
    if (path / "adapter.safetensors").exists():
        exported = _export(path, scratch)
        return replace(
            _hf_dir(arg, "adapter", exported), files=files, extra={"adapter_base": read_state(path)["base"]}
        )
    if not (path / "model.safetensors").exists():
        raise MergeError(f"{arg}: no model.safetensors in this checkpoint; restore it, or make it again")
    weights = dict.fromkeys(_names(path / "model.safetensors"), path / "model.safetensors")
    return Source(arg, "checkpoint", path, weights, tok, files)


def _export(ckpt: Path, scratch: Path) -> Path:
    """A checkpoint in the Hugging Face format (an adapter merged into its base), in `scratch`."""
    from trulyopen.model.export import export_checkpoint

    return export_checkpoint(ckpt, Path(tempfile.mkdtemp(prefix="model-", dir=scratch)) / "hf")


def _download(name: str) -> Path:
    """A hub model's config, safetensors and tokenizer files, through the hub's cache."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except Exception as e:  # not on the hub, gated, or no network: the hub raises many kinds
        raise hub_error(name, e) from None


def _hf_dir(arg: str, kind: str, path: Path) -> Source:
    index = path / "model.safetensors.index.json"
    if index.exists():
        with reading(index, "weights index"):
            weight_map = json.loads(index.read_text())["weight_map"]
        weights = {name: path / file for name, file in weight_map.items()}
    elif (path / "model.safetensors").exists():
        weights = dict.fromkeys(_names(path / "model.safetensors"), path / "model.safetensors")
    else:
        raise MergeError(
            f"{arg}: no model.safetensors or model.safetensors.index.json; weights are read from "
            "safetensors only (never unpickled): save the model with safe_serialization"
        )
    parts = [path / "config.json", *sorted(set(weights.values())), index, path / "generation_config.json"]
    files = (*(p for p in parts if p.exists()), *_tokenizer_files(path))
    return Source(arg, kind, path, weights, path, files)


def _names(file: Path) -> list[str]:
    from safetensors import safe_open

    with reading(file, "weights file"), safe_open(str(file), "pt") as f:
        return list(f.keys())


def _tokenizer_files(folder: Path) -> list[Path]:
    return [folder / n for n in TOKENIZER_FILES if (folder / n).exists()]


def as_hf(source: Source, scratch: Path) -> Source:
    """A checkpoint read through its Hugging Face export, whose tensor names are the hub's
    (transformers fuses mixture-of-experts weights in memory, as checkpoints hold them, and writes
    them one expert at a time)."""
    if source.kind != "checkpoint":
        return source
    exported = _hf_dir(source.arg, source.kind, _export(source.config_dir, scratch))
    return replace(exported, tokenizer=source.tokenizer, files=source.files)


def check_compatible(sources: list[Source], scratch: Path) -> list[Source]:
    """Refuse models that are not one architecture with one tokenizer, naming the first difference;
    returns the sources, checkpoints read through their export where only that makes names agree."""
    first, *others = sources
    config = _config(first)
    for other in others:
        _compare_configs(first, config, other, _config(other))
    if (
        len({frozenset(s.weights) for s in sources}) > 1
        and len({s.kind == "checkpoint" for s in sources}) > 1
    ):
        sources = [as_hf(s, scratch) for s in sources]
        first, *others = sources
    shapes = _shapes(first)
    for other in others:
        _compare_tensors(first, shapes, other, _shapes(other))
    vocab = _vocabulary(first)
    for other in others:
        _compare_vocabularies(first, vocab, other, _vocabulary(other))
    return sources


def _differ(a: Source, b: Source, what: str) -> MergeError:
    return MergeError(
        f"{b.arg}: not the same architecture as {a.arg}: {what}; merge only models of one architecture "
        "and tokenizer (checkpoints of one run, or fine-tunes of one base)"
    )


def _config(source: Source) -> dict[str, Any]:
    from transformers import AutoConfig

    with reading(source.config_dir / "config.json", "model config"):
        return AutoConfig.from_pretrained(str(source.config_dir)).to_dict()


def _compare_configs(a: Source, ca: dict, b: Source, cb: dict) -> None:
    if ca.get("model_type") != cb.get("model_type"):
        raise _differ(a, b, f"model_type {cb.get('model_type')!r} here, {ca.get('model_type')!r} there")
    for key in sorted((set(ca) | set(cb)) - IGNORED):
        if ca.get(key) != cb.get(key):
            raise _differ(a, b, f"config {key} is {cb.get(key)!r} here, {ca.get(key)!r} there")


def _shapes(source: Source) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    out = {}
    for file in sorted(set(source.weights.values())):
        with reading(file, "weights file"), safe_open(str(file), "pt") as f:
            for name in f.keys():
                if name in source.weights:
                    out[name] = tuple(f.get_slice(name).get_shape())
    missing = sorted(set(source.weights) - set(out))
    if missing:
        raise MergeError(f"{source.arg}: tensor {missing[0]} is in the weights index but in no weights file")
    return out


def _compare_tensors(a: Source, sa: dict, b: Source, sb: dict) -> None:
    only_a, only_b = sorted(set(sa) - set(sb)), sorted(set(sb) - set(sa))
    if only_a:
        raise _differ(a, b, f"it has no tensor {only_a[0]}")
    if only_b:
        raise _differ(a, b, f"tensor {only_b[0]} is here only")
    for name in sa:
        if sa[name] != sb[name]:
            raise _differ(a, b, f"tensor {name} has shape {list(sb[name])} here, {list(sa[name])} there")


def _vocabulary(source: Source) -> tuple[dict[str, int], Any]:
    """(token -> id, the BPE merges or None) of a model's tokenizer."""
    from transformers import AutoTokenizer

    with reading(source.tokenizer, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(str(source.tokenizer))
    backend = getattr(tok, "backend_tokenizer", None)
    merges = json.loads(backend.to_str())["model"].get("merges") if backend is not None else None
    return tok.get_vocab(), merges


def _compare_vocabularies(a: Source, va: tuple, b: Source, vb: tuple) -> None:
    (ta, ma), (tb, mb) = va, vb
    if len(ta) != len(tb):
        raise _differ(a, b, f"the tokenizer has {len(tb):,} tokens here, {len(ta):,} there")
    for token, i in sorted(ta.items(), key=lambda kv: kv[1]):
        if tb.get(token) != i:
            raise _differ(a, b, f"token {token!r} is id {tb.get(token)} here, {i} there")
    if ma != mb:
        raise _differ(a, b, "the tokenizers' BPE merges differ")


class Reader:
    """The open safetensors files of the sources: `read(name)` gives that tensor of each, one at a time."""

    def __init__(self, sources: list[Source]):
        self.sources = sources
        self._stack = ExitStack()
        self._open: dict[Path, Any] = {}

    def __enter__(self) -> Reader:
        from safetensors import safe_open

        for source in self.sources:
            for file in set(source.weights.values()):
                if file not in self._open:
                    self._open[file] = self._stack.enter_context(safe_open(str(file), "pt"))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def read(self, name: str) -> list[torch.Tensor]:
        out = []
        for source in self.sources:
            file = source.weights[name]
            with reading(file, "weights file"):
                out.append(self._open[file].get_tensor(name))
        return out
