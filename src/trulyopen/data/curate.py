"""The data stage: read every source, clean, filter, deduplicate, decontaminate and split.

    read ─► clean ─► filter ─► exact dedup ─► near dedup ─► decontaminate ─► split ─► data/corpus/*.jsonl

Per-document work (cleaning, filters, hashes, MinHash signatures, n-gram checks) runs in worker
processes over fixed chunks whose results come back in order, so the output does not depend on the
number of workers. The decisions that need the whole corpus (which duplicate to keep) are made
afterwards in one process. Every step records documents and bytes in and out and why each removed
document went; `data/removed.jsonl` lists every removed document with its step and reason.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trulyopen.data.clean import clean_text, filter_reason
from trulyopen.data.decontam import Decontaminator, eval_set_files, load_eval_ngrams
from trulyopen.data.dedup import MinHasher, content_hash, exact_duplicates, lsh_clusters
from trulyopen.data.sources import DataError, Document, Problem, read_source
from trulyopen.files import atomic_open, write_json
from trulyopen.parallel import ordered_map
from trulyopen.progress import Progress
from trulyopen.recipe import DataConfig

CHUNK_DOCS = 64


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


@dataclass
class Analysis:
    """What the workers compute for one document."""

    text: str
    nbytes: int
    changes: dict[str, int]
    reason: str | None
    sha: str
    signature: np.ndarray | None
    contaminated_by: list[str]


# Worker state, set once per process by `_init` (shipping it with every chunk would be wasteful).
_cfg: DataConfig | None = None
_minhasher: MinHasher | None = None
_decontaminator: Decontaminator | None = None


def _init(cfg: DataConfig, eval_ngrams: dict[str, np.ndarray]) -> None:
    global _cfg, _minhasher, _decontaminator
    _cfg = cfg
    _minhasher = MinHasher(cfg.dedup) if cfg.dedup.near else None
    _decontaminator = Decontaminator(eval_ngrams, cfg.decontamination.ngram)


def _analyse(texts: list[str]) -> list[Analysis]:
    cleaned = [clean_text(t, _cfg.clean, _cfg.pii) for t in texts]
    reasons = [filter_reason(t, _cfg.filters) for t, _ in cleaned]
    kept = [t for (t, _), r in zip(cleaned, reasons, strict=True) if r is None]
    sigs = iter(_minhasher.signatures(kept) if _minhasher and kept else [])
    out = []
    for (text, changes), reason in zip(cleaned, reasons, strict=True):
        sig = next(sigs) if reason is None and _minhasher else None
        matches = _decontaminator.matches(text) if reason is None else []
        out.append(Analysis(text, len(text.encode()), changes, reason, content_hash(text), sig, matches))
    return out


def _analyse_all(docs: list[Document], cfg: DataConfig, eval_ngrams: dict, workers: int) -> list[Analysis]:
    chunks = [[d.text for d in docs[i : i + CHUNK_DOCS]] for i in range(0, len(docs), CHUNK_DOCS)]
    results: list[Analysis] = []
    with Progress("curate", len(docs)) as bar:
        for part in ordered_map(_analyse, chunks, workers, _init, (cfg, eval_ngrams)):
            results.extend(part)
            bar.update(len(part), sum(a.nbytes for a in part))
    return results


def split_of(doc_id: str, val_fraction: float) -> str:
    """'val' or 'train' from a hash of the document id: stable when other documents come and go."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")
    return "val" if h < val_fraction * 2**64 else "train"


def read_all(cfg: DataConfig, files: dict[str, list[Path]]) -> tuple[list[Document], list[Problem], Step]:
    """Every document of every source, in recipe order; problems are collected, or fatal if strict."""
    step = Step("read")
    docs: list[Document] = []
    problems: list[Problem] = []
    for src in cfg.sources:
        step.bytes_in += sum(p.stat().st_size for p in files[src.name])
        for item in read_source(src, files[src.name], cfg.clean.undecodable):
            if isinstance(item, Problem):
                if cfg.strict:
                    raise DataError(f"{item} (data.strict is set; unset it to skip and count such input)")
                problems.append(item)
                reason = item.reason.split(" at ")[0]  # "invalid UTF-8 at byte 3" counts as "invalid UTF-8"
                step.removed[reason] += 1
                step.removed_bytes[reason] += item.nbytes
                continue
            if item.meta.get("replaced_bytes"):
                step.changed["invalid_utf8_replaced"] += 1
            docs.append(item)
    step.docs_in = step.docs_out = len(docs)
    step.docs_in += len(problems)
    return docs, problems, step


def curate(cfg: DataConfig, out_dir: Path, files: dict[str, list[Path]], workers: int) -> dict[str, Any]:
    """Run the data stage into `out_dir` (the run's data/); return the curation record."""
    docs, problems, read = read_all(cfg, files)
    eval_files = eval_set_files(cfg.decontamination.eval_files)
    eval_ngrams = load_eval_ngrams(eval_files, cfg.decontamination.text_field, cfg.decontamination.ngram)
    results = _analyse_all(docs, cfg, eval_ngrams, workers)
    read.bytes_out = sum(a.nbytes for a in results)  # bytes as decoded text, before cleaning
    removed: list[dict[str, Any]] = []

    def run_step(name: str, alive: list[int], verdict) -> tuple[Step, list[int]]:
        """Apply verdict(i) -> (reason or None, extra) to the alive documents."""
        step = Step(name, docs_in=len(alive), bytes_in=sum(results[i].nbytes for i in alive))
        kept = []
        for i in alive:
            reason, extra = verdict(i)
            if reason is None:
                kept.append(i)
            else:
                step.removed[reason] += 1
                step.removed_bytes[reason] += results[i].nbytes
                removed.append({"id": docs[i].id, "step": name, "reason": reason, **extra})
        step.docs_out, step.bytes_out = len(kept), sum(results[i].nbytes for i in kept)
        return step, kept

    alive = list(range(len(docs)))
    clean = Step("clean", len(alive), read.bytes_out, len(alive), sum(a.nbytes for a in results))
    for a in results:
        clean.changed.update(a.changes)
    steps = [read, clean]

    step, alive = run_step("filter", alive, lambda i: (results[i].reason, {}))
    steps.append(step)

    def duplicates(name: str, reason: str, rep_of: dict[int, int]) -> tuple[Step, list[int], Counter]:
        """Remove every document whose cluster representative is another document."""
        step, kept = run_step(
            name,
            alive,
            lambda i: (None, {}) if rep_of[i] == i else (reason, {"duplicate_of": docs[rep_of[i]].id}),
        )
        sizes = Counter(Counter(r for i, r in rep_of.items() if r != i).values())  # copies per cluster
        return step, kept, Counter({n + 1: k for n, k in sizes.items()})  # cluster size -> clusters

    exact_sizes = near_sizes = Counter()
    if cfg.dedup.exact:
        first = exact_duplicates([results[i].sha for i in alive])
        rep_of = {i: i if j is None else alive[j] for i, j in zip(alive, first, strict=True)}
        step, alive, exact_sizes = duplicates("exact_dedup", "exact_duplicate", rep_of)
        steps.append(step)
    if cfg.dedup.near and alive:
        rep = lsh_clusters(
            np.stack([results[i].signature for i in alive]), cfg.dedup.bands, cfg.dedup.threshold
        )
        rep_of = {i: alive[r] for i, r in zip(alive, rep, strict=True)}
        step, alive, near_sizes = duplicates("near_dedup", "near_duplicate", rep_of)
        steps.append(step)

    contamination = Counter()
    for i in alive:
        contamination.update(results[i].contaminated_by)
    step, alive = run_step(
        "decontamination",
        alive,
        lambda i: (
            ("eval_overlap", {"eval_sets": results[i].contaminated_by})
            if results[i].contaminated_by
            else (None, {})
        ),
    )
    steps.append(step)

    if not alive:
        why = "; ".join(f"{s.name}: {dict(s.removed)}" for s in steps if s.removed)
        raise DataError(f"the corpus is empty after filtering ({why or 'no documents were read'})")

    splits: dict[str, dict[str, int]] = {"train": {"docs": 0, "bytes": 0}, "val": {"docs": 0, "bytes": 0}}
    corpus = out_dir / "corpus"
    with atomic_open(corpus / "train.jsonl") as train, atomic_open(corpus / "val.jsonl") as val:
        for i in alive:
            d = docs[i]
            name = split_of(d.id, cfg.split.val_fraction)
            record = {"id": d.id, "source": d.source, "meta": d.meta, "text": results[i].text}
            (val if name == "val" else train).write(json.dumps(record, ensure_ascii=False) + "\n")
            splits[name]["docs"] += 1
            splits[name]["bytes"] += results[i].nbytes
    with atomic_open(out_dir / "removed.jsonl") as f:
        for r in removed:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

    record = {
        "steps": [s.as_dict() for s in steps],
        "problems": [vars(p) for p in problems],
        "dedup": {
            "exact_clusters": dict(sorted(exact_sizes.items())),
            "near_clusters": dict(sorted(near_sizes.items())),
            "near_params": cfg.dedup.model_dump(),
        },
        "contamination": {
            "ngram": cfg.decontamination.ngram,
            "eval_sets": {str(p): contamination.get(str(p), 0) for p in eval_files},
        },
        "splits": splits,
        "doc_chars": sorted(len(results[i].text) for i in alive),
    }
    write_json(out_dir / "curation.json", record)
    return record
