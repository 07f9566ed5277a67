"""`trulyopen release RUN_DIR`: everything a run made, in one self-contained, movable directory.

    release/
      README.md            model card (Hugging Face metadata header)
      paper.md             how the model was made and what it can do (the MOF's research paper)
      mof.yml              Model Openness Framework file: every component, its path and licence
      LICENSES/            one licence file per kind: code, data, documents, weights (fonts/:
                           the licences of the fonts a vlm stage drew its pictures in)
      model/               the final model in the Hugging Face format (+ adapter/ for LoRA runs);
                           gguf/: the same in GGUF for llama.cpp (f16, q8_0) and an Ollama Modelfile
      checkpoints/         every kept intermediate checkpoint, with its training state
      checkpoints.csv      stage, step, tokens seen, path, sha256 of its weights
      tokenizer/
      data/                manifest, data card, curation record, sources; corpus/ with the documents
                           of each source whose licence allows it (and shards/ when all do, with
                           index/, the trace index: `trulyopen trace release/ "text"`);
                           REBUILD.md: per source, whether it is here and how to make it again;
                           synth/: the post-training data made from the corpus (its manifest and
                           card, and its records when every source's licence allows them);
                           vlm/: the vlm stage's pictures of code lines, records, held-out tasks
                           and their data card (the pictures on the corpus's terms, like synth/)
      recipes/recipe.yaml  the resolved recipe every stage ran with
      code/                the package source that ran, version.json (version, git commit, source
                           hash), changes.patch (uncommitted changes), requirements.txt (the
                           pinned runtime dependencies: `pip install -r code/requirements.txt`)
      logs/                ledger.jsonl and each stage's metrics.jsonl
      eval/                results, per-instance records, tasks, contamination report
      report/              report.html (figures inlined) and its PNGs: the technical report
      audit.json           this directory scored against the Model Openness Framework
      decisions/           the runs that led here and those tried beside them: recipes, diffs,
                           reasons, logs, results (history/decisions.py)
      SHA256SUMS           every file above (`sha256sum -c SHA256SUMS` checks them)

It is written into `release.tmp/` and renamed into place when complete, so a failed release never
leaves half a bundle where a good one was.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from pathlib import Path

import yaml

from trulyopen.errors import UserError
from trulyopen.files import sha256_file, write_text
from trulyopen.ledger import PACKAGE_DIR, code_version
from trulyopen.recipe import Recipe, ReleaseConfig
from trulyopen.release import cards, mof
from trulyopen.release.audit import audit, find
from trulyopen.release.audit import write as write_audit
from trulyopen.release.report import report
from trulyopen.release.requirements import write_requirements

KINDS = {"code": "code", "data": "data", "document": "documents", "weights": "weights"}


class ReleaseError(UserError, ValueError):
    """A run that cannot be released as asked (the message says what is missing)."""


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.tmp"))
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def data_licence(recipe: Recipe, cfg: ReleaseConfig) -> str:
    if cfg.licenses.data:
        return cfg.licenses.data
    licences = sorted({s.license for s in recipe.data.sources}) if recipe.data else []
    return licences[0] if len(licences) == 1 else "unlicensed"


def licences_of(recipe: Recipe, cfg: ReleaseConfig) -> dict[str, str]:
    """{code, data, document, weights} -> SPDX id; `document` as the MOF names the type."""
    lic = cfg.licenses
    return {
        "code": lic.code,
        "data": data_licence(recipe, cfg),
        "document": lic.documents,
        "weights": lic.weights,
    }


def redistributable(recipe: Recipe, cfg: ReleaseConfig) -> dict[str, bool]:
    """Per source: may its documents go into the release? The recipe's choice where it makes one,
    else whether the source's licence is open."""
    sources = recipe.data.sources if recipe.data else []
    if cfg.redistribute_data is not None:
        return {s.name: cfg.redistribute_data for s in sources}
    return {s.name: mof.is_open(mof.canonical(s.license)) for s in sources}


def _final_checkpoint(run_dir: Path) -> Path:
    from trulyopen.train.checkpoint import newest

    for stage in ("finetune", "pretrain"):
        ckpt = newest(run_dir / "checkpoints" / stage)
        if ckpt is not None:
            return ckpt
    raise ReleaseError(f"{run_dir}: no finished checkpoint to release (run pretrain or finetune first)")


def _checkpoints(run_dir: Path, out: Path) -> list[dict]:
    """Copy every kept checkpoint; one row per checkpoint for checkpoints.csv."""
    from trulyopen.train.checkpoint import complete

    rows = []
    for stage_dir in sorted(p for p in (run_dir / "checkpoints").glob("*") if p.is_dir()):
        for ckpt in complete(stage_dir):
            target = out / "checkpoints" / stage_dir.name / ckpt.name
            _copy(ckpt, target)
            state = json.loads((ckpt / "state.json").read_text())
            weights = target / "model.safetensors"
            if not weights.exists():
                weights = target / "adapter.safetensors"
            rows.append({
                "stage": stage_dir.name,
                "step": state["step"],
                "tokens_seen": state.get("tokens_seen", ""),
                "path": str(target.relative_to(out)),
                "sha256": sha256_file(weights),
            })  # fmt: skip
    return rows


def _code(out: Path) -> dict:
    """The package source that ran, its version, uncommitted changes and the installed packages."""
    _copy(PACKAGE_DIR, out / "code" / "trulyopen")
    version = code_version()
    repo = PACKAGE_DIR.parent.parent
    for name in ("pyproject.toml", "README.md"):
        if (repo / name).is_file():
            _copy(repo / name, out / "code" / name)
    if version.get("git_dirty"):
        diff = subprocess.run(
            ["git", "-C", str(repo), "diff", "HEAD"], capture_output=True, text=True, timeout=60
        )
        write_text(out / "code" / "changes.patch", diff.stdout)
    write_requirements(out / "code")  # pins the runtime dependencies; installs the bundled source
    write_text(out / "code" / "version.json", json.dumps(version, indent=2, sort_keys=True) + "\n")
    return version


def _data(run_dir: Path, out: Path, recipe: Recipe, allowed: dict[str, bool]) -> None:
    data = run_dir / "data"
    for name in ("manifest.json", "DATACARD.md", "curation.json", "sources.json", "doc_lengths.png"):
        if (data / name).exists():
            _copy(data / name, out / "data" / name)
    if allowed and all(allowed.values()):  # the whole corpus, and its tokens (what --replay trains on)
        _copy(data / "corpus", out / "data" / "corpus")
        _copy(data / "shards", out / "data" / "shards")
        if (data / "index" / "index.json").exists():  # the trace index holds the documents' tokens too
            _copy(data / "index", out / "data" / "index")
    else:
        if any(allowed.values()):  # the documents of the sources that allow it (ids start with the source)
            for split in sorted((data / "corpus").glob("*.jsonl")):
                with split.open() as f:
                    kept = [line for line in f if allowed.get(json.loads(line)["id"].split("/", 1)[0])]
                write_text(out / "data" / "corpus" / split.name, "".join(kept))
        if (data / "shards" / "shards.json").exists():  # the fingerprint checkpoints are checked against
            _copy(data / "shards" / "shards.json", out / "data" / "shards" / "shards.json")
    write_text(out / "data" / "REBUILD.md", cards.rebuild_notes(recipe, allowed))
    _vlm_data(run_dir / "vlm" / "data", out, allowed)
    synth = run_dir / "synth"
    for f in sorted(synth.glob("*")) if synth.is_dir() else []:
        # the records quote corpus text: shipped on the corpus's terms, the account of them always
        if f.is_file() and (f.suffix != ".jsonl" or (allowed and all(allowed.values()))):
            _copy(f, out / "data" / "synth" / f.name)


def _vlm_data(made: Path, out: Path, allowed: dict[str, bool]) -> None:
    """data/vlm/: the vlm stage's pictures of code lines, records and held-out tasks (they quote the
    corpus: shipped on its terms, the card and manifest always), and LICENSES/fonts/: the licence
    of each font they were drawn in."""
    if not made.is_dir():
        return
    from trulyopen.vlm.codelines import licence_text

    if allowed and all(allowed.values()):
        _copy(made, out / "data" / "vlm")
    else:
        for name in ("manifest.json", "DATACARD.md"):
            _copy(made / name, out / "data" / "vlm" / name)
    fonts = json.loads((made / "manifest.json").read_text())["fonts"]
    for spdx in sorted({f["license"] for f in fonts}):
        files = ", ".join(f["file"] for f in fonts if f["license"] == spdx)
        head = f"SPDX-License-Identifier: {spdx}\n\nThe pictures in data/vlm/ were drawn with {files}.\n"
        text = licence_text(spdx)
        write_text(out / "LICENSES" / "fonts" / f"{spdx}.txt", head + (f"\n{text}" if text else ""))


def _gguf(model_dir: Path, name: str) -> None:
    """model/gguf/: f16 and q8_0 files and a Modelfile (q8_0, what most people run), for the families
    llama.cpp runs; any other architecture is released without them, with a warning."""
    import json

    from trulyopen.errors import warn
    from trulyopen.model import gguf

    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    if model_type not in gguf.FAMILIES:
        warn(f"release: no GGUF files: llama.cpp export covers {', '.join(gguf.FAMILIES)}, not {model_type}")
        return
    (model_dir / "gguf").mkdir()
    for quant in ("f16", "q8_0"):
        written = gguf.write_gguf(model_dir, model_dir / "gguf" / f"model-{quant}.gguf", quant, name)
    gguf.write_modelfile(model_dir, written)


def write_sums(root: Path) -> None:
    """SHA256SUMS over every file under `root`, in `sha256sum` format, sorted by path."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    lines = [f"{sha256_file(p)}  {p.relative_to(root).as_posix()}" for p in files]
    write_text(root / "SHA256SUMS", "\n".join(lines) + "\n")


def release(run_dir: Path, recipe: Recipe) -> Path:
    """Write RUN_DIR/release/ from a finished run; returns its path."""
    from trulyopen.model.export import export_checkpoint

    cfg = recipe.release or ReleaseConfig()
    run_dir = Path(run_dir)
    final = _final_checkpoint(run_dir)
    out = run_dir / "release"
    tmp = run_dir / "release.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    licences = licences_of(recipe, cfg)
    allowed = redistributable(recipe, cfg)

    export_checkpoint(final, tmp / "model")
    _gguf(tmp / "model", recipe.name)
    rows = _checkpoints(run_dir, tmp)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, ["stage", "step", "tokens_seen", "path", "sha256"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(tmp / "checkpoints.csv", buffer.getvalue())
    _copy(run_dir / "tokenizer", tmp / "tokenizer")
    _data(run_dir, tmp, recipe, allowed)
    _copy(run_dir / "recipe.yaml", tmp / "recipes" / "recipe.yaml")
    version = _code(tmp)
    _copy(run_dir / "ledger.jsonl", tmp / "logs" / "ledger.jsonl")
    for stage in ("pretrain", "vlm", "finetune"):
        if (run_dir / stage / "metrics.jsonl").exists():
            _copy(run_dir / stage / "metrics.jsonl", tmp / "logs" / stage / "metrics.jsonl")
    if (run_dir / "eval").is_dir():
        _copy(run_dir / "eval", tmp / "eval")
    for kind, spdx in licences.items():
        write_text(tmp / "LICENSES" / f"{KINDS[kind]}.txt", cards.licence_file(spdx, KINDS[kind]))
    from trulyopen.history.decisions import how_we_got_here, write_decisions

    write_decisions(run_dir, tmp / "decisions", checkpoints=cfg.decision_checkpoints)

    facts = cards.gather(run_dir, recipe, final, tmp / "model", rows, version, licences, allowed)
    facts["history"] = how_we_got_here(tmp)
    write_text(tmp / "README.md", cards.model_card(facts, cfg))
    write_text(tmp / "paper.md", cards.paper(facts))
    # mof.yml twice: the report shows the verdict of the release as mof.yml describes it, and is
    # itself a component (the technical report) that the final mof.yml then lists
    write_text(tmp / "mof.yml", yaml.safe_dump(mof_file(tmp, recipe, cfg, licences), sort_keys=False))
    report(run_dir, tmp / "report", audited=tmp)
    write_text(tmp / "mof.yml", yaml.safe_dump(mof_file(tmp, recipe, cfg, licences), sort_keys=False))
    result = audit(tmp)
    result.directory = str(out)
    write_audit(result, tmp / "audit.json")
    write_sums(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def mof_file(root: Path, recipe: Recipe, cfg: ReleaseConfig, licences: dict[str, str]) -> dict:
    """mof.yml in the Model Openness Tool's format: the components this release holds, each with
    its path. The MOF types parameters and metadata as data, so the weights' licence is named on
    them; the release's data licence is the corpus's."""
    components = []
    for c in mof.COMPONENTS:
        path = find(root, c.name)  # the audit's own rules, so what we claim is what it finds
        if path is None:
            continue
        entry = {"name": c.name, "description": c.description, "component_path": path}
        kind = "weights" if c.name.startswith("Model parameters") or c.name == "Model metadata" else c.kind
        if kind == "weights":  # the producer's own data: the weights' licence, not the corpus's
            entry["license"] = licences["weights"]
        entry["license_path"] = f"LICENSES/{KINDS[kind]}.txt"
        components.append(entry)
    finetuned = recipe.finetune is not None
    return {
        "framework": {"name": "Model Openness Framework", "version": "1.0", "date": "2024-12-15"},
        "release": {
            "name": recipe.name,
            "version": "1.0",
            "type": "multimodal" if recipe.vlm is not None else "language",
            "architecture": "transformer decoder"
            + (" with a vision encoder" if recipe.vlm is not None else ""),
            "treatment": "instruct fine-tuned" if finetuned else "pre-trained",
            "origin": recipe.name,
            "producer": cfg.producer,
            "contact": cfg.contact,
            "license": {
                "distribution": {"name": licences["weights"], "path": "LICENSES/weights.txt"},
                "code": {"name": licences["code"], "path": "LICENSES/code.txt"},
                "data": {"name": licences["data"], "path": "LICENSES/data.txt"},
                "document": {"name": licences["document"], "path": "LICENSES/documents.txt"},
            },
            "components": components,
        },
    }
