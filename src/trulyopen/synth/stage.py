"""The synth stage: post-training data derived from the run's own curated corpus.

    train.jsonl ─► parse ─► functions ─► sft.jsonl (docstring + signature -> the real function)
                     │           └─────► preference.jsonl (the real function against a corrupted one)
                     ├────► constant expressions ─► sandbox ─► grpo.jsonl (prompts with checked answers)
                     └────► tools + literal calls ─► sandbox ─► tools.jsonl (tool-use conversations)
                                                               tools_heldout.jsonl (for evaluation)

Only the train split is read: the validation split feeds evaluation and must not leak into tuning.
Every candidate gets a stable id, and each kind keeps the `max_per_kind` candidates whose seeded
hash of that id is smallest, so the selection is a pure function of (corpus, config): the same
inputs give the same bytes, a different seed a different sample, and one added document does not
reshuffle the rest. A candidate sharing a word n-gram with an evaluation set is dropped and the
next one taken. Records are written in corpus order, with `manifest.json` (counts, hashes) and
`SYNTHCARD.md` (the same for people) beside them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trulyopen.data.decontam import Decontaminator, eval_set_files, load_eval_ngrams
from trulyopen.data.sources import DataError
from trulyopen.files import sha256_bytes, sha256_file, write_json, write_text
from trulyopen.parallel import ordered_map
from trulyopen.progress import Progress
from trulyopen.recipe import DecontaminationConfig, SynthConfig
from trulyopen.synth import expressions as ex
from trulyopen.synth import tool_use
from trulyopen.synth.card import write_card
from trulyopen.synth.code_tasks import (
    Function,
    find_functions,
    parse_python,
    preference_id,
    preference_record,
    rank_key,
    sft_id,
    sft_record,
    stable_id,
)
from trulyopen.synth.remote import remote_step

KINDS = ("sft", "preference", "grpo", "tools")
HELDOUT = "tools_heldout"  # tool-use conversations of held-out functions, for evaluation
CHUNK_DOCS = 32


@dataclass
class Candidate:
    """Something that may become a record: its id, its place in the corpus, what it is made from."""

    id: str
    order: tuple[int, int]
    item: Any  # a Function, or (expression, source document)


def read_corpus(path: Path) -> list[tuple[str, str, str]]:
    """(id, source, text) of every document of a corpus JSONL file; DataError names a bad line."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON: {e.msg}") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object with id and text")
            doc_id, text = record.get("id"), record.get("text")
            if not isinstance(doc_id, str) or not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: a corpus record needs a string id and a string text")
            docs.append((doc_id, str(record.get("source", "")), text))
    return docs


# Worker state, set once per process by `_init`.
_max_answer_lines = 0
_kinds: tuple[str, ...] = ()


def _init(max_answer_lines: int, kinds: tuple[str, ...]) -> None:
    global _max_answer_lines, _kinds
    _max_answer_lines, _kinds = max_answer_lines, kinds


@dataclass
class Analysed:
    """What one document offers."""

    parsed: bool
    functions: list[Function] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # functions left out, by reason
    found: ex.Found = field(default_factory=lambda: ex.Found([], Counter()))
    tools: list[tool_use.Tool] = field(default_factory=list)
    calls: list[tool_use.Call] = field(default_factory=list)
    tools_skipped: Counter = field(default_factory=Counter)


def _analyse(chunk: list[tuple[int, str, str]]) -> list[Analysed]:
    """Per document: its usable functions, expressions, tools and literal calls."""
    out = []
    for index, doc_id, text in chunk:
        tree = parse_python(text)
        a = Analysed(tree is not None)
        if tree is not None:
            if {"sft", "preference"} & set(_kinds):
                a.functions = find_functions(doc_id, tree, text, _max_answer_lines, index, a.skipped)
            if "grpo" in _kinds:
                a.found = ex.find_expressions(tree)
            if "tools" in _kinds:
                a.tools = tool_use.find_tools(doc_id, tree, a.tools_skipped)
                a.calls = tool_use.find_calls(doc_id, tree, index)
        out.append(a)
    return out


def _chunks(docs: list[tuple[str, str, str]]) -> Iterator[list[tuple[int, str, str]]]:
    for start in range(0, len(docs), CHUNK_DOCS):
        yield [(start + i, d[0], d[2]) for i, d in enumerate(docs[start : start + CHUNK_DOCS])]


@dataclass
class Scan:
    """What the corpus offers: usable functions and safe expressions, and counts of the rest."""

    functions: list[Function] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # functions left out, by reason
    expressions: dict[str, tuple[str, tuple[int, int]]] = field(default_factory=dict)  # first occurrence
    occurrences: int = 0  # safe expressions found, repeats included
    rejected: Counter = field(default_factory=Counter)  # expressions refused, by reason
    unparsable: list[str] = field(default_factory=list)  # ids of documents that are not Python
    tools: list[tool_use.Tool] = field(default_factory=list)
    calls: list[tool_use.Call] = field(default_factory=list)
    tools_skipped: Counter = field(default_factory=Counter)  # functions that make no tool, by reason


def _scan(
    docs: list[tuple[str, str, str]], max_answer_lines: int, kinds: tuple[str, ...], workers: int
) -> Scan:
    scan = Scan()
    analysed = ordered_map(_analyse, _chunks(docs), workers, _init, (max_answer_lines, kinds))
    index = 0
    with Progress("synth", len(docs)) as bar:
        for chunk in analysed:
            for a in chunk:
                doc_id = docs[index][0]
                bar.update()
                if not a.parsed:
                    scan.unparsable.append(doc_id)
                else:
                    scan.functions.extend(a.functions)
                    scan.skipped.update(a.skipped)
                    scan.rejected.update(a.found.rejected)
                    scan.occurrences += len(a.found.expressions)
                    for j, text in enumerate(a.found.expressions):
                        scan.expressions.setdefault(text, (doc_id, (index, j)))
                    scan.tools.extend(a.tools)
                    scan.calls.extend(a.calls)
                    scan.tools_skipped.update(a.tools_skipped)
                index += 1
    return scan


Made = tuple[dict | None, str]  # a record, or None and why none could be made
Maker = Callable[[list[Candidate]], list[Made]]


class Selection:
    """Takes candidates in seeded order, makes records, drops contaminated ones, up to a limit."""

    def __init__(self, limit: int, decontaminator: Decontaminator | None, eval_sets: list[str]):
        self.limit, self.decontaminator = limit, decontaminator
        self.removed = Counter({name: 0 for name in eval_sets})  # examples removed, per eval set
        self.contaminated = 0
        self.checked = 0
        self.failed: Counter = Counter()  # candidates that made no record, by reason

    def run(
        self,
        candidates: list[Candidate],
        seed: int,
        make: Maker,
        text_of: Callable[[dict], str],
    ) -> list[tuple[Candidate, dict]]:
        """(candidate, record) pairs in seeded order; `make` turns a batch into (record or None, reason)."""
        ranked = sorted(candidates, key=lambda c: rank_key(seed, c.id))
        kept: list[tuple[Candidate, dict]] = []
        pos = 0
        while len(kept) < self.limit and pos < len(ranked):
            batch = ranked[pos : pos + self.limit - len(kept)]
            pos += len(batch)
            for cand, (record, reason) in zip(batch, make(batch), strict=True):
                if record is None:
                    self.failed[reason] += 1
                    continue
                self.checked += 1
                hits = self.decontaminator.matches(text_of(record)) if self.decontaminator else []
                if hits:
                    self.contaminated += 1
                    self.removed.update(hits)
                    continue
                kept.append((cand, record))
        return kept

    def stats(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "failed": dict(sorted(self.failed.items())),
            "decontaminated": self.contaminated,
            "decontaminated_by_eval_set": dict(sorted(self.removed.items())),
        }


def sft_text(record: dict) -> str:
    return "\n".join(m["content"] for m in record["messages"])


def preference_text(record: dict) -> str:
    return "\n".join((record["prompt"], record["chosen"], record["rejected"]))


def grpo_text(record: dict) -> str:
    return f"{record['prompt']}\n{record['verifier']['answer']}"


def _make_sft(batch: list[Candidate]) -> list[Made]:
    return [(sft_record(c.item), "") for c in batch]


def _grpo_maker(verifiers: Counter) -> Maker:
    def make(batch: list[Candidate]) -> list[Made]:
        out: list[Made] = []
        for c, result in zip(batch, ex.evaluate([c.item[0] for c in batch]), strict=True):
            if not result.ok:
                out.append((None, result.why))
                continue
            expression, doc_id = c.item
            verifier = ex.verifier(result)
            verifiers[verifier["type"]] += 1
            record = {"id": c.id, "source_doc": doc_id, "prompt": ex.prompt(expression), "verifier": verifier}
            out.append((record, ""))
        return out

    return make


def _preference_maker(seed: int, corruptions: Counter) -> Maker:
    def make(batch: list[Candidate]) -> list[Made]:
        out: list[Made] = []
        for c in batch:
            made = preference_record(c.item, seed)
            if made is None:
                out.append((None, "nothing_to_corrupt"))
            else:
                corruptions[made[1]] += 1
                out.append((made[0], ""))
        return out

    return make


def _tools_maker(
    text_of: dict[str, str], pool: list[tool_use.Tool], per_example: int, seed: int, workers: int
) -> Maker:
    """Runs a batch's calls in the sandbox, one program per defining document (`workers` at a
    time), and makes a conversation of each call that returned."""
    from concurrent.futures import ThreadPoolExecutor

    def make(batch: list[Candidate]) -> list[Made]:
        by_doc: dict[str, list[int]] = {}
        for k, c in enumerate(batch):
            by_doc.setdefault(c.item.tool.doc_id, []).append(k)

        def run(doc_id: str) -> list[dict]:
            calls = [(batch[k].item.tool.name, batch[k].item.arguments) for k in by_doc[doc_id]]
            path = doc_id.split("/", 1)[-1]
            return tool_use.run_calls(text_of[doc_id], path, tool_use.module_of(doc_id), calls)

        results: list[dict] = [{}] * len(batch)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as threads:
            for doc_id, outcome in zip(by_doc, threads.map(run, by_doc), strict=True):
                for k, r in zip(by_doc[doc_id], outcome, strict=True):
                    results[k] = r
        return [
            (tool_use.record(c.item, r["result"], pool, per_example, seed), "")
            if r["ok"]
            else (None, r["why"])
            for c, r in zip(batch, results, strict=True)
        ]

    return make


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def _data_sources(corpus_dir: Path, used: Counter) -> list[dict[str, Any]]:
    """The corpus sources with their licences (from the data manifest when there is one)."""
    manifest = corpus_dir.parent / "manifest.json"
    licences: dict[str, str] = {}
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            licences = {s["name"]: s.get("license", "unknown") for s in data.get("sources", [])}
        except (ValueError, KeyError, TypeError, AttributeError):
            licences = {}
    names = sorted(set(licences) | set(used))
    return [{"name": n, "license": licences.get(n, "unknown"), "examples": used.get(n, 0)} for n in names]


def synthesize(
    cfg: SynthConfig,
    corpus_dir: Path,
    out_dir: Path,
    decontamination: DecontaminationConfig | None = None,
    *,
    workers: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Make the kinds in `cfg.kinds` from `corpus_dir/train.jsonl` into `out_dir`; returns the manifest."""
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    train = corpus_dir / "train.jsonl"
    if not train.is_file():
        raise DataError(f"{train}: no such file; synth needs the curated corpus (run the data stage first)")
    kinds = tuple(k for k in KINDS if k in cfg.kinds)
    docs = read_corpus(train)
    source_of = {doc_id: source for doc_id, source, _ in docs}

    scan = _scan(docs, cfg.max_answer_lines, kinds, workers)
    functions = scan.functions

    decontaminator, eval_sets = None, []
    if decontamination is not None and decontamination.eval_files:
        files = eval_set_files(decontamination.eval_files)
        eval_sets = [str(f) for f in files]
        ngrams = load_eval_ngrams(files, decontamination.text_field, decontamination.ngram)
        decontaminator = Decontaminator(ngrams, decontamination.ngram)

    outputs: dict[str, list[dict]] = {}
    kind_stats: dict[str, dict[str, Any]] = {}
    remote_stats: dict[str, Any] | None = None
    for kind in kinds:
        selection = Selection(cfg.max_per_kind, decontaminator, eval_sets)
        extra: Counter = Counter()
        if kind == "sft":
            cands = [Candidate(sft_id(f), f.order, f) for f in functions]
            kept = selection.run(cands, cfg.seed, _make_sft, sft_text)
        elif kind == "preference":
            cands = [Candidate(preference_id(f), f.order, f) for f in functions]
            kept = selection.run(cands, cfg.seed, _preference_maker(cfg.seed, extra), preference_text)
        elif kind == "grpo":
            cands = [
                Candidate("grpo-" + stable_id("grpo", text), order, (text, doc_id))
                for text, (doc_id, order) in scan.expressions.items()
            ]
            kept = selection.run(cands, cfg.seed, _grpo_maker(extra), grpo_text)
        else:
            asked, held = tool_use.questions(scan.tools, scan.calls, cfg.seed, cfg.tools_heldout, extra)
            held_keys = {q.tool.key for q in held if q.held_out == "function"}  # never shown in training
            pool = sorted((t for t in scan.tools if t.key not in held_keys), key=lambda t: t.key)
            text_of = {doc_id: text for doc_id, _, text in docs}
            make = _tools_maker(text_of, pool, cfg.tools_per_example, cfg.seed, workers)
            cands = [Candidate(q.id, q.order, q) for q in asked]
            kept = selection.run(cands, cfg.seed, make, sft_text)  # (chat records, as sft's)
            held_out = Selection(cfg.max_per_kind, decontaminator, eval_sets)
            held_kept = held_out.run([Candidate(q.id, q.order, q) for q in held], cfg.seed, make, sft_text)
            outputs[HELDOUT] = [r for _, r in sorted(held_kept, key=lambda k: k[0].order)]
        records = [record for _, record in kept]
        order = {record["id"]: cand.order for cand, record in kept}
        if kind == "sft" and cfg.remote is not None:
            records, remote_stats = remote_step(records, cfg.remote, log=log)
            records, reverted = _recheck(records, kept, decontaminator)
            remote_stats["reverted_for_contamination"] = reverted
        records.sort(key=lambda r: order[r["id"]])
        outputs[kind] = records
        stats = {"candidates": len(cands), **selection.stats(), "selected": len(kept), "kept": len(records)}
        if kind == "preference":
            stats["corruptions"] = dict(sorted(extra.items()))
        if kind == "tools":
            stats.update(
                tools=len(scan.tools),
                tools_skipped=dict(sorted(scan.tools_skipped.items())),
                calls=len(scan.calls),
                **dict(sorted(extra.items())),
                heldout={
                    "candidates": len(held),
                    **held_out.stats(),
                    "kept": len(held_kept),
                    "kept_by_kind": dict(Counter(r["held_out"] for _, r in held_kept)),
                },
            )
        if kind == "grpo":
            stats.update(
                occurrences=scan.occurrences,
                rejected=dict(sorted(scan.rejected.items())),
                verifiers=dict(sorted(extra.items())),
            )
        kind_stats[kind] = stats

    for kind in (*KINDS, HELDOUT):  # a kind no longer asked for must not leave a stale file behind
        if kind not in outputs and (out_dir / f"{kind}.jsonl").exists():
            (out_dir / f"{kind}.jsonl").unlink()
    files = {}
    used: Counter = Counter()
    for kind, records in outputs.items():
        data = _jsonl(records)
        write_text(out_dir / f"{kind}.jsonl", data.decode("utf-8"))
        files[f"{kind}.jsonl"] = {"records": len(records), "bytes": len(data), "sha256": sha256_bytes(data)}
        used.update(source_of[r["source_doc"]] for r in records)

    manifest = {
        "stage": "synth",
        "config": cfg.model_dump(mode="json"),
        "corpus": {
            "file": str(train),
            "sha256": sha256_file(train),
            "docs": len(docs),
            "unparsable": len(scan.unparsable),
            "unparsable_examples": scan.unparsable[:20],
        },
        "sources": _data_sources(corpus_dir, used),
        "functions": {
            "usable": len(functions),
            "skipped": dict(sorted(scan.skipped.items())),
            "max_answer_lines": cfg.max_answer_lines,
        },
        "decontamination": None
        if decontaminator is None
        else {
            "ngram": decontamination.ngram,
            "text_field": decontamination.text_field,
            "eval_sets": eval_sets,
        },
        "kinds": kind_stats,
        "remote": remote_stats,
        "files": files,
    }
    write_json(out_dir / "manifest.json", manifest)
    write_card(manifest, out_dir / "SYNTHCARD.md")
    log(
        "synth: "
        + ", ".join(f"{kind} {len(records):,}" for kind, records in outputs.items())
        + f" examples from {len(docs):,} documents -> {out_dir}"
    )
    return manifest


def _recheck(
    records: list[dict], kept: list[tuple[Candidate, dict]], decontaminator: Decontaminator | None
) -> tuple[list[dict], int]:
    """Answers an outside model wrote are checked again; one that overlaps an eval set is put back."""
    if decontaminator is None:
        return records, 0
    original = {record["id"]: record for _, record in kept}
    out, reverted = [], 0
    for r in records:
        if "written_by" in r and decontaminator.matches(sft_text(r)):
            r, reverted = original[r["id"]], reverted + 1
        out.append(r)
    return out, reverted
