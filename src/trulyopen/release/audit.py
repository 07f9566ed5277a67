"""`trulyopen audit DIR`: score any directory against the Model Openness Framework.

Two ways to know what a directory holds:
- it has a `mof.yml` (ours, or anyone's in the Model Openness Tool's format): every component it
  claims is checked to really be there (its `component_path`, relative to DIR), and a claimed
  component that is absent counts as missing, named in `problems`;
- it has none (a plain Hugging Face model folder, someone's release): components are looked for by
  the files that make them (`FINDERS`), and licences come from the model card's `license:` field
  and from `LICENSE` files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from trulyopen.errors import UserError
from trulyopen.files import write_json
from trulyopen.release import mof


class AuditError(UserError, ValueError):
    """A mof.yml that cannot be read (the message names the file and the field)."""


def find(root: Path, component: str) -> str | None:
    """Where `component` is in `root` (a path relative to it), by the files that make it."""
    for pattern in FINDERS[component]:
        hits = sorted(p for p in root.glob(pattern) if not p.name.startswith("."))
        if hits:
            return str(hits[0].relative_to(root))
    return None


# where each component is found in a directory without a mof.yml, first match wins
FINDERS: dict[str, list[str]] = {
    "Model architecture": ["code/*/model", "modeling_*.py", "**/modeling_*.py"],
    "Data preprocessing code": ["code/*/data"],
    "Training code": ["code/*/train", "train*.py"],
    "Inference code": ["code/*/infer", "inference*.py", "generate*.py"],
    "Evaluation code": ["code/*/evaluate", "eval*.py"],
    "Supporting libraries and tools": ["code/requirements.txt", "requirements*.txt", "environment.yml"],
    "Model parameters (Final)": [
        "model/*.safetensors",
        "*.safetensors",
        "pytorch_model*.bin",
        "model/gguf/*.gguf",
        "*.gguf",
    ],
    "Model parameters (Intermediate)": ["checkpoints/*/step_*", "checkpoints/**/*.safetensors"],
    "Datasets": ["data/corpus", "data/train*", "dataset/*"],
    "Evaluation data": ["eval/tasks/*", "eval_data/*", "data/vlm/eval/*"],
    "Model metadata": ["recipes/*.yaml", "training_args*", "config.json", "model/config.json"],
    "Sample model outputs": ["eval/*/*.instances.jsonl", "eval/samples*", "samples*"],
    "Model card": ["README.md", "MODEL_CARD.md"],
    "Data card": ["data/DATACARD.md", "DATACARD.md", "data_card*", "**/DATACARD.md"],
    "Technical report": ["report/report.html", "technical_report*", "report*.pdf"],
    "Research paper": ["paper*.pdf", "paper*.md", "paper/*"],
    "Evaluation results": ["eval/*/results.json", "eval/results.json", "eval_results*", "results*.json"],
}
# files that document a component beyond its main one: the data card's account of the corpus is
# completed by the curation record and manifest, and by the trace index, which lets anyone find the
# training documents behind a text (`trulyopen trace`)
SUPPORTING = {
    "Data card": ["data/manifest.json", "data/curation.json", "data/index/index.json"],
    # the experiments behind the release, failed ones included (trulyopen history)
    "Technical report": ["decisions/README.md", "decisions/project.jsonl"],
}
# the first lines of common licence texts, for LICENSE files that do not say their SPDX id
SIGNATURES = {
    "Apache License\nVersion 2.0": "Apache-2.0",
    "Permission is hereby granted, free of charge": "MIT",
    "Attribution 4.0 International": "CC-BY-4.0",
    "Community Data License Agreement - Permissive - Version 2.0": "CDLA-Permissive-2.0",
    "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2": "Python-2.0",
}


def licence_of_file(path: Path) -> str | None:
    """The SPDX id a licence file declares (`SPDX-License-Identifier:`) or whose text it is."""
    text = path.read_text(errors="replace")[:20_000]
    for line in text.splitlines()[:5]:
        if "SPDX-License-Identifier:" in line:
            return mof.canonical(line.split(":", 1)[1])
    squeezed = " ".join(text.split())
    for head, spdx in SIGNATURES.items():
        if " ".join(head.split()) in squeezed:
            return spdx
    return None


def card_licence(root: Path) -> str | None:
    """The `license:` of a Hugging Face model card's metadata header."""
    card = root / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return mof.canonical(str(value)) if value else None


@dataclass
class Audit:
    directory: str
    verdicts: dict[str, mof.Verdict]
    release_licences: dict[str, str]
    source: str  # "mof.yml" or "files"
    problems: list[str] = field(default_factory=list)
    parameters: list[dict] = field(default_factory=list)  # every file of final weights, any format
    supporting: dict[str, list[str]] = field(default_factory=dict)  # component -> SUPPORTING files here

    @property
    def progress(self) -> dict[int, float]:
        return mof.progress(self.verdicts)

    @property
    def cls(self) -> int:
        return mof.classify(self.verdicts)

    @property
    def label(self) -> str:
        return mof.CLASS_LABELS[self.cls]

    def to_json(self) -> dict:
        return {
            "directory": self.directory,
            "framework": {"name": "Model Openness Framework", "version": "1.0"},
            "source": self.source,
            "class": self.cls,
            "label": self.label,
            "progress": {str(k): round(v, 2) for k, v in self.progress.items()},
            "release_licences": self.release_licences,
            "components": [
                {
                    "name": v.component.name,
                    "type": v.component.kind,
                    "class": v.component.cls,
                    "required": v.component.required,
                    "found": v.where,
                    "licence": v.licence,
                    "status": v.status,
                    "warning": v.warning,
                    "supporting": self.supporting.get(v.component.name, []),
                }
                for v in self.verdicts.values()
            ],
            "osaid": mof.osaid(self.verdicts),
            "parameters": self.parameters,
            "problems": self.problems,
        }

    def table(self) -> str:
        rows = [("component", "type", "class", "found", "licence", "verdict")]
        for v in self.verdicts.values():
            c = v.component
            verdict = v.status + (" (optional)" if not c.required and v.status != "optional" else "")
            verdict += f"; warning: {v.warning}" if v.warning else ""
            rows.append((c.name, c.kind, mof.ROMAN[c.cls], v.where or "-", v.licence or "-", verdict))
        widths = [min(max(len(r[i]) for r in rows), 48) for i in range(5)]
        lines = ["  ".join(r[i][:48].ljust(widths[i]) for i in range(5)) + "  " + r[5] for r in rows]
        lines.append("")
        for k in (3, 2, 1):
            lines.append(f"{mof.CLASS_LABELS[k]}: {self.progress[k]:.0f}%")
        lines.append(f"class reached: {mof.CLASS_LABELS[self.cls]}")
        for element, result in mof.osaid(self.verdicts).items():
            lacking = "" if result["met"] else f" (lacks {', '.join(result['missing'])})"
            lines.append(
                f"OSI Open Source AI Definition, {element}: {'met' if result['met'] else 'not met'}{lacking}"
            )
        for f in self.parameters:
            lines.append(f"final parameters: {f['path']} ({f['format']}, {f['bytes'] / 1e6:.1f} MB)")
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


# the final weights in every format a release may carry them in: transformers', llama.cpp's
PARAMETER_FILES = {
    "safetensors": ["model/*.safetensors", "*.safetensors"],
    "gguf": ["model/gguf/*.gguf", "*.gguf"],
}


def parameter_files(root: Path) -> list[dict]:
    found = {}
    for fmt, patterns in PARAMETER_FILES.items():
        for pattern in patterns:
            for p in sorted(root.glob(pattern)):
                rel = p.relative_to(root).as_posix()
                if not rel.startswith("model/adapter/"):
                    found.setdefault(rel, {"path": rel, "format": fmt, "bytes": p.stat().st_size})
    return list(found.values())


def audit(directory: str | Path) -> Audit:
    root = Path(directory)
    if not root.is_dir():
        what = "a file, not a directory" if root.exists() else "no such directory"
        raise AuditError(f"{root}: {what}; give a release or a model directory")
    result = _from_mof_yml(root) if (root / "mof.yml").is_file() else _from_files(root)
    result.parameters = parameter_files(root)
    result.supporting = {
        name: [p for p in paths if (root / p).is_file()]
        for name, paths in SUPPORTING.items()
        if result.verdicts[name].where is not None
    }
    return result


def _from_files(root: Path) -> Audit:
    licences: dict[str, str] = {}
    distribution = card_licence(root) or (
        licence_of_file(root / "LICENSE") if (root / "LICENSE").is_file() else None
    )
    if distribution:
        licences["distribution"] = distribution
    verdicts = {}
    for c in mof.COMPONENTS:
        where = find(root, c.name)
        licence = mof.resolve(None, c.kind, licences) if where else None
        verdicts[c.name] = mof.judge(c, where, licence)
    return Audit(str(root), verdicts, licences, "files")


def _from_mof_yml(root: Path) -> Audit:
    path = root / "mof.yml"
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise AuditError(f"{path}: not valid YAML: {e}") from None
    release = doc.get("release") if isinstance(doc, dict) else None
    if not isinstance(release, dict) or not isinstance(release.get("components"), list):
        raise AuditError(f"{path}: needs release.components, a list")
    licences = {}
    for key, value in (release.get("license") or {}).items():
        name = value.get("name") if isinstance(value, dict) else value
        if name:
            licences[key] = mof.canonical(str(name))
    claimed, problems = {}, []
    for i, entry in enumerate(release["components"]):
        name = entry.get("name") if isinstance(entry, dict) else None
        if name not in mof.BY_NAME:
            raise AuditError(f"{path}: release.components[{i}].name {name!r} is not a MOF component")
        claimed[name] = entry
    verdicts = {}
    for c in mof.COMPONENTS:
        entry = claimed.get(c.name)
        where = None
        if entry is not None:
            where = entry.get("component_path") or entry.get("location") or None
            if where and "://" not in where and not (root / where).exists():
                problems.append(f"{c.name}: claimed at {where}, which is not in {root}")
                where = None
            elif not where:
                where = "(listed, no path)"
        own = entry.get("license", entry.get("license_name")) if entry is not None else None
        licence = mof.resolve(own, c.kind, licences) if where else None
        verdicts[c.name] = mof.judge(c, where, licence)
    return Audit(str(root), verdicts, licences, "mof.yml", problems)


def write(result: Audit, path: Path) -> None:
    write_json(path, result.to_json())
