"""`trulyopen verify DIR`: check that a release is what it says it is, and `--replay STEP` that its
training reproduces.

Checks, each naming the file it is about:
- every line of SHA256SUMS: the file is there and has that hash; a file not listed is extra;
- checkpoints.csv: each checkpoint is there and its weights have the recorded hash;
- the ledger (logs/ledger.jsonl): every checkpoint file it recorded when training has that hash;
- each checkpoint's state.json agrees with the ledger entry of its stage (recipe hash and code
  version) and, for pretraining, with the shards' data fingerprint;
- the code in code/ is the code that ran (its source hash is the one in code/version.json and in
  the ledger).

Replay: the pretraining checkpoint before STEP, the released shards and recipe, trained on to STEP
in a scratch directory; the weights are compared with the released checkpoint at STEP tensor by
tensor. Bit-exactness is promised on the same machine type and versions; elsewhere the report gives
the largest difference and where, with both machines and versions.
"""

from __future__ import annotations

import csv
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from trulyopen.errors import UserError
from trulyopen.files import sha256_file
from trulyopen.ledger import Ledger, code_version, machine_summary, source_hash


class VerifyError(UserError, ValueError):
    """A release that cannot be checked at all (no SHA256SUMS, no such step to replay)."""


@dataclass
class Report:
    checked: int = 0  # files whose hash was checked
    problems: list[str] = field(default_factory=list)
    hashes: dict[str, str] = field(default_factory=dict)  # relative path -> sha256, each file hashed once

    def sha256(self, root: Path, path: Path) -> str:
        name = path.relative_to(root).as_posix()
        if name not in self.hashes:
            self.hashes[name] = sha256_file(path)
        return self.hashes[name]


def _sums(root: Path, report: Report) -> None:
    sums = root / "SHA256SUMS"
    if not root.is_dir():
        raise VerifyError(f"{root}: no such directory; give a release directory (RUN_DIR/release)")
    if not sums.is_file():
        raise VerifyError(f"{sums}: missing; this directory is not a release (run `trulyopen release`)")
    listed = {}
    for n, line in enumerate(sums.read_text().splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            report.problems.append(f"SHA256SUMS line {n}: not '<sha256>  <path>'")
            continue
        listed[name] = digest
    for name, digest in sorted(listed.items()):
        path = root / name
        if not path.is_file():
            report.problems.append(f"{name}: missing")
        elif (actual := report.sha256(root, path)) != digest:
            report.problems.append(f"{name}: changed (sha256 {actual[:16]}..., recorded {digest[:16]}...)")
        report.checked += 1
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "SHA256SUMS"):
        if path.relative_to(root).as_posix() not in listed:
            report.problems.append(f"{path.relative_to(root).as_posix()}: extra (not in SHA256SUMS)")


def _stage_entries(root: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """(last ledger entry of each stage, last recorded sha256 of each output path)."""
    stages, hashes = {}, {}
    for e in Ledger(root / "logs").entries():
        if "/" not in e["stage"]:
            stages[e["stage"]] = e
        for out in e.get("outputs", []):
            hashes[out["path"]] = out["sha256"]
    return stages, hashes


def _checkpoints(root: Path, report: Report, stages: dict[str, dict], recorded: dict[str, str]) -> None:
    table = root / "checkpoints.csv"
    if not table.is_file():
        report.problems.append("checkpoints.csv: missing")
        return
    shards = root / "data" / "shards" / "shards.json"
    fingerprint = json.loads(shards.read_text())["fingerprint"] if shards.is_file() else None
    for row in csv.DictReader(table.open()):
        ckpt = root / row["path"]
        weights = ckpt / "model.safetensors"
        weights = weights if weights.exists() else ckpt / "adapter.safetensors"
        if not weights.exists():
            report.problems.append(f"{row['path']}: missing (listed in checkpoints.csv)")
            continue
        if report.sha256(root, weights) != row["sha256"]:
            report.problems.append(f"{weights.relative_to(root)}: not the weights checkpoints.csv records")
        for f in sorted(ckpt.iterdir()):
            name = f.relative_to(root).as_posix()
            if name in recorded and report.sha256(root, f) != recorded[name]:
                report.problems.append(f"{name}: not the file the ledger recorded when training")
        state = json.loads((ckpt / "state.json").read_text())
        entry = stages.get(row["stage"])
        if entry is None:
            report.problems.append(f"{row['path']}: no ledger entry for stage {row['stage']}")
            continue
        if state.get("config_hash") != entry["config_hash"]:
            report.problems.append(
                f"{row['path']}/state.json: recipe hash differs from the {row['stage']} stage's"
            )
        if state.get("code_version", {}).get("source_sha256") != entry["code_version"]["source_sha256"]:
            report.problems.append(
                f"{row['path']}/state.json: code version differs from the {row['stage']} stage's"
            )
        if row["stage"] == "pretrain" and fingerprint and state.get("data_fingerprint") != fingerprint:
            report.problems.append(
                f"{row['path']}/state.json: data fingerprint differs from data/shards/shards.json"
            )


def _code(root: Path, report: Report, stages: dict[str, dict]) -> None:
    version_file, package = root / "code" / "version.json", root / "code" / "trulyopen"
    if not version_file.is_file() or not package.is_dir():
        report.problems.append("code/: missing (the source that ran and its version.json)")
        return
    version = json.loads(version_file.read_text())
    if source_hash(package) != version["source_sha256"]:
        report.problems.append("code/trulyopen: its source hash is not the one in code/version.json")
    for stage, entry in stages.items():
        if entry.get("code_version", {}).get("source_sha256") not in (None, version["source_sha256"]):
            report.problems.append(f"logs/ledger.jsonl: stage {stage} ran other code than code/ holds")


def verify(directory: str | Path) -> Report:
    root = Path(directory)
    report = Report()
    _sums(root, report)
    stages, recorded = _stage_entries(root)
    _checkpoints(root, report, stages, recorded)
    _code(root, report, stages)
    _index(root, report, recorded)
    _decisions(root, report)
    return report


def _decisions(root: Path, report: Report) -> None:
    """decisions/: each run's recipe is the one its history recorded, each run's ledger the one it
    ended with, and the released run's ledger the one in logs/."""
    from trulyopen.history.project import Project, recipe_sha256

    folder = root / "decisions"
    if not (folder / "project.jsonl").is_file():
        return
    released = (folder / "released.txt").read_text().strip() if (folder / "released.txt").is_file() else None
    for name, run in Project(folder).runs().items():
        where = f"decisions/runs/{name}"
        recipe = folder / "runs" / name / "recipe.yaml"
        if not recipe.is_file():
            report.problems.append(f"{where}/recipe.yaml: missing (the history lists {name})")
            continue
        if recipe_sha256(yaml.safe_load(recipe.read_text())) != run.recipe_sha256:
            report.problems.append(f"{where}/recipe.yaml: not the recipe the history recorded for {name}")
        ledger = folder / "runs" / name / "ledger.jsonl"
        if ledger.is_file() and run.ledger_sha256 and report.sha256(root, ledger) != run.ledger_sha256:
            report.problems.append(f"{where}/ledger.jsonl: not the ledger {name} ended with")
        if name == released and ledger.is_file() and (root / "logs" / "ledger.jsonl").is_file():
            if report.sha256(root, ledger) != report.sha256(root, root / "logs" / "ledger.jsonl"):
                report.problems.append(f"{where}/ledger.jsonl: not the released run's logs/ledger.jsonl")


def _index(root: Path, report: Report, recorded: dict[str, str]) -> None:
    """The trace index: its files as the index stage wrote them, of these shards, and sorted."""
    from trulyopen.trace.index import check_index

    index = root / "data" / "index"
    if not (index / "index.json").is_file():
        return
    name = "data/index/index.json"
    if name in recorded and report.sha256(root, index / "index.json") != recorded[name]:
        report.problems.append(f"{name}: not the file the index stage recorded")
    shards = root / "data" / "shards"
    for problem in check_index(index, shards if (shards / "shards.json").is_file() else None):
        report.problems.append(problem.replace(f"{root}/", ""))


def replay(directory: str | Path, step: int, workdir: Path | None = None, stage: str = "pretrain") -> dict:
    """Retrain `stage` (pretrain or finetune) from its checkpoint before `step` to `step` in a scratch
    run directory laid out as the release's run was; compare the weights with the release's."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from trulyopen.recipe import Recipe

    root = Path(directory)
    rows = [r for r in csv.DictReader((root / "checkpoints.csv").open()) if r["stage"] == stage]
    target = next((r for r in rows if int(r["step"]) == step), None)
    if target is None:
        steps = ", ".join(r["step"] for r in rows) or "none"
        name = "pretraining" if stage == "pretrain" else "post-training"
        raise VerifyError(
            f"--replay {step}: checkpoints.csv has no {name} checkpoint at that step "
            f"(released steps: {steps}); give one of them"
        )
    before = [r for r in rows if int(r["step"]) < step]
    start = max(before, key=lambda r: int(r["step"])) if before else None
    recipe = Recipe.model_validate(yaml.safe_load((root / "recipes" / "recipe.yaml").read_text()))
    scratch = Path(tempfile.mkdtemp(prefix="replay-", dir=workdir))
    try:
        if start is not None:
            shutil.copytree(root / start["path"], scratch / "checkpoints" / stage / Path(start["path"]).name)
        made = (_replay_pretrain if stage == "pretrain" else _replay_finetune)(root, recipe, scratch, step)
        weights = (
            (made / "model.safetensors").name
            if (made / "model.safetensors").exists()
            else "adapter.safetensors"
        )
        ours = load_file(str(made / weights))
        theirs = load_file(str(root / target["path"] / weights))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    worst, where = 0.0, None
    for name, t in theirs.items():
        if not torch.equal(t, ours[name]):
            diff = float((t.float() - ours[name].float()).abs().max())
            if diff >= worst:
                worst, where = diff, name
    stages, _ = _stage_entries(root)
    return {
        "step": step,
        "from_step": int(start["step"]) if start else 0,
        "identical": where is None,
        "max_abs_diff": worst,
        "where": where,
        "recorded": {
            "machine": stages.get(stage, {}).get("machine"),
            "code": stages.get(stage, {}).get("code_version"),
        },
        "replayed": {"machine": machine_summary(), "code": code_version()},
    }


def _replay_pretrain(root: Path, recipe, scratch: Path, step: int) -> Path:
    """Pretraining to `step` on the released shards and tokenizer."""
    from trulyopen.train.pretrain import Paths, pretrain

    if not (root / "data" / "shards" / "shards.json").is_file() or not any(
        (root / "data" / "shards").glob("*.bin")
    ):
        raise VerifyError(
            f"{root / 'data/shards'}: the token shards are not in this release, so it cannot replay"
        )
    cfg = recipe.pretrain.model_copy(update={"log_to": []})  # (not hashed: the recipe hash still matches)
    if cfg.eval_suite is not None and not Path(cfg.eval_suite).exists():
        raise VerifyError(f"pretrain.eval_suite: {cfg.eval_suite} is not on this machine; replay needs it")
    from trulyopen.pipeline import suite_in_loop

    paths = Paths(scratch, root / "data" / "shards", root / "tokenizer")
    return pretrain(cfg, recipe.model, paths, stop_at=step, in_loop=suite_in_loop(cfg, paths))


def _replay_finetune(root: Path, recipe, scratch: Path, step: int) -> Path:
    """Post-training to `step` from the released base (the final pretraining checkpoint, or the model
    finetune.base names) on the released post-training data (data/synth/, or finetune.data's files)."""
    import shutil

    from trulyopen.finetune.stage import FinetunePaths, finetune

    if recipe.finetune is None:
        raise VerifyError(f"{root / 'recipes/recipe.yaml'}: no finetune section, so nothing to replay")
    cfg = recipe.finetune.model_copy(update={"log_to": []})
    for source in cfg.data:
        if source.path is not None and not source.path.exists():
            raise VerifyError(f"finetune.data: {source.path} is not on this machine; replay needs it")
    if cfg.base is None:  # this run's final pretraining checkpoint, as the release holds it
        final = [r for r in csv.DictReader((root / "checkpoints.csv").open()) if r["stage"] == "pretrain"]
        if not final:
            raise VerifyError(f"{root}: no pretraining checkpoint released to post-train from")
        last = max(final, key=lambda r: int(r["step"]))["path"]
        shutil.copytree(root / last, scratch / "checkpoints" / "pretrain" / Path(last).name)
    shutil.copytree(root / "tokenizer", scratch / "tokenizer")
    if not cfg.data:
        if not (root / "data" / "synth").is_dir():
            raise VerifyError(f"{root / 'data/synth'}: the post-training data is not in this release")
        shutil.copytree(root / "data" / "synth", scratch / "synth")
    return finetune(cfg, FinetunePaths(scratch), stop_at=step)
