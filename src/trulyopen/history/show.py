"""`trulyopen history`: the project's runs as a tree, a diff of two runs, and one HTML page.

base  finished  "the quickstart as it is"                 pretrain.loss 3.21, val_bpb 1.84
├── lr-low  finished  "3e-3 spiked at step 40"            pretrain.lr 0.003 -> 0.001
│   └── winner  finished  ...
└── wide  failed  "does 512 wide fit?"  (RuntimeError: ...)
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

from trulyopen.history.project import Project, Run, recipe_diff

KEY_RESULTS = ("pretrain.loss", "pretrain.val_bpb", "finetune.loss")


def children(runs: dict[str, Run]) -> dict[str | None, list[Run]]:
    """Runs by parent (None: the roots, and runs whose parent is not in the project)."""
    out: dict[str | None, list[Run]] = {}
    for run in runs.values():
        out.setdefault(run.parent if run.parent in runs else None, []).append(run)
    return out


def summary(run: Run) -> str:
    """One line: status, reason, key results, what changed."""
    status = "deleted" if run.deleted else run.status
    parts = [status]
    if run.why:
        parts.append(f'"{run.why[-1]}"')
    shown = [f"{k} {run.results[k]:.4g}" for k in KEY_RESULTS if k in run.results]
    evals = [(k, v) for k, v in run.results.items() if k.startswith("eval.")]
    shown += [f"{k.split('.', 2)[2]} {v['value']:.3f}±{v['stderr'] or 0:.3f}" for k, v in evals[:3]]
    if shown:
        parts.append(", ".join(shown))
    if run.diff:
        changed = [f"{k} {v[0]} -> {v[1]}" for k, v in list(run.diff.items())[:3]]
        more = len(run.diff) - 3
        parts.append("; ".join(changed) + (f" (+{more} more)" if more > 0 else ""))
    if run.error:
        parts.append(f"({run.error.splitlines()[0][:120]})")
    if run.bytes:
        parts.append(f"{run.bytes / 1e6:,.1f} MB")
    return "  ".join(parts)


def tree_lines(runs: dict[str, Run]) -> list[str]:
    kids = children(runs)
    lines: list[str] = []

    def walk(run: Run, prefix: str, last: bool, root: bool) -> None:
        joint = "" if root else ("└── " if last else "├── ")
        lines.append(f"{prefix}{joint}{run.name}  {summary(run)}")
        below = kids.get(run.name, [])
        for i, child in enumerate(below):
            walk(child, prefix + ("" if root else ("    " if last else "│   ")), i == len(below) - 1, False)

    for run in kids.get(None, []):
        walk(run, "", True, True)
    return lines


def diff(project: Project, a: str, b: str) -> dict[str, Any]:
    runs = project.runs()
    for name in (a, b):
        if name not in runs:
            from trulyopen.errors import UserError

            known = ", ".join(runs) or "none"
            raise UserError(f"history diff: no run {name} in {project.path} (runs: {known})")
    ra, rb = runs[a], runs[b]
    results = {
        k: [ra.results.get(k), rb.results.get(k)]
        for k in sorted(set(ra.results) | set(rb.results))
        if ra.results.get(k) != rb.results.get(k)
    }
    code = {
        k: [ra.code_version.get(k), rb.code_version.get(k)]
        for k in ("package", "source_sha256", "git_commit", "git_dirty")
        if ra.code_version.get(k) != rb.code_version.get(k)
    }
    return {"runs": [a, b], "recipe": recipe_diff(ra.recipe, rb.recipe), "code": code, "results": results}


def curves(project: Project, runs: dict[str, Run]) -> dict[str, dict[str, list]]:
    """{run: {metric: [(step, value), ...]}} from each run's pretraining and post-training metrics."""
    out: dict[str, dict[str, list]] = {}
    for run in runs.values():
        for stage in ("pretrain", "finetune"):
            metrics = project.root / run.name / stage / "metrics.jsonl"
            if not metrics.is_file():
                continue
            for line in metrics.read_text().splitlines():
                r = json.loads(line) if line.strip() else {}
                for key in ("loss", "val_bpb"):
                    if isinstance(r.get(key), int | float) and "step" in r:
                        out.setdefault(run.name, {}).setdefault(f"{stage} {key}", []).append(
                            (r["step"], r[key])
                        )
    return out


def html_page(project: Project) -> str:
    """The tree, each run's recipe diff and reasons, and the runs' curves overlaid, in one page."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = project.runs()
    data = curves(project, runs)
    metrics = sorted({m for per in data.values() for m in per})
    figures = []
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        for name, per in data.items():
            if metric in per:
                steps, values = zip(*per[metric], strict=True)
                ax.plot(steps, values, label=name, marker="." if len(steps) < 20 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.legend(fontsize=8)
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        figures.append((metric, base64.b64encode(buf.getvalue()).decode()))
    items = "\n".join(
        f'<li class="run" data-run="{html.escape(r.name)}"><b>{html.escape(r.name)}</b> '
        f"{html.escape(summary(r))}"
        + "".join(f"<div class=why>{html.escape(w)}</div>" for w in r.why)
        + "</li>"
        for r in runs.values()
    )
    tree = html.escape("\n".join(tree_lines(runs)))
    imgs = "\n".join(
        f'<figure><img class="curve" alt="{html.escape(m)}" src="data:image/png;base64,{b}">'
        f"<figcaption>{html.escape(m)}, every run</figcaption></figure>"
        for m, b in figures
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>history of {html.escape(project.root.name)}</title>
<style>body {{ font-family: system-ui, sans-serif; max-width: 900px; margin: 2em auto; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; }} .why {{ color: #555; margin-left: 1em; }}
img {{ max-width: 100%; }}</style></head>
<body><h1>How this project got here</h1>
<pre id="tree">{tree}</pre>
<h2>Curves</h2>
{imgs or "<p>No run has training metrics.</p>"}
<h2>Runs</h2>
<ul>{items}</ul>
</body></html>
"""
