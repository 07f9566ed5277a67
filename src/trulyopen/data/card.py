"""The data manifest (for machines) and the data card (for people), written at the end of the data pipeline.

`manifest.json` accounts for every input byte: each input file with its sha256 and licence, each
step with documents and bytes in and out and the reasons for what it removed, dedup cluster sizes,
contamination matches, tokenizer stats and token counts per split. `DATACARD.md` says the same in
prose and tables, with a histogram of document lengths (`doc_lengths.png`) beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trulyopen.files import atomic_open, write_json, write_text
from trulyopen.recipe import Recipe


def build_manifest(
    recipe: Recipe, source_files: dict[str, list[dict]], curation: dict, tokenizer: dict, shards: dict
) -> dict[str, Any]:
    sources = []
    for src in recipe.data.sources:
        files = source_files.get(src.name, [])
        sources.append(
            {
                "name": src.name,
                "type": src.type,
                "license": src.license,
                "location": src.dataset
                if src.type == "hf-hub"
                else str(src.path or "python standard library"),
                "files": files,
                "bytes": sum(f["size"] for f in files),
                "id_field": src.id_field,
                "meta_fields": src.meta_fields,
                **curation.get("sources", {}).get(src.name, {}),
            }
        )
    return {
        "run": recipe.name,
        "sources": sources,
        "steps": curation["steps"],
        "problems": curation["problems"],
        "problem_count": curation["problem_count"],
        "tasks": curation["tasks"],
        "dedup": curation["dedup"],
        "contamination": curation["contamination"],
        "splits": {
            name: {**curation["splits"][name], "tokens": shards["splits"][name]["tokens"]}
            for name in ("train", "val")
        },
        "tokenizer": tokenizer,
        "shards": {
            "dtype": shards["dtype"],
            "fingerprint": shards["fingerprint"],
            "files": [
                {"split": split, **f}
                for split in ("train", "val")
                for shard in shards["splits"][split]["shards"]
                for f in shard["files"].values()
            ],
        },
    }


def plot_lengths(histogram: dict[str, list], path: Path) -> None:
    """Histogram of document lengths (characters, log scale, counted per task in fixed bins), with
    fixed metadata for stable bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    edges, counts = np.asarray(histogram["edges"]), np.asarray(histogram["counts"])
    used = np.flatnonzero(counts)
    lo, hi = (used[0], used[-1] + 1) if len(used) else (0, 1)
    ax.stairs(counts[lo:hi], edges[lo : hi + 1], fill=True, color="#3b6ea5")
    ax.set_xscale("log")
    ax.set_xlabel("document length (characters)")
    ax.set_ylabel("documents")
    ax.set_title("Kept documents by length")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", metadata={"Software": None})
    plt.close(fig)


def step_reasons(step: dict[str, Any]) -> str:
    """'reason: docs, ...' for what a step removed, then what it changed in kept documents."""
    text = ", ".join(f"{k}: {v}" for k, v in step["removed"].items())
    if step.get("changed"):
        text += (
            ("; " if text else "") + "changed: " + ", ".join(f"{k}: {v}" for k, v in step["changed"].items())
        )
    return text


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def write_card(manifest: dict[str, Any], length_histogram: dict[str, list], out_dir: Path) -> None:
    """Write manifest.json, DATACARD.md and doc_lengths.png into `out_dir`."""
    write_json(out_dir / "manifest.json", manifest)
    plot_lengths(length_histogram, out_dir / "doc_lengths.png")
    m = manifest
    lines = [
        f"# Data card: {m['run']}",
        "",
        "This corpus was built by trulyopen's data pipeline. Every number below is taken from",
        "`manifest.json` beside this file, which also lists every input file with its sha256.",
        "",
        "## Sources",
        "",
        "| source | type | licence | location | files | size | documents read | kept |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in m["sources"]:
        row = [s["name"], s["type"], s["license"], f"`{s['location']}`", len(s["files"]), _mb(s["bytes"])]
        row += [f"{s.get('docs_read', 0):,}", f"{s.get('docs_kept', 0):,} ({_mb(s.get('bytes_kept', 0))})"]
        lines.append("| " + " | ".join(map(str, row)) + " |")
    lines += [
        "",
        "## What each step removed",
        "",
        "| step | docs in | docs out | bytes in | bytes out | removed (reason: docs) |",
        "|---|---|---|---|---|---|",
    ]
    for st in m["steps"]:
        reasons = step_reasons(st) or "-"
        lines.append(
            f"| {st['step']} | {st['docs_in']:,} | {st['docs_out']:,} | {_mb(st['bytes_in'])} | "
            f"{_mb(st['bytes_out'])} | {reasons} |"
        )
    lines += [
        "",
        "Changes keep the document: control characters stripped, documents changed by Unicode",
        "normalisation, personal data replaced by placeholders (`pii_*`), invalid UTF-8 replaced.",
        "",
    ]
    if m["problems"]:
        count = m.get("problem_count", len(m["problems"]))
        lines += [f"{count:,} input files or records could not be used and were skipped:", ""]
        lines += [
            f"- `{p['file']}`"
            + (f" line {p['line']}" if p.get("line") else "")
            + (f" row {p['row']}" if p.get("row") is not None else "")
            + f": {p['reason']}"
            for p in m["problems"][:20]
        ]
        if count > 20:
            lines.append(f"- ... and {count - 20:,} more (see problems.jsonl)")
        lines.append("")
    t = m.get("tasks")
    if t:
        lines += [
            "## Tasks",
            "",
            f"The inputs were cut into {t['count']:,} logical tasks of at most {_mb(t['task_bytes'])} "
            f"(files, line-aligned byte ranges, row groups), with {t['exact_partitions']} exact-dedup "
            f"partitions and {t['band_partitions']} LSH band partitions; the layout depends on the corpus "
            "alone, so the output is the same bytes wherever and on however many workers it ran.",
            "",
        ]
    d = m["dedup"]
    p = d["near_params"]
    lines += [
        "## Deduplication",
        "",
        f"Exact duplicates (same text after cleaning): clusters by size {d['exact_clusters'] or 'none'}.",
        f"Near duplicates (MinHash, {p['shingle_size']}-word shingles, {p['num_perm']} permutations in "
        f"{p['bands']} bands, Jaccard >= {p['threshold']}): clusters by size {d['near_clusters'] or 'none'}.",
        "One document of each cluster, the first in corpus order, was kept;",
        "`removed.jsonl` names the others.",
        "",
        "## Decontamination",
        "",
    ]
    c = m["contamination"]
    if c["eval_sets"]:
        lines += [
            f"Training documents sharing a {c['ngram']}-word n-gram with an evaluation set were removed:",
            "",
        ]
        lines += [f"- `{name}`: {n} documents" for name, n in c["eval_sets"].items()]
    else:
        lines.append("No evaluation sets were given, so nothing was checked for contamination.")
    t = m["tokenizer"]
    bpt = t.get("bytes_per_token_val")
    lines += [
        "",
        "## Splits and tokens",
        "",
        "| split | documents | bytes | tokens |",
        "|---|---|---|---|",
    ]
    for name, s in m["splits"].items():
        lines.append(f"| {name} | {s['docs']:,} | {_mb(s['bytes'])} | {s['tokens']:,} |")
    lines += [
        "",
        f"Tokenizer: byte-level BPE, vocabulary {t['vocab_size']:,}"
        + (f", {bpt:.2f} bytes per token on the validation split." if bpt else "."),
        f"Token shards: {m['shards']['dtype']}, fingerprint `{m['shards']['fingerprint']}`.",
        "",
        "## Document lengths",
        "",
        "![document lengths](doc_lengths.png)",
        "",
    ]
    write_text(out_dir / "DATACARD.md", "\n".join(lines))
