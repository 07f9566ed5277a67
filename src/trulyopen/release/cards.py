"""The release's documents, written from the run's own records: the model card (README.md with the
Hugging Face metadata header), the paper, the corpus rebuild notes and the licence files.

`gather` reads every figure once (model shape, data funnel, training, evaluation, machine); the
documents only format them, so the card and the paper can never disagree.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from trulyopen.ledger import Ledger
from trulyopen.recipe import Recipe, ReleaseConfig


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _last(path: Path, key: str):
    """The last value of `key` in a metrics.jsonl file, or None."""
    if not path.exists():
        return None
    values = [r[key] for r in map(json.loads, path.read_text().splitlines()) if key in r]
    return values[-1] if values else None


def gather(
    run_dir: Path,
    recipe: Recipe,
    final: Path,
    model_dir: Path,
    checkpoints: list[dict],
    version: dict,
    licences: dict[str, str],
    redistributed: dict[str, bool],
) -> dict:
    from safetensors import safe_open

    config = _json(model_dir / "config.json")
    parameters = 0
    for weights in model_dir.glob("*.safetensors"):
        with safe_open(str(weights), "pt") as f:
            parameters += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    stages = {e["stage"]: e for e in Ledger(run_dir).entries() if "seconds" in e}
    manifest = _json(run_dir / "data" / "manifest.json")
    evals = {}
    for results in sorted((run_dir / "eval").glob("*/results.json")):
        tasks = _json(results).get("tasks", {})
        evals[results.parent.name] = {
            task: {name: m for name, m in t["metrics"].items() if "value" in m} for task, t in tasks.items()
        }
    base = None
    if recipe.finetune is not None and recipe.finetune.base is not None:
        base = str(recipe.finetune.base)
    return {
        "name": recipe.name,
        "final": f"{final.parent.name}/{final.name}",
        "finetuned": recipe.finetune is not None,
        "method": recipe.finetune.method if recipe.finetune else None,
        "base_model": base,
        "architecture": config.get("model_type", "?"),
        "gguf_files": sorted(p.name for p in (model_dir / "gguf").glob("*.gguf")),
        "shape": {
            k: config.get(k)
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "vocab_size",
                "max_position_embeddings",
            )
        },
        "parameters": parameters,
        "sources": [
            {"name": s.name, "type": s.type, "license": s.license}
            for s in (recipe.data.sources if recipe.data else [])
        ],
        "splits": manifest.get("splits", {}),
        "funnel": [
            {k: step.get(k) for k in ("step", "docs_in", "docs_out", "bytes_in", "bytes_out")}
            for step in manifest.get("steps", [])
        ],
        "pretrain": {
            "steps": _last(run_dir / "pretrain" / "metrics.jsonl", "step"),
            "tokens": _last(run_dir / "pretrain" / "metrics.jsonl", "tokens_seen"),
            "loss": _last(run_dir / "pretrain" / "metrics.jsonl", "loss"),
            "val_bpb": _last(run_dir / "pretrain" / "metrics.jsonl", "val_bpb"),
        },
        "finetune_loss": _last(run_dir / "finetune" / "metrics.jsonl", "loss"),
        "vision": "vision_config" in config,
        "pictures": _json(run_dir / "vlm" / "data" / "manifest.json"),  # the vlm stage's, or {}
        "align_loss": _last(run_dir / "vlm" / "metrics.jsonl", "loss"),
        "seconds": {stage: round(e["seconds"], 1) for stage, e in stages.items()},
        "machine": (stages.get("pretrain") or stages.get("finetune") or {}).get("machine", {}),
        "checkpoints": checkpoints,
        "evals": evals,
        "contamination": {
            t: {"share": c.get("share"), "checked": c.get("checked")}
            for t, c in _json(run_dir / "eval" / "contamination.json").items()
        },
        "memorisation": {m.parent.name: _json(m) for m in sorted(run_dir.glob("eval/*/memorisation.json"))},
        "index": _json(run_dir / "data" / "index" / "index.json"),
        "code_version": version,
        "licences": licences,
        "redistributed": redistributed,
    }


def _hf_licence(spdx: str) -> dict:
    """The card's licence fields: Hugging Face's lower-case id, or `other` with its name."""
    known = {
        "Apache-2.0",
        "MIT",
        "CC-BY-4.0",
        "CC-BY-SA-4.0",
        "CC0-1.0",
        "BSD-3-Clause",
        "OpenRAIL",
        "GPL-3.0",
    }
    return {"license": spdx.lower()} if spdx in known else {"license": "other", "license_name": spdx}


def _eval_table(facts: dict) -> str:
    rows = [
        "| model | task | metric | value | ± | items | contaminated items |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for model, tasks in facts["evals"].items():
        for task, metrics in tasks.items():
            share = facts["contamination"].get(task, {}).get("share")
            shown = "" if share is None else f"{share:.1%}"
            for name, m in metrics.items():
                value, stderr = f"{m['value']:.4f}", f"{m.get('stderr', 0):.4f}"
                rows.append(
                    f"| {model} | {task} | {name} | {value} | {stderr} | {m.get('n', '')} | {shown} |"
                )
    return "\n".join(rows) if len(rows) > 2 else "No evaluation was run."


def _training(facts: dict) -> str:
    p, shape = facts["pretrain"], facts["shape"]
    lines = [
        f"- Architecture: {facts['architecture']}, {shape['num_hidden_layers']} layers, hidden size "
        f"{shape['hidden_size']}, {shape['num_attention_heads']} heads, vocabulary {shape['vocab_size']}, "
        f"context {shape['max_position_embeddings']}; {facts['parameters']:,} parameters.",
    ]
    if p["steps"]:
        lines.append(
            f"- Pretraining: {p['steps']} steps, {p['tokens']:,} tokens; final training loss {p['loss']:.3f}"
            + (f", validation bits per byte {p['val_bpb']:.3f}." if p["val_bpb"] is not None else ".")
        )
    if facts.get("align_loss") is not None:
        lines.append(
            f"- Vision alignment (LLaVA stage 1, on captions): final loss {facts['align_loss']:.3f}."
        )
    if facts["finetuned"]:
        loss = facts["finetune_loss"]
        lines.append(
            f"- Post-training: {facts['method']}" + (f", final loss {loss:.3f}." if loss is not None else ".")
        )
    m = facts["machine"]
    time = ", ".join(f"{stage} {s:,.0f} s" for stage, s in facts["seconds"].items())
    lines.append(
        f"- Compute: {m.get('cpu', '?')} ({m.get('cores', '?')} cores, {m.get('device', '?')}), "
        f"torch {m.get('torch', '?')}, Python {m.get('python', '?')}; wall time {time}."
    )
    lines.append(f"- Checkpoints released: {len(facts['checkpoints'])} (see `checkpoints.csv`).")
    return "\n".join(lines)


def _data(facts: dict) -> str:
    sources = ", ".join(f"{s['name']} ({s['type']}, {s['license']})" for s in facts["sources"]) or "none"
    splits = facts["splits"]
    lines = [f"- Sources: {sources}."]
    if splits:
        lines.append(
            "- Curated corpus: "
            + "; ".join(
                f"{k} {v['docs']:,} documents, {v['bytes']:,} bytes, {v['tokens']:,} tokens"
                for k, v in splits.items()
            )
            + "."
        )
    if facts["funnel"]:
        first, last = facts["funnel"][0], facts["funnel"][-1]
        lines.append(
            f"- Curation kept {last['docs_out']:,} of {first['docs_in']:,} documents "
            f"({last['bytes_out']:,} of {first['bytes_in']:,} bytes); see `data/DATACARD.md`."
        )
    pictures = facts.get("pictures")
    if pictures:
        r = pictures["records"]
        fonts = ", ".join(f"{f['file']} ({f['license']})" for f in pictures["fonts"])
        lines.append(
            f"- Pictures: lines of the corpus drawn in {fonts}: {r['captions']:,} captions, "
            f"{r['instructions']:,} instructions, {r['transcribe']:,} held-out lines; "
            "see `data/vlm/DATACARD.md`."
        )
    here = [name for name, ok in facts["redistributed"].items() if ok]
    away = [name for name, ok in facts["redistributed"].items() if not ok]
    if here:
        lines.append(f"- In this release (`data/corpus/`): the documents of {', '.join(here)}.")
    if away:
        lines.append(
            f"- Not redistributed (licence): {', '.join(away)}; `data/REBUILD.md` says how to rebuild."
        )
    return "\n".join(lines)


def _gguf_usage(facts: dict) -> str:
    """How to run the release's GGUF files, when it has them (llama.cpp's families only)."""
    files = facts.get("gguf_files") or []
    if not files:
        return ""
    listed = ", ".join(f"`model/gguf/{f}`" for f in files)
    return f"""

The same weights in GGUF ({listed}) run in llama.cpp and Ollama:

```bash
llama-cli -m model/gguf/model-q8_0.gguf -p "def fibonacci(n):"
ollama create {facts["name"]} -f model/gguf/Modelfile && ollama run {facts["name"]}
```"""


def _kind(facts: dict) -> str:
    return "vision-language" if facts.get("vision") else "language"


def _usage(facts: dict) -> str:
    if facts.get("vision"):
        return """```python
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained("model")
processor = AutoProcessor.from_pretrained("model")
question = {"type": "text", "text": "Transcribe the line."}
messages = [{"role": "user", "content": [{"type": "image"}, question]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=prompt, images=picture, return_tensors="pt")  # picture: a PIL image
```"""
    return """```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("model")
tokenizer = AutoTokenizer.from_pretrained("model")
```"""


def _memorisation(facts: dict) -> str:
    """What share of its writing the model copied from training, traced with the release's index."""
    if not facts.get("memorisation"):
        return "Not measured: the run built no trace index (`index:` in the recipe)."
    lines = []
    for model, m in facts["memorisation"].items():
        lines.append(
            f"- **{model}**: {m['share']:.2%} of {m['generated_tokens']:,} generated tokens lie in spans of "
            f"{m['min_span_tokens']}+ tokens found verbatim in the training data ({m['prompts']} prompts of "
            f"{m['prompt_tokens']} tokens from held-out documents, {m['new_tokens']} tokens each, greedy; "
            f"{m['continuations_with_a_span']} continuations hold such a span)."
        )
        for e in m["examples"]:
            span = e["span"] if len(e["span"]) <= 160 else e["span"][:157] + "..."
            lines.append(f"  - {e['tokens']} tokens from `{e['doc']}` ({e['license']}): `{span!r}`")
    index = facts.get("index") or {}
    tail = ""
    if index:
        tail = (
            f"\n\nThe trace index (`data/index/`, infini-gram, {index['tokens']:,} tokens, "
            f"{index['bytes_per_token']} bytes a token) finds the training documents behind any text: "
            '`trulyopen trace . "text"`, `trulyopen ngram . "prefix"`, or `POST /v1/trace` on '
            "`trulyopen serve`."
        )
    return "\n".join(lines) + tail


def model_card(facts: dict, cfg: ReleaseConfig) -> str:
    metrics = sorted({name for tasks in facts["evals"].values() for m in tasks.values() for name in m})
    meta = {
        **_hf_licence(facts["licences"]["weights"]),
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text" if facts.get("vision") else "text-generation",
        "tags": ["trulyopen", "open-science"],
        "datasets": [s["name"] for s in facts["sources"]],
        "metrics": metrics,
    }
    if facts["base_model"]:
        meta["base_model"] = facts["base_model"]
    contamination = "; ".join(
        f"{t}: {c['share']:.1%} of {c['checked']} items share a 13-word sequence with the training corpus"
        for t, c in facts["contamination"].items()
        if c["share"] is not None
    )
    lic = facts["licences"]
    version = facts["code_version"]
    return f"""---
{yaml.safe_dump(meta, sort_keys=False).strip()}
---

# {facts["name"]}

A {facts["parameters"] / 1e6:.1f} M-parameter {facts["architecture"]} {_kind(facts)} model made end to end
with trulyopen: data curation, tokenizer, pretraining{", post-training" if facts["finetuned"] else ""} and
evaluation, with every artifact in this directory. `mof.yml` scores it against the Model Openness
Framework; `SHA256SUMS` covers every file (`trulyopen verify .`).

## Intended use

{cfg.intended_use}

## Training data

{_data(facts)}

## Training procedure and compute

{_training(facts)}

## Evaluation

{_eval_table(facts)}

Contamination: {contamination or "not measured"}. Scores on contaminated items overstate what the model
does on unseen text.

## Memorisation

{_memorisation(facts)}

## How we got here

{facts.get("history") or "Not recorded."}

## Limitations

{cfg.limitations}

## How to use

{_usage(facts)}

or `trulyopen serve model` for an OpenAI-compatible server.{_gguf_usage(facts)}

## Provenance and licences

- Code: trulyopen {version.get("package")}, commit {version.get("git_commit", "unknown")}
  {"(with uncommitted changes in `code/changes.patch`)" if version.get("git_dirty") else ""}; the
  source that ran is in `code/`.
- Licences: code {lic["code"]}, data {lic["data"]}, documents {lic["document"]}, weights {lic["weights"]}
  (`LICENSES/`).
"""


def paper(facts: dict) -> str:
    """A short paper on how the model was made and what it does, from the same facts as the card."""
    return f"""# {facts["name"]}: a fully open language model made with trulyopen

## Abstract

We release {facts["name"]}, a {facts["parameters"] / 1e6:.1f} M-parameter {facts["architecture"]} model, with
its data, code, configuration, logs, intermediate checkpoints and evaluation records, so that every
step of its making can be checked and replayed.

## Data

{_data(facts)}

## Model and training

{_training(facts)}

## Evaluation

{_eval_table(facts)}

## Reproducing

`recipes/recipe.yaml` is the resolved recipe every stage ran with, and `code/` the source that ran.
`trulyopen run recipes/recipe.yaml` rebuilds the run; `trulyopen verify . --replay STEP` retrains a
stretch from an intermediate checkpoint and compares the weights bit for bit.
"""


def rebuild_notes(recipe: Recipe, redistributed: dict[str, bool]) -> str:
    sources = recipe.data.sources if recipe.data else []
    rows = "\n".join(
        f"| `{s.name}` | {s.type} `{s.path or s.dataset or ''}` | {s.license} | "
        f"{'yes' if redistributed.get(s.name) else 'no'} |"
        for s in sources
    )
    return f"""# Rebuilding the corpus

| source | where | licence | documents in `corpus/` |
|---|---|---|---|
{rows or "| (none: the run post-trained a given model) | | | |"}

A source's documents are in this release only where its licence allows redistribution. To make the
whole corpus again from the sources:

```bash
trulyopen data ../recipes/recipe.yaml --run-dir rebuilt
```

`sources.json` lists every input file with its size and sha256, and `manifest.json` the result of
each curation step, so the rebuilt corpus can be compared with this one document by document.
"""


def licence_text(spdx: str) -> str | None:
    """The full text of a licence, where we have it offline: the ones this package ships, and the
    Python licence from the running interpreter's own standard library (the quickstart's data)."""
    import sysconfig

    shipped = Path(__file__).with_name("licences") / f"{spdx}.txt"
    if shipped.is_file():
        return shipped.read_text()
    if spdx == "Python-2.0":
        stdlib = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
        return stdlib.read_text() if stdlib.is_file() else None
    return None


def licence_file(spdx: str, kind: str) -> str:
    head = f"SPDX-License-Identifier: {spdx}\n\nThe {kind} in this release are licensed under {spdx}.\n"
    text = licence_text(spdx)
    return head + (f"\n{text}" if text else f"Full text: https://spdx.org/licenses/{spdx}.html\n")
