"""`trulyopen report RUN_DIR`: one self-contained HTML page on the run, and its figures as PNGs.

    report/
      report.html      opens in any browser without a server: figures inlined as data: URIs
      loss.png         training loss against tokens seen (pretraining, post-training), validation bpb
      lr.png           learning rate            throughput.png  tokens per second
      grad_norm.png    gradient norm            funnel.png      documents and bytes through each step
      sources.png      the corpus by source     eval.png        evaluation results across checkpoints

The last section is the Model Openness Framework verdict of the release (or of the run directory
when it has no release yet).
"""

from __future__ import annotations

import base64
import html
import json
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from trulyopen.files import write_bytes, write_text  # noqa: E402


def _metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _save(fig, out: Path, name: str) -> Path:
    import io

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_bytes(out / name, buffer.getvalue())
    return out / name


def _tokens(rows: list[dict]) -> list[int]:
    """Tokens seen at each metrics line: pretraining logs the total, post-training each step's."""
    if rows and "tokens_seen" in rows[0]:
        return [r["tokens_seen"] for r in rows]
    total, seen = 0, []
    for r in rows:
        total += r.get("trained_tokens", 0)
        seen.append(total)
    return seen


def _curves(run_dir: Path, out: Path) -> list[tuple[str, Path]]:
    """Loss, learning rate, throughput and gradient norm of each training stage against tokens."""
    stages = {s: _metrics(run_dir / s / "metrics.jsonl") for s in ("pretrain", "finetune")}
    stages = {s: rows for s, rows in stages.items() if rows}
    if not stages:
        return []
    figures = []
    for key, title, name in [
        ("loss", "training loss", "loss.png"),
        ("lr", "learning rate", "lr.png"),
        ("tokens_per_s", "throughput (tokens/s)", "throughput.png"),
        ("grad_norm", "gradient norm", "grad_norm.png"),
    ]:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for stage, rows in stages.items():
            ax.plot(_tokens(rows), [r.get(key, float("nan")) for r in rows], label=stage)
            if key == "loss":
                val = [(r.get("tokens_seen", 0), r["val_bpb"]) for r in rows if "val_bpb" in r]
                if val:
                    ax2 = ax.twinx()
                    ax2.plot(*zip(*val, strict=True), "o--", color="tab:red", label=f"{stage} validation bpb")
                    ax2.set_ylabel("validation bits per byte")
        ax.set(title=title, xlabel="tokens seen")
        ax.legend(loc="upper right", fontsize=8)
        figures.append((title, _save(fig, out, name)))
    return figures


def _data(run_dir: Path, out: Path) -> list[tuple[str, Path]]:
    manifest = run_dir / "data" / "manifest.json"
    if not manifest.exists():
        return []
    steps = json.loads(manifest.read_text()).get("steps", [])
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    names = [s["step"] for s in steps]
    a.bar(names, [s["docs_out"] for s in steps])
    a.set(title="documents after each step")
    b.bar(names, [s["bytes_out"] / 1e6 for s in steps], color="tab:green")
    b.set(title="megabytes after each step")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    figures = [("data funnel", _save(fig, out, "funnel.png"))]
    docs, size = Counter(), Counter()
    for split in ("train", "val"):
        path = run_dir / "data" / "corpus" / f"{split}.jsonl"
        for line in path.open() if path.exists() else []:
            record = json.loads(line)
            source = record["id"].split("/", 1)[0]
            docs[source] += 1
            size[source] += len(record["text"].encode())
    if docs:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.bar(list(size), [v / 1e6 for v in size.values()])
        ax.set(title="curated corpus by source (MB)")
        for i, source in enumerate(size):
            ax.annotate(
                f"{docs[source]:,} docs", (i, size[source] / 1e6), ha="center", va="bottom", fontsize=8
            )
        figures.append(("corpus by source", _save(fig, out, "sources.png")))
    return figures


def _evals(run_dir: Path, out: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, str, str, float]]]:
    """Each evaluated checkpoint's metrics, as bars per task metric and as table rows."""
    rows = []
    for results in sorted((run_dir / "eval").glob("*/results.json")):
        data = json.loads(results.read_text())
        for task, t in data.get("tasks", {}).items():
            for metric, m in t["metrics"].items():
                if "value" in m:
                    checkpoint = Path(data.get("model", "")).name
                    rows.append((f"{results.parent.name} {checkpoint}".strip(), task, metric, m["value"]))
    if not rows:
        return [], rows
    labels = sorted({f"{task}\n{metric}" for _, task, metric, _ in rows})
    models = list(dict.fromkeys(model for model, *_ in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 3.4))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        values = {f"{t}\n{m}": v for mod, t, m, v in rows if mod == model}
        ax.bar([j + i * width for j in range(len(labels))], [values.get(k, 0) for k in labels], width,
               label=model)  # fmt: skip
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, fontsize=7)
    ax.set(title="evaluation results by checkpoint")
    ax.legend(fontsize=8)
    return [("evaluation", _save(fig, out, "eval.png"))], rows


def _mof(target: Path, shown: str) -> str:
    from trulyopen.release.audit import audit

    result = audit(target)
    cells = "".join(
        f"<tr><td>{html.escape(v.component.name)}</td><td>{html.escape(v.where or '-')}</td>"
        f"<td>{html.escape(v.licence or '-')}</td><td>{html.escape(v.status)}</td></tr>"
        for v in result.verdicts.values()
    )
    progress = ", ".join(f"class {k}: {p:.0f}%" for k, p in result.progress.items())
    return (
        f"<p><b>{html.escape(shown)}: {result.to_json()['label']}</b> ({progress})</p>"
        f"<table><tr><th>component</th><th>found</th><th>licence</th><th>verdict</th></tr>{cells}</table>"
    )


def report(run_dir: str | Path, out: Path | None = None, audited: Path | None = None) -> Path:
    """Write the report's PNGs and report.html into `out` (default RUN_DIR/report); returns the page.
    `audited`: the directory whose openness verdict it shows (default: the run's release, if any)."""
    run_dir = Path(run_dir)
    if audited is None:
        audited = run_dir / "release" if (run_dir / "release").is_dir() else run_dir
    shown = "the release" if audited != run_dir else "the run directory (not released yet)"
    out = Path(out) if out else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    figures = _curves(run_dir, out) + _data(run_dir, out)
    eval_figures, eval_rows = _evals(run_dir, out)
    figures += eval_figures
    images = "".join(
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"><figcaption>{html.escape(title)}</figcaption></figure>'
        for title, path in figures
    )
    table = "".join(
        f"<tr><td>{html.escape(m)}</td><td>{html.escape(t)}</td><td>{html.escape(k)}</td>"
        f"<td>{v:.4f}</td></tr>"
        for m, t, k, v in eval_rows
    )
    name = html.escape(run_dir.name)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{name}: trulyopen report</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}}
figure{{display:inline-block;margin:.5em}}img{{max-width:460px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.2em .5em;font-size:90%}}</style></head>
<body><h1>{name}</h1>
<h2>Training and data</h2>{images or "<p>No training metrics or data records in this run.</p>"}
<h2>Evaluation</h2><table><tr><th>model</th><th>task</th><th>metric</th><th>value</th></tr>{table}</table>
<h2>Model Openness Framework</h2>{_mof(audited, shown)}
</body></html>
"""
    write_text(out / "report.html", page)
    return out / "report.html"
