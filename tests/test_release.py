"""`trulyopen release`: a toy run with evaluation releases a bundle that audits as Class I, whose
hashes check, whose model loads in transformers with the checkpoint's logits, and which stays
complete when moved."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess

import pytest
import torch
import yaml
from typer.testing import CliRunner

from tests.conftest import build_corpus, write_recipe
from trulyopen import pipeline
from trulyopen.cli import app
from trulyopen.files import sha256_file
from trulyopen.recipe import RecipeError, load_recipe
from trulyopen.release.audit import audit


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("release")
    recipe = write_recipe(
        tmp,
        build_corpus(tmp),
        eval={"builtin_items": 8, "models": ["pretrain"]},
        release={"producer": "the test suite"},
    )
    return pipeline.run(load_recipe(recipe), tmp / "run", workers=1)


def test_release_is_complete_and_audits_as_class_one(run_dir):
    out = run_dir / "release"
    result = audit(out)
    assert result.cls == 1, result.table()
    missing = {n for n, v in result.verdicts.items() if v.status == "missing"}
    assert result.problems == [] and missing == set()
    assert json.loads((out / "audit.json").read_text())["class"] == 1
    # every file is in SHA256SUMS, and the sums check with the standard tool
    listed = {line.split("  ", 1)[1] for line in (out / "SHA256SUMS").read_text().splitlines()}
    present = {
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "SHA256SUMS"
    }
    assert listed == present
    subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=out, check=True)
    # every kept checkpoint, with its training state, and a row saying what it is
    rows = list(csv.DictReader((out / "checkpoints.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4] and {r["stage"] for r in rows} == {"pretrain"}
    for r in rows:
        assert sha256_file(out / r["path"] / "model.safetensors") == r["sha256"]
        assert (out / r["path"] / "optimizer.pt").exists() and (out / r["path"] / "state.json").exists()
    # code, data, recipe, logs, licences
    assert (out / "code/trulyopen/train/pretrain.py").exists() and (out / "code/requirements.txt").exists()
    version = json.loads((out / "code/version.json").read_text())
    assert "source_sha256" in version and "package" in version
    assert (out / "data/corpus/train.jsonl").exists() and (out / "data/REBUILD.md").exists()
    assert (out / "recipes/recipe.yaml").read_text() == (run_dir / "recipe.yaml").read_text()
    assert (out / "logs/pretrain/metrics.jsonl").exists() and (out / "eval/pretrain/results.json").exists()
    assert "SPDX-License-Identifier: MIT" in (out / "LICENSES/data.txt").read_text()
    # the model in GGUF too (f16 and q8_0, with an Ollama Modelfile), hashed, and counted as parameters
    gguf_files = {"model/gguf/model-f16.gguf", "model/gguf/model-q8_0.gguf"}
    assert gguf_files | {"model/gguf/Modelfile"} <= listed
    assert (out / "model/gguf/Modelfile").read_text().startswith("FROM ./model-q8_0.gguf\n")
    counted = {f["path"]: f["format"] for f in json.loads((out / "audit.json").read_text())["parameters"]}
    assert counted == {"model/model.safetensors": "safetensors", **dict.fromkeys(gguf_files, "gguf")}
    assert "model/gguf/model-q8_0.gguf" in (out / "README.md").read_text()
    code_licence = (out / "LICENSES/code.txt").read_text()  # Apache-2.0: its whole text ships with us
    assert (
        code_licence.startswith("SPDX-License-Identifier: Apache-2.0")
        and "END OF TERMS AND CONDITIONS" in code_licence
    )


def test_model_card_has_metadata_and_the_expected_sections(run_dir):
    card = (run_dir / "release" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["code"]
    assert "bits_per_byte" in meta["metrics"] and meta["library_name"] == "transformers"
    sections = [
        "Intended use",
        "Training data",
        "Training procedure and compute",
        "Evaluation",
        "Limitations",
    ]
    assert all(f"## {s}\n" in card for s in sections)
    assert "heldout_text" in card and "Contamination" in card
    mof = yaml.safe_load((run_dir / "release" / "mof.yml").read_text())
    assert mof["release"]["producer"] == "the test suite"
    assert mof["release"]["license"]["data"]["name"] == "MIT"


def test_released_model_loads_in_transformers_with_the_checkpoints_logits(run_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trulyopen.train.checkpoint import load_for_inference, newest

    out = run_dir / "release"
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    tok = AutoTokenizer.from_pretrained(out / "model")
    ids = torch.tensor([tok("def add(a, b):\n    return a + b")["input_ids"]])
    ours = load_for_inference(newest(run_dir / "checkpoints" / "pretrain"))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ours(ids).logits)


def test_a_moved_release_still_audits_and_without_data_drops_to_class_two(run_dir, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(run_dir / "release", moved)
    assert audit(moved).cls == 1
    shutil.rmtree(moved / "data" / "corpus")
    result = audit(moved)
    assert result.cls == 2 and result.verdicts["Datasets"].status == "missing"
    assert any(p.startswith("Datasets: claimed at data/corpus") for p in result.problems)


def test_release_command_and_data_that_may_not_be_redistributed(run_dir, tmp_path):
    result = CliRunner().invoke(app, ["release", str(run_dir), "--set", "release.redistribute_data=false"])
    assert result.exit_code == 0, result.output
    out = run_dir / "release"
    assert not (out / "data" / "corpus").exists() and "| MIT | no |" in (out / "data/REBUILD.md").read_text()
    assert audit(out).cls == 2
    # the run's recipe.yaml now says false; null gives back the default (open sources: included)
    result = CliRunner().invoke(app, ["release", str(run_dir), "--set", "release.redistribute_data=null"])
    assert result.exit_code == 0 and audit(out).cls == 1


def test_sources_with_different_licences_need_the_release_data_licence(tmp_path):
    corpus = build_corpus(tmp_path)
    path = write_recipe(tmp_path, corpus, release={})
    recipe = yaml.safe_load(path.read_text())
    recipe["data"]["sources"].append({**recipe["data"]["sources"][0], "name": "more", "license": "CC-BY-4.0"})
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match="release.licenses.data"):
        load_recipe(path)


def test_verify_passes_and_names_every_changed_missing_or_extra_file(run_dir, tmp_path):
    from trulyopen.release.verify import verify

    copy = tmp_path / "copy"
    shutil.copytree(run_dir / "release", copy)
    report = verify(copy)
    assert report.problems == [] and report.checked == len((copy / "SHA256SUMS").read_text().splitlines())
    # one changed byte, anywhere: weights, a card, the code, the data
    for name in ("checkpoints/pretrain/step_000002/model.safetensors", "README.md",
                 "code/trulyopen/train/pretrain.py", "data/corpus/train.jsonl"):  # fmt: skip
        path = copy / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
        problems = verify(copy).problems
        assert any(p.startswith(f"{name}: changed") for p in problems), problems
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
    assert verify(copy).problems == []
    (copy / "eval" / "pretrain" / "results.json").unlink()
    (copy / "notes.txt").write_text("added later")
    problems = verify(copy).problems
    assert (
        "eval/pretrain/results.json: missing" in problems
        and "notes.txt: extra (not in SHA256SUMS)" in problems
    )
    # a tampered checkpoint whose SHA256SUMS was rewritten to match is still caught by the ledger
    from trulyopen.release.bundle import write_sums

    (copy / "notes.txt").unlink()
    shutil.copy(copy / "eval/tasks/heldout_text.jsonl", copy / "eval/pretrain/results.json")
    weights = copy / "checkpoints/pretrain/step_000004/model.safetensors"
    shutil.copy(copy / "checkpoints/pretrain/step_000002/model.safetensors", weights)
    write_sums(copy)
    problems = verify(copy).problems
    assert (
        "checkpoints/pretrain/step_000004/model.safetensors: not the file the ledger recorded when training"
        in problems
    )


def test_verify_command_replays_a_step_to_identical_bits(run_dir):
    result = CliRunner().invoke(app, ["verify", str(run_dir / "release"), "--replay", "4"])
    assert result.exit_code == 0, result.output
    assert (
        "0 problems" in result.output
        and "steps 2..4 reproduce the released weights bit for bit" in result.output
    )
    result = CliRunner().invoke(app, ["verify", str(run_dir / "release"), "--replay", "3"])
    assert result.exit_code == 2 and "--replay 3: checkpoints.csv has no pretraining" in result.output


def test_report_renders_in_headless_chromium_with_its_images(run_dir, chromium):
    from selenium.webdriver.common.by import By

    page = run_dir / "release" / "report" / "report.html"
    pngs = {p.name for p in page.parent.glob("*.png")}
    assert {
        "loss.png",
        "lr.png",
        "throughput.png",
        "grad_norm.png",
        "funnel.png",
        "sources.png",
        "eval.png",
    } <= pngs
    result = CliRunner().invoke(app, ["report", str(run_dir)])  # the command, on the run directory itself
    assert result.exit_code == 0 and (run_dir / "report" / "report.html").exists()
    chromium.get(page.as_uri())
    images = chromium.find_elements(By.TAG_NAME, "img")
    assert len(images) == 7
    assert all(chromium.execute_script("return arguments[0].naturalWidth", img) > 100 for img in images)
    text = chromium.find_element(By.TAG_NAME, "body").text
    assert "the release: Class I - Open Science" in text and "heldout_text" in text


def test_only_sources_whose_licence_allows_it_are_redistributed(tmp_path):
    corpus = build_corpus(tmp_path)
    path = write_recipe(tmp_path, corpus, release={"licenses": {"data": "MIT"}})
    recipe = yaml.safe_load(path.read_text())
    open_source, closed = dict(recipe["data"]["sources"][0]), dict(recipe["data"]["sources"][0])
    open_source.update(name="open", include=["mod_0*.py", "mod_1*.py", "zz_*.py"])
    closed.update(name="closed", include=["mod_2*.py"], license="CC-BY-NC-4.0")
    recipe["data"]["sources"] = [open_source, closed]
    path.write_text(yaml.safe_dump(recipe))
    run_dir = pipeline.run(load_recipe(path), tmp_path / "run", workers=1)
    out = run_dir / "release"
    ids = {json.loads(x)["id"].split("/")[0] for f in (out / "data/corpus").glob("*.jsonl") for x in f.open()}
    assert ids == {"open"} and not (out / "data/shards/train_0000.bin").exists()
    notes = (out / "data/REBUILD.md").read_text()
    assert "| CC-BY-NC-4.0 | no |" in notes and "| MIT | yes |" in notes
    result = CliRunner().invoke(app, ["verify", str(out), "--replay", "4"])
    assert result.exit_code == 2 and "token shards are not in this release" in result.output


def test_the_quickstart_at_toy_size_releases_verifies_and_replays(tmp_path):
    """The quickstart's own recipe, on a few standard-library packages and a few steps of each stage,
    post-trained with LoRA so that the release holds the adapter beside the merged model."""
    from pathlib import Path

    quickstart = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"
    overrides = [
        'data.sources.0.include=["json/*.py", "email/*.py", "textwrap.py"]',
        "data.split.val_fraction=0.2",
        "tokenizer.vocab_size=600",
        "pretrain.max_steps=4", "pretrain.global_batch_tokens=1024", "pretrain.micro_batch_size=4",
        "pretrain.warmup_steps=1", "pretrain.eval_every=2", "pretrain.checkpoint_every=2",
        "synth.max_per_kind=40",
        "finetune.adapter=lora", "finetune.max_steps=2", "finetune.batch_size=2",
        "finetune.micro_batch_size=2", "finetune.warmup_steps=1", "finetune.eval_every=2",
        "finetune.checkpoint_every=1",
        "eval.builtin_items=8",
    ]  # fmt: skip
    args = ["run", str(quickstart), "--run-dir", str(tmp_path), "--workers", "1"]
    result = CliRunner().invoke(app, args + [x for o in overrides for x in ("--set", o)])
    assert result.exit_code == 0, result.output
    assert "Model Openness Framework: Class I - Open Science" in result.output
    out = tmp_path / "release"
    assert audit(out).cls == 1 and (out / "model" / "model.safetensors").exists()
    assert (out / "model" / "adapter" / "adapter_config.json").exists()
    # the post-training data ships beside the corpus it was made from (its licence allows both)
    for name in ("sft.jsonl", "tools.jsonl", "tools_heldout.jsonl", "manifest.json", "SYNTHCARD.md"):
        assert (out / "data" / "synth" / name).read_bytes() == (tmp_path / "synth" / name).read_bytes()
    rows = list(csv.DictReader((out / "checkpoints.csv").open()))
    assert {(r["stage"], r["step"]) for r in rows} == {
        ("pretrain", "2"),
        ("pretrain", "4"),
        ("finetune", "1"),
        ("finetune", "2"),
    }
    result = CliRunner().invoke(app, ["verify", str(out), "--replay", "4"])
    assert result.exit_code == 0, result.output
    assert "0 problems" in result.output and "reproduce the released weights bit for bit" in result.output
    # post-training replays too: from the released base, data and adapter checkpoint 1 to step 2
    result = CliRunner().invoke(app, ["verify", str(out), "--replay", "2", "--stage", "finetune"])
    assert result.exit_code == 0, result.output
    assert "replay: steps 1..2 reproduce the released weights bit for bit" in result.output
