"""Shared fixtures: a small corpus with planted duplicates and contamination, and a tiny recipe."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("TRULYOPEN_QUIET", "1")

WORDS = [
    f"{a}{b}"
    for a in ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta")
    for b in ("x", "y", "z", "count", "value", "node", "item", "list", "parse", "load")
]


def make_doc(rng: random.Random, lines: int = 40) -> str:
    out = []
    for i in range(lines):
        ws = rng.sample(WORDS, 6)
        out.append(f"def {ws[0]}_{i}({ws[1]}, {ws[2]}):\n    return {ws[3]} + {ws[4]} * {ws[5]}")
    return "\n".join(out) + "\n"


def near_copy(text: str, rng: random.Random, changes: int = 2) -> str:
    lines = text.split("\n")
    for _ in range(changes):
        i = rng.randrange(len(lines))
        lines[i] = f"# changed line {rng.random():.6f}"
    return "\n".join(lines)


def build_corpus(tmp_path: Path) -> dict:
    """A directory of 30 .py files: file 03 duplicated exactly, file 05 near-duplicated, file 07 quoted
    by an evaluation set, plus one file too short to keep."""
    rng = random.Random(0)
    root = tmp_path / "src"
    root.mkdir()
    texts = {}
    for i in range(30):
        texts[f"mod_{i:02d}.py"] = make_doc(rng)
    texts["zz_exact_copy.py"] = texts["mod_03.py"]
    texts["zz_near_copy.py"] = near_copy(texts["mod_05.py"], rng)
    texts["tiny.py"] = "x = 1\n"
    for name, text in texts.items():
        (root / name).write_text(text)
    (root / "notes.txt").write_text("not python, excluded by the include glob\n")
    evals = tmp_path / "evals"
    evals.mkdir()
    quote = " ".join(texts["mod_07.py"].split()[40:70])
    (evals / "task.jsonl").write_text(
        json.dumps({"text": quote}) + "\n" + json.dumps({"text": "nothing in common"}) + "\n"
    )
    return {"root": root, "texts": texts, "evals": evals / "task.jsonl", "tmp": tmp_path}


@pytest.fixture
def corpus(tmp_path: Path) -> dict:
    return build_corpus(tmp_path)


def write_recipe(tmp: Path, corpus: dict, **extra) -> Path:
    recipe = {
        "name": "tiny",
        "workers": 1,
        "data": {
            "sources": [
                {
                    "name": "code",
                    "type": "directory",
                    "path": str(corpus["root"]),
                    "license": "MIT",
                    "include": ["**/*.py"],
                }
            ],
            "filters": {"min_chars": 32},
            "decontamination": {"eval_files": [str(corpus["evals"])], "ngram": 13},
            "split": {"val_fraction": 0.2},
        },
        "tokenizer": {"vocab_size": 400},
        "shards": {"shard_tokens": 2000},
        "model": {"arch": "llama", "size": "tiny"},
        "pretrain": {
            "seq_len": 64,
            "global_batch_tokens": 512,
            "micro_batch_size": 4,
            "max_steps": 4,
            "warmup_steps": 1,
            "eval_every": 4,
            "eval_sequences": 4,
            "checkpoint_every": 2,
            "precision": "fp32",
        },
    }
    for dotted, value in extra.items():
        node = recipe
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def recipe_file(corpus: dict) -> Path:
    return write_recipe(corpus["tmp"], corpus)


def tiny_llama_config(vocab_size: int, **overrides):
    """The config of a two-layer Llama, 64 wide: small enough to build, train or serve in a test."""
    from transformers import LlamaConfig

    dims = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaConfig(vocab_size=vocab_size, **{**dims, **overrides})


def tiny_llama(tok):
    """A two-layer Llama over `tok`'s vocabulary, in eval mode: small enough to serve in a test."""
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(len(tok), bos_token_id=None, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def chromium():
    """Headless Chromium driven by Selenium (Debian's chromium and chromium-driver; `.ci/run`
    installs both)."""
    import shutil

    browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver_path):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


# The order modules start in, longest first: the suite runs a module per worker (pyproject's addopts,
# where --no-loadscope-reorder keeps this order instead of xdist's, by number of tests), and a long
# module started last would leave the other workers idle at the end. Seconds on two cores,
# 2026-12-03; a module not named here starts after these.
ORDER = [
    "test_pretrain.py",  # 116 s
    "test_data_scale.py",  # 92 s
    "test_distributed.py",  # 89 s
    "test_gguf.py",  # 80 s
    "test_finetune.py",  # 77 s
    "test_faults.py",  # 71 s
    "test_notebooks.py",  # 65 s (six notebooks, a kernel each, each importing torch and transformers)
    "test_recipes.py",  # 60 s (every recipe of the library at toy size; shared data stages)
    "test_tool_use.py",  # 48 s (one thread)
    "test_objectives.py",  # 45 s (every new objective on a tiny model)
    "test_vlm_finetune.py",  # 45 s (SFT, LoRA, QLoRA, DPO and export of two tiny VLM families)
    "test_errors.py",  # 70 s
    "test_release.py",  # 55 s
    "test_eval.py",  # 47 s
    "test_serve_hardening.py",  # 45 s
    "test_tune.py",  # 40 s (a study of toy runs, each a child process)
    "test_pipeline.py",  # 30 s
    "test_vlm_quickstart.py",  # 30 s (the VLM quickstart at toy size through release)
    "test_release_requirements.py",  # 30 s
    "test_vlm_serve.py",  # 30 s (a `trulyopen serve` process, Chromium)
    "test_serve.py",  # 20 s
    "test_merge.py",  # 20 s
    "test_sandbox.py",  # 19 s
    "test_losses.py",  # 11 s, most of it importing TRL's trainers
    "test_infer.py",  # 10 s
    "test_eval_tasks.py",  # 8 s
    "test_hosted.py",  # 9 s (fake servers on loopback)
    "test_judge.py",  # 7 s
]


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(ORDER)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a module kept
