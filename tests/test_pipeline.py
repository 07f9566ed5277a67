"""The whole data pipeline on a small corpus: outputs, determinism, skipping, faults."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from trulyopen import pipeline
from trulyopen.cli import app
from trulyopen.data.shards import read_document
from trulyopen.data.sources import DataError
from trulyopen.ledger import Ledger
from trulyopen.recipe import load_recipe

from .conftest import build_corpus, write_recipe


def _hashes(run_dir: Path, stages=("data", "tokenizer", "shards", "pretrain")) -> dict[str, str]:
    """sha256 of every output of these stages, from the ledger (paths relative to the run dir),
    except training metrics, which hold timings."""
    outputs = [o for e in Ledger(run_dir).entries() if e["stage"] in stages for o in e["outputs"]]
    return {o["path"]: o["sha256"] for o in outputs if not o["path"].endswith("metrics.jsonl")}


def _stages(run_dir: Path) -> list[str]:
    """Stage names of the ledger's entries, without the per-checkpoint entries."""
    return [e["stage"] for e in Ledger(run_dir).entries() if "/" not in e["stage"]]


def _run(recipe_file: Path, run_dir: Path, overrides=(), **kw) -> Path:
    return pipeline.run(load_recipe(recipe_file, list(overrides)), run_dir, **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One full run shared by the read-only tests below."""
    tmp = tmp_path_factory.mktemp("built")
    corpus = build_corpus(tmp)
    recipe = write_recipe(tmp, corpus)
    run_dir = _run(recipe, tmp / "run", workers=1)
    return {"run": run_dir, "corpus": corpus, "recipe": recipe}


def _corpus_ids(run_dir: Path) -> set[str]:
    ids = set()
    for split in ("train", "val"):
        for line in (run_dir / "data/corpus" / f"{split}.jsonl").read_text().splitlines():
            ids.add(json.loads(line)["id"])
    return ids


def test_duplicates_and_contamination_removed_originals_kept(built):
    ids = _corpus_ids(built["run"])
    assert "code/mod_03.py" in ids and "code/zz_exact_copy.py" not in ids
    assert "code/mod_05.py" in ids and "code/zz_near_copy.py" not in ids
    assert "code/mod_07.py" not in ids
    assert "code/tiny.py" not in ids
    assert len(ids) == 30 - 1  # 30 modules, minus the contaminated one
    removed = {
        r["id"]: r for r in map(json.loads, (built["run"] / "data/removed.jsonl").read_text().splitlines())
    }
    assert removed["code/zz_exact_copy.py"]["duplicate_of"] == "code/mod_03.py"
    assert removed["code/zz_near_copy.py"] == {
        "id": "code/zz_near_copy.py",
        "step": "near_dedup",
        "reason": "near_duplicate",
        "duplicate_of": "code/mod_05.py",
    }
    assert removed["code/mod_07.py"]["reason"] == "eval_overlap"


def test_manifest_accounts_for_every_input_byte(built):
    m = json.loads((built["run"] / "data/manifest.json").read_text())
    files = m["sources"][0]["files"]
    assert len(files) == 33 and all(len(f["sha256"]) == 64 for f in files)
    steps = m["steps"]
    assert steps[0]["bytes_in"] == sum(f["size"] for f in files) == m["sources"][0]["bytes"]
    for before, after in zip(steps, steps[1:], strict=False):
        assert before["docs_out"] == after["docs_in"] and before["bytes_out"] == after["bytes_in"]
    for st in steps[2:]:
        assert st["docs_in"] - st["docs_out"] == sum(st["removed"].values())
        assert st["bytes_in"] - st["bytes_out"] == sum(st["removed_bytes"].values())
    assert {s["step"]: s["removed"] for s in steps}["near_dedup"] == {"near_duplicate": 1}
    assert list(m["contamination"]["eval_sets"].values()) == [1]
    assert m["splits"]["train"]["docs"] + m["splits"]["val"]["docs"] == 29
    assert m["splits"]["val"]["docs"] > 0 and m["splits"]["train"]["tokens"] > 0
    card = (built["run"] / "data/DATACARD.md").read_text()
    assert "MIT" in card and "near_duplicate: 1" in card and "doc_lengths.png" in card
    assert (built["run"] / "data/doc_lengths.png").read_bytes()[:4] == b"\x89PNG"


def test_tokenizer_roundtrip_and_transformers_loads_it(built):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(built["run"] / "tokenizer"))
    for text in list(built["corpus"]["texts"].values())[:5] + ["  indented\n\ttabs ünïcödé 🙂 \r\n", ""]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    assert "<|assistant|>" in tok.get_vocab()


def test_shards_hold_the_corpus_in_order(built):
    from tokenizers import Tokenizer

    run = built["run"]
    meta = json.loads((run / "data/shards/shards.json").read_text())
    assert len(meta["splits"]["train"]["shards"]) > 1  # shard_tokens is small in the test recipe
    tok = Tokenizer.from_file(str(run / "tokenizer/tokenizer.json"))
    texts = {
        json.loads(line)["id"]: json.loads(line)["text"]
        for line in (run / "data/corpus/train.jsonl").read_text().splitlines()
    }
    shard = meta["splits"]["train"]["shards"][1]
    first_id = (run / "data/shards" / f"{shard['name']}.ids").read_text().splitlines()[0]
    tokens = read_document(run / "data/shards", shard["name"], 0)
    assert tokens[-1] == meta["eot_id"]
    assert tok.decode(tokens[:-1].tolist()) == texts[first_id]
    total = sum(s["tokens"] for s in meta["splits"]["train"]["shards"])
    assert total == meta["splits"]["train"]["tokens"]
    assert np.fromfile(run / "data/shards" / f"{shard['name']}.bin", dtype="<u2").size == shard["tokens"]


def test_same_bytes_with_one_and_two_workers(built, tmp_path):
    two = _run(built["recipe"], tmp_path / "two", workers=2)
    assert _hashes(two) == _hashes(built["run"])


def test_unchanged_rerun_skips_and_changed_filter_reruns(built, tmp_path, capsys):
    run_dir = tmp_path / "again"
    _run(built["recipe"], run_dir, workers=1)
    n = len(_stages(run_dir))
    capsys.readouterr()
    _run(built["recipe"], run_dir, workers=1)
    out = capsys.readouterr().out
    assert "data: up to date, skipped" in out and "shards: up to date, skipped" in out
    assert len(_stages(run_dir)) == n
    median = sorted(map(len, built["corpus"]["texts"].values()))[len(built["corpus"]["texts"]) // 2]
    longer = [f"data.filters.min_chars={median}"]
    _run(built["recipe"], run_dir, longer, workers=1)
    assert _stages(run_dir)[n:] == ["data", "tokenizer", "shards", "pretrain"]
    m = json.loads((run_dir / "data/manifest.json").read_text())
    assert m["steps"][2]["removed"]["too_short"] > 1
    capsys.readouterr()
    _run(built["recipe"], run_dir, longer, force=["tokenizer"], workers=1)
    out = capsys.readouterr().out
    assert "data: up to date" in out and "tokenizer: up to date" not in out
    assert _stages(run_dir)[n + 4 :] == ["tokenizer", "shards", "pretrain"]


def test_ledger_entry_has_provenance(built):
    e = Ledger(built["run"]).last("data")
    assert len(e["config_hash"]) == 64 and e["code_version"]["package"] == "0.1.0"
    assert len(e["code_version"]["source_sha256"]) == 64
    assert e["machine"]["cores"] >= 1 and e["machine"]["torch"]
    assert any(i["path"].endswith("mod_00.py") and i["size"] > 0 for i in e["inputs"])
    assert {o["path"] for o in e["outputs"]} >= {"data/corpus/train.jsonl", "data/corpus/val.jsonl"}


def test_deleted_output_makes_stage_run_again(built, tmp_path, capsys):
    run_dir = _run(built["recipe"], tmp_path / "r", workers=1)
    (run_dir / "data/shards/shards.json").unlink()
    capsys.readouterr()
    _run(built["recipe"], run_dir, workers=1)
    out = capsys.readouterr().out
    assert "tokenizer: up to date" in out and "shards: up to date" not in out
    assert _hashes(run_dir) == _hashes(built["run"])


def test_crash_midway_then_rerun_gives_same_bytes(built, tmp_path, monkeypatch):
    from trulyopen.data import shards

    real = shards.ShardWriter.flush
    calls = {"n": 0}

    def dying_flush(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        real(self)

    monkeypatch.setattr(shards.ShardWriter, "flush", dying_flush)
    run_dir = tmp_path / "crash"
    with pytest.raises(KeyboardInterrupt):
        _run(built["recipe"], run_dir, workers=1)
    assert [e["stage"] for e in Ledger(run_dir).entries()] == ["data", "tokenizer"]
    monkeypatch.setattr(shards.ShardWriter, "flush", real)
    _run(built["recipe"], run_dir, workers=1)
    assert _hashes(run_dir) == _hashes(built["run"])
    assert not list(run_dir.rglob("*.tmp*"))


def test_empty_corpus_is_a_clear_error(built, tmp_path):
    with pytest.raises(
        DataError, match="corpus is empty: 33 documents were read but filter removed 33.*too_short"
    ):
        _run(built["recipe"], tmp_path / "empty", ["data.filters.min_chars=100000"], workers=1)
    result = CliRunner().invoke(
        app,
        [
            "data",
            str(built["recipe"]),
            "--run-dir",
            str(tmp_path / "e2"),
            "--set",
            "data.filters.min_chars=100000",
        ],
    )
    assert result.exit_code == 2 and "error: the corpus is empty" in result.output


def test_cli_run_and_inspect(built, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        app, ["run", str(built["recipe"]), "--run-dir", str(tmp_path / "c"), "--workers", "1"]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["inspect", str(tmp_path / "c")])
    assert result.exit_code == 0
    assert "shards" in result.output and "near_dedup" in result.output and "tokens" in result.output
    result = runner.invoke(
        app, ["run", str(built["recipe"]), "--run-dir", str(tmp_path / "c"), "--force", "nope"]
    )
    assert result.exit_code == 2 and "no such stage" in result.output


def test_reused_tokenizer(built, tmp_path):
    run_dir = _run(
        built["recipe"], tmp_path / "reuse", [f"tokenizer.path={built['run'] / 'tokenizer'}"], workers=1
    )
    a = json.loads((run_dir / "tokenizer/stats.json").read_text())
    assert a["reused_from"] == str(built["run"] / "tokenizer")
    assert (run_dir / "tokenizer/tokenizer.json").read_bytes() == (
        built["run"] / "tokenizer/tokenizer.json"
    ).read_bytes()


def test_quickstart_recipe_on_part_of_the_standard_library(tmp_path):
    """The quickstart's own recipe and source, restricted to a few packages so it runs in seconds."""
    quickstart = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"
    overrides = [
        'data.sources.0.include=["json/*.py", "email/*.py", "textwrap.py"]',
        "tokenizer.vocab_size=600",
    ]
    result = CliRunner().invoke(
        app,
        ["tokenizer", str(quickstart), "--run-dir", str(tmp_path), "--workers", "1"]
        + [x for o in overrides for x in ("--set", o)],
    )
    assert result.exit_code == 0, result.output
    assert [e["stage"] for e in Ledger(tmp_path).entries()] == ["data", "tokenizer"]
    m = json.loads((tmp_path / "data/curation.json").read_text())
    assert m["steps"][0]["docs_in"] > 20
    assert m["steps"][1]["changed"].get("pii_email", 0) > 0  # author addresses in the email package
    texts = [
        json.loads(line)["text"] for line in (tmp_path / "data/corpus/train.jsonl").read_text().splitlines()
    ]
    assert any("<EMAIL>" in t for t in texts) and not any("@python.org" in t for t in texts)
    if (Path(__file__).parent.parent / ".git").exists():  # run from a checkout: the commit is recorded
        version = Ledger(tmp_path).last("data")["code_version"]
        assert len(version["git_commit"]) == 40 and isinstance(version["git_dirty"], bool)
