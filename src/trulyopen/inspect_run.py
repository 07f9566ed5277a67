"""`trulyopen inspect RUN_DIR`: what a run directory holds, read from its ledger and manifests."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from trulyopen.data.card import step_reasons
from trulyopen.errors import UserError, missing
from trulyopen.ledger import Ledger


def summarize(run_dir: Path, console: Console | None = None) -> None:
    console = console or Console()
    if not run_dir.is_dir():
        if run_dir.exists():
            raise UserError(
                f"{run_dir}: a file, not a run directory; give a run directory, e.g. runs/quickstart"
            )
        raise missing(run_dir, "run directory", "give a run directory, e.g. runs/quickstart")
    entries = Ledger(run_dir).entries()
    if not entries:
        raise UserError(f"{run_dir}: no ledger.jsonl, so not a trulyopen run directory (or nothing ran yet)")
    latest = {e["stage"]: e for e in entries if "/" not in e["stage"]}  # not the per-checkpoint lines
    table = Table(title=f"run {run_dir}")
    for col in ("stage", "finished", "seconds", "inputs", "outputs", "output size"):
        table.add_column(col)
    for name, e in latest.items():
        size = sum(o["size"] for o in e["outputs"])
        table.add_row(
            name,
            e["ended"],
            f"{e['seconds']:.1f}",
            str(len(e["inputs"])),
            str(len(e["outputs"])),
            f"{size / 1e6:.2f} MB",
        )
    console.print(table)
    manifest = run_dir / "data" / "manifest.json"
    curation = run_dir / "data" / "curation.json"
    if manifest.exists() or curation.exists():
        m = json.loads((manifest if manifest.exists() else curation).read_text())
        steps = Table(title="data steps")
        for col in ("step", "docs in", "docs out", "MB out", "removed"):
            steps.add_column(col)
        for st in m["steps"]:
            mb_out = f"{st['bytes_out'] / 1e6:.2f}"
            steps.add_row(st["step"], f"{st['docs_in']:,}", f"{st['docs_out']:,}", mb_out, step_reasons(st))
        console.print(steps)
        for name, s in m["splits"].items():
            tokens = f", {s['tokens']:,} tokens" if "tokens" in s else ""
            console.print(f"{name}: {s['docs']:,} documents, {s['bytes'] / 1e6:.2f} MB{tokens}")
    if manifest.exists():
        m = json.loads(manifest.read_text())
        vocab, fingerprint = m["tokenizer"]["vocab_size"], m["shards"]["fingerprint"]
        console.print(f"tokenizer: vocabulary {vocab:,}; shards fingerprint {fingerprint}")
    metrics = run_dir / "pretrain" / "metrics.jsonl"
    if metrics.exists():
        lines = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
        checkpoints = sum(1 for e in entries if e["stage"] == "pretrain/checkpoint")
        if lines:
            last = lines[-1]
            bpb = [r["val_bpb"] for r in lines if "val_bpb" in r]
            console.print(
                f"pretrain: step {last['step']}, {last['tokens_seen']:,} tokens, loss {last['loss']:.3f}"
                + (f", val bits/byte {bpb[-1]:.3f}" if bpb else "")
                + f", {checkpoints} checkpoints written"
            )


def show_batch(run_dir: Path, step: int, console: Console | None = None, excerpt: int = 70) -> None:
    """Print the documents (id and a text excerpt) of each row of the global batch of `step`."""
    import yaml
    from tokenizers import Tokenizer

    from trulyopen.recipe import Recipe
    from trulyopen.train.loader import BatchPlan, TokenStream

    console = console or Console()
    recipe_file = run_dir / "recipe.yaml"
    if not recipe_file.exists():
        raise UserError(f"{run_dir}: no recipe.yaml, so not a trulyopen run directory; give a run directory")
    cfg = Recipe.model_validate(yaml.safe_load(recipe_file.read_text())).pretrain
    if step < 1 or step > cfg.max_steps:
        raise UserError(f"--step {step}: the run has steps 1 to {cfg.max_steps}; give one of them")
    stream = TokenStream(run_dir / "data" / "shards", "train")
    plan = BatchPlan(stream, cfg.seq_len, cfg.global_batch_tokens // cfg.seq_len, cfg.seed)
    tok = Tokenizer.from_file(str(run_dir / "tokenizer" / "tokenizer.json"))
    rows, docs = plan.batch_tokens(step - 1), plan.batch_documents(step - 1)
    console.print(
        f"step {step}: {len(rows)} sequences of {cfg.seq_len + 1} tokens, data {stream.fingerprint[:16]}"
    )
    for r, (tokens, row_docs) in enumerate(zip(rows, docs, strict=True)):
        for doc_id, start, end in row_docs:
            text = tok.decode(tokens[start:end].tolist(), skip_special_tokens=True)
            text = " ".join(text.split())[:excerpt]
            console.print(
                f"  row {r:3d} [{start:5d}:{end:5d}] {doc_id}: {text!r}", highlight=False, soft_wrap=True
            )
