"""How much of each evaluation set a training corpus already contained: word n-gram overlap.

An item counts as contaminated when any run of `ngram` words of its text (`instance_text`: context,
question, choices, prompt, tests, text, a verifier's answer) also occurs in a corpus document. Words
and n-gram hashes are those of `trulyopen.data.ngrams`, the ones decontamination uses, so "reported
clean" and "removed by decontamination" mean the same thing. The default of 13 words follows GPT-3
and OLMo. An item shorter than n words is checked by its whole word sequence instead (GPT-3 lowered
n for short items in the same spirit); an item of fewer than 8 words, GPT-3's lower bound, matches
common code and prose by chance, so it is not checked and is counted under "too_short".

The corpora are what the run trained on: the curated corpus JSONL (`data/corpus/train.jsonl`, the
text the token shards were made from; shards hold token ids, not text, so they are not read) or any
JSONL file with a "text" field, and directories, whose `*.jsonl` files are read as such and whose
other files as plain UTF-8 text.

The evaluation side is small, so its n-gram hashes go into sorted arrays (one per n-gram length) and
the corpus streams past them document by document: each document's hashes are looked up with
`np.searchsorted`, and memory does not grow with the corpus.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trulyopen.data.ngrams import ngram_hashes, word_hashes
from trulyopen.errors import UserError, missing
from trulyopen.evaluate.taskfile import instance_text, load_instances

MIN_WORDS = 8  # shorter items are not checked: a run of so few words is common by chance
EXAMPLES = 5


class CorpusError(UserError, ValueError):
    """A corpus file that cannot be read; the message names the file and line."""


@dataclass
class _Lookup:
    """The sorted unique hashes of one n-gram length, and for each item which of them are its own."""

    hashes: np.ndarray  # sorted unique n-gram hashes of every item checked at this length
    item_of: np.ndarray  # per (item, hash) pair: the item's global index
    hash_of: np.ndarray  # per (item, hash) pair: the index into hashes
    first_doc: np.ndarray  # per hash: the first corpus document holding it, -1 if none


def _lookups(item_grams: list[tuple[int, int, np.ndarray]]) -> dict[int, _Lookup]:
    """Group (item index, n, hashes) by n into lookup tables."""
    by_n: dict[int, list[tuple[int, np.ndarray]]] = {}
    for index, n, grams in item_grams:
        by_n.setdefault(n, []).append((index, grams))
    tables = {}
    for n, entries in by_n.items():
        all_grams = np.concatenate([g for _, g in entries])
        items = np.concatenate([np.full(len(g), i, dtype=np.int64) for i, g in entries])
        hashes, inverse = np.unique(all_grams, return_inverse=True)
        tables[n] = _Lookup(hashes, items, inverse.reshape(-1), np.full(len(hashes), -1, dtype=np.int64))
    return tables


def corpus_documents(corpora: list[Path]) -> Iterator[tuple[str, str]]:
    """(document id, text) of every corpus document, files in the order given, directories sorted."""
    for root in corpora:
        root = Path(root)
        if not root.exists():
            raise missing(root, "corpus", "check the path given to --contamination")
        files = (
            [p for p in sorted(root.rglob("*")) if p.is_file() and not _hidden(p.relative_to(root))]
            if root.is_dir()
            else [root]
        )
        for path in files:
            if path.suffix == ".jsonl":
                yield from _jsonl_documents(path)
            else:
                yield str(path), path.read_text(encoding="utf-8", errors="replace")


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _jsonl_documents(path: Path) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: not valid JSON: {e.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CorpusError(f"{path}:{lineno}: expected an object with a string field 'text'")
            yield str(record.get("id", f"{path}:{lineno}")), record["text"]


def contamination_report(
    task_files: dict[str, Path], kinds: dict[str, str], corpora: list[Path], ngram: int = 13
) -> dict:
    """Per evaluation set: {"items", "checked", "too_short", "contaminated", "share", "examples",
    "ngram", "corpora"}; share = contaminated / items, examples up to 5 {"id", "corpus_doc"} in
    file order, corpus_doc being the first corpus document found sharing an n-gram with the item."""
    if ngram < 1:
        raise ValueError(f"ngram must be at least 1, got {ngram}")
    min_words = min(MIN_WORDS, ngram)
    ids: list[tuple[str, str]] = []  # (task, item id) per global item index
    item_grams: list[tuple[int, int, np.ndarray]] = []
    too_short = dict.fromkeys(task_files, 0)
    for name, path in task_files.items():
        for inst in load_instances(Path(path), kinds[name]):
            words = word_hashes(instance_text(inst))
            n = min(ngram, len(words))
            if n < min_words:
                too_short[name] += 1
            else:
                item_grams.append((len(ids), n, np.unique(ngram_hashes(words, n))))
            ids.append((name, inst.id))

    tables = _lookups(item_grams) if item_grams else {}
    hit_docs: dict[int, str] = {}  # document ids are kept only for documents that matched
    documents = corpus_documents(corpora) if tables else iter(())
    for doc_index, (doc_id, text) in enumerate(documents):
        words = word_hashes(text)
        for n, table in tables.items():
            grams = ngram_hashes(words, n)
            if not len(grams):
                continue
            pos = np.minimum(np.searchsorted(table.hashes, grams), len(table.hashes) - 1)
            found = pos[table.hashes[pos] == grams]
            new = found[table.first_doc[found] < 0]
            if len(new):
                table.first_doc[new] = doc_index
                hit_docs[doc_index] = doc_id

    # an item's match is the earliest document holding any of its n-grams
    none = np.iinfo(np.int64).max
    match = np.full(len(ids), none, dtype=np.int64)
    for table in tables.values():
        docs = table.first_doc[table.hash_of]
        held = docs >= 0
        np.minimum.at(match, table.item_of[held], docs[held])

    report = {
        name: {"items": 0, "checked": 0, "too_short": too_short[name], "contaminated": 0, "examples": []}
        for name in task_files
    }
    for index, (name, item_id) in enumerate(ids):
        entry = report[name]
        entry["items"] += 1
        if match[index] != none:
            entry["contaminated"] += 1
            if len(entry["examples"]) < EXAMPLES:
                entry["examples"].append({"id": item_id, "corpus_doc": hit_docs[int(match[index])]})
    for entry in report.values():
        entry["checked"] = entry["items"] - entry["too_short"]
        entry["share"] = entry["contaminated"] / entry["items"] if entry["items"] else 0.0
        entry["ngram"] = ngram
        entry["corpora"] = [str(p) for p in corpora]
    return report
