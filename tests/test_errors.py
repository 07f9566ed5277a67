"""The error contract, case by case: each row runs a real `trulyopen` command in a process of its
own (a fork of one that imported torch and transformers once: tests/forked_cli.py) and checks its
exit code, its one-line message and that no traceback is printed.

    user's mistake  -> exit 2, one line `error: <where>: <what>; <what to do>`
    bug             -> exit 1, one line naming a crash report
    a result        -> exit 0, with warnings and skipped records summed up on the terminal

The rows run concurrently (a few at a time) in one module fixture; each row is then its own test.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import WORDS, build_corpus, write_recipe
from tests.forked_cli import Forks

# offline: a hub name fails at once; one thread per process: the rows run three at a time on few cores
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRULYOPEN_QUIET": "1",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # what `trulyopen` sets before it imports the hub's client
}


@dataclass
class Case:
    id: str
    argv: list[str]  # placeholders: {run} {ckpt} {release} {recipe} {dir} (the case's own folder)
    code: int
    says: str  # a part of the message (or of the output, for exit 0)
    setup: Callable[[dict, Path], None] | None = None
    stdin: str = ""
    limit_fsize: int | None = None  # RLIMIT_FSIZE: a full disk, simulated
    read_only_for_root: bool = False  # root too must obey file permissions
    result: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- case setups


def recipe_with(base: dict, case_dir: Path, **changes) -> Path:
    """The base recipe with dotted changes (`pretrain__max_steps=...`; None deletes), in case_dir."""
    recipe = json.loads(json.dumps(base))
    for dotted, value in changes.items():
        node, keys = recipe, [int(k) if k.isdigit() else k for k in dotted.split("__")]
        for k in keys[:-1]:
            node = node[k] if isinstance(k, int) else node.setdefault(k, {})
        if value is None:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
    path = case_dir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def jsonl_source(case_dir: Path, lines: list[str | bytes]) -> dict:
    data = case_dir / "docs.jsonl"
    data.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return [{"name": "docs", "type": "jsonl", "path": str(data), "license": "MIT"}]


def doc(i: int, words: int = 80) -> str:
    """A document of its own: no two are near duplicates."""
    rng = random.Random(i)
    return json.dumps({"text": " ".join(rng.choice(WORDS) + str(rng.randrange(50)) for _ in range(words))})


def write(rel: str, content: str | bytes):
    def setup(w: dict, d: Path) -> None:
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def recipe_case(**changes):
    def setup(w: dict, d: Path) -> None:
        recipe_with(w["base"], d, **changes)

    return setup


def data_case(lines: list[str | bytes], **changes):
    def setup(w: dict, d: Path) -> None:
        recipe_with(w["base"], d, data__sources=jsonl_source(d, lines), **changes)

    return setup


def on_copied_run(**changes):
    """A copy of the trained run and a changed recipe: the stages before the changed one are skipped."""

    def setup(w: dict, d: Path) -> None:
        shutil.copytree(w["run"], d / "run", symlinks=True)
        recipe_with(w["base"], d, **changes)

    return setup


def copied_checkpoint(damage: Callable[[Path], None] | None = None):
    """A copy of the trained run (recipe pointing to it) with its newest checkpoint damaged."""

    def setup(w: dict, d: Path) -> None:
        shutil.copytree(w["run"], d / "run", symlinks=True)
        ckpt = sorted((d / "run" / "checkpoints" / "pretrain").glob("step_*"))[-1]
        if damage:
            damage(ckpt)

    return setup


def truncate(name: str, keep: int = 100):
    def damage(ckpt: Path) -> None:
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[:keep])

    return damage


def garbage(name: str):
    def damage(ckpt: Path) -> None:
        (ckpt / name).write_bytes(b"\x00garbage, not what it should be" * 10)

    return damage


def resume_from_damaged(damage: Callable[[Path], None]):
    """A run killed after a checkpoint, whose checkpoint is then damaged: resuming must name it."""

    def setup(w: dict, d: Path) -> None:
        shutil.copytree(w["run"], d / "run", symlinks=True)
        # drop the last checkpoint and the pretrain ledger entry: the rerun resumes from the first one
        ckpts = sorted((d / "run" / "checkpoints" / "pretrain").glob("step_*"))
        shutil.rmtree(ckpts[-1])
        ledger = d / "run" / "ledger.jsonl"
        keep = [
            x
            for x in ledger.read_text().splitlines()
            if json.loads(x)["stage"] in ("data", "tokenizer", "shards")
        ]
        ledger.write_text("\n".join(keep) + "\n")
        damage(ckpts[0])
        recipe_with(w["base"], d)

    return setup


def big_tokenizer_hf_dir(w: dict, d: Path) -> None:
    """A Hugging Face directory whose tokenizer has more tokens than the model's embeddings."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(w["release"] / "model", d / "model")
    vocab = {f"t{i}": i for i in range(5000)} | {"[UNK]": 5000}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / "model" / f).unlink(missing_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[UNK]").save_pretrained(d / "model")


def parquet_with_int_text(w: dict, d: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), d / "docs.parquet")
    source = [{"name": "p", "type": "parquet", "path": str(d / "docs.parquet"), "license": "MIT"}]
    recipe_with(w["base"], d, data__sources=source)


def two_sources_one_too_short(w: dict, d: Path) -> None:
    short = d / "short.jsonl"
    short.write_text("".join(json.dumps({"text": f"hi {i}"}) + "\n" for i in range(3)))
    sources = [
        *w["base"]["data"]["sources"],
        {"name": "short", "type": "jsonl", "path": str(short), "license": "MIT"},
    ]
    recipe_with(w["base"], d, data__sources=sources)


def readonly_run_dir(w: dict, d: Path) -> None:
    recipe_with(w["base"], d)
    (d / "ro").mkdir()
    os.chmod(d / "ro", 0o555)


def bound_port(w: dict, d: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    w["sockets"].append(sock)
    (d / "port").write_text(str(sock.getsockname()[1]))


def finetune_data(lines: list[str], **changes):
    def setup(w: dict, d: Path) -> None:
        (d / "sft.jsonl").write_text("".join(x + "\n" for x in lines))
        recipe_with(
            w["base"],
            d,
            data=None,  # post-training alone: no stage before it runs
            finetune={
                "method": "sft",
                "base": str(w["ckpt"]),
                "data": [{"path": str(d / "sft.jsonl")}],
                "max_steps": 1,
                "batch_size": 2,
                "seq_len": 64,
                "val_fraction": 0.0,
                "checkpoint_every": 1,
                "eval_every": 1,
                "precision": "fp32",
            },
            **changes,
        )

    return setup


CHAT = json.dumps(
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
)
MC_LINE = json.dumps({"id": "q1", "context": "x =", "choices": ["1", "2"], "answer": 1})
SUITE_BROKEN = "tasks:\n  - name: t\n    type: multiple_choice\n    path: [unclosed\n"


# ----------------------------------------------------------------------------- the catalogue

R = "{dir}/recipe.yaml"
RUN = ["--run-dir", "{dir}/run"]
CASES = [
    # the command line itself
    Case("no-such-verb", ["frobnicate"], 2, "No such command"),
    Case("missing-argument", ["run"], 2, "Missing argument"),
    Case("unknown-flag", ["run", "{recipe}", "--bogus"], 2, "No such option: --bogus"),
    Case("flag-not-a-number", ["run", "{recipe}", "--workers", "many"], 2, "--workers"),
    # recipes: paths, YAML, fields, values
    Case("recipe-missing", ["run", "{dir}/nope.yaml"], 2, "nope.yaml: recipe file not found"),
    Case("recipe-is-directory", ["run", "{dir}"], 2, "a directory"),
    Case("checkpoint-as-recipe", ["run", "{ckpt}"], 2, "a checkpoint, not a recipe"),
    Case("weights-as-recipe", ["run", "{ckpt}/model.safetensors"], 2, "model.safetensors"),
    Case("recipe-not-utf8", ["run", R], 2, "recipe.yaml", setup=write("recipe.yaml", b"name: \xff\xfe\n")),
    Case("yaml-syntax", ["run", R], 2, "line 2", setup=write("recipe.yaml", "name: x\ndata: [unclosed\n")),
    Case("yaml-not-mapping", ["run", R], 2, "recipe.yaml", setup=write("recipe.yaml", "- a\n- b\n")),
    Case("yaml-empty", ["run", R], 2, "recipe.yaml", setup=write("recipe.yaml", "")),
    Case("unknown-field", ["run", R], 2, "bogus", setup=recipe_case(bogus=1)),
    Case(
        "unknown-nested-field", ["run", R], 2, "data.filters.bogus", setup=recipe_case(data__filters__bogus=1)
    ),
    Case("wrong-type", ["run", R], 2, "pretrain.max_steps", setup=recipe_case(pretrain__max_steps="many")),
    Case("out-of-range", ["run", R], 2, "pretrain.max_steps", setup=recipe_case(pretrain__max_steps=0)),
    Case("bad-literal", ["run", R], 2, "pretrain.precision", setup=recipe_case(pretrain__precision="fp8")),
    Case("missing-name", ["run", R], 2, "name", setup=recipe_case(name=None)),
    Case("set-without-equals", ["run", "{recipe}", "--set", "pretrain.max_steps"], 2, "--set"),
    Case("set-unknown-field", ["run", "{recipe}", "--set", "pretrain.bogus=1"], 2, "pretrain.bogus"),
    Case("set-bad-value", ["run", "{recipe}", "--set", "pretrain.lr=-1"], 2, "pretrain.lr"),
    Case("force-unknown-stage", ["run", "{recipe}", "--force", "nosuch", *RUN], 2, "--force nosuch"),
    Case("unknown-arch", ["pretrain", R, *RUN], 2, "model.arch", setup=on_copied_run(model__arch="nosuch")),
    Case("unknown-size", ["pretrain", R, *RUN], 2, "model.size", setup=recipe_case(model__size="huge")),
    # data
    Case(
        "source-missing",
        ["data", R, *RUN],
        2,
        "no-such-dir",
        setup=recipe_case(data__sources__0__path="/no-such-dir"),
    ),
    Case(
        "source-empty",
        ["data", R, *RUN],
        2,
        "no input file was found",
        setup=lambda w, d: (
            (d / "empty").mkdir() or recipe_with(w["base"], d, data__sources__0__path=str(d / "empty"))
        ),
    ),
    Case(
        "all-records-bad",
        ["data", R, *RUN],
        2,
        "docs.jsonl",
        setup=data_case(["{broken", "not json", "[1, 2]"]),
    ),
    Case(
        "some-records-bad",
        ["data", R, *RUN],
        0,
        "skipped",
        setup=data_case([doc(i) for i in range(30)] + ["{broken", "nope"]),
    ),
    Case(
        "non-utf8-line",
        ["data", R, *RUN],
        0,
        "docs.jsonl:31",
        setup=data_case([doc(i) for i in range(30)] + [b'{"text": "\xff\xfe bad"}']),
    ),
    Case("parquet-int-text", ["data", R, *RUN], 2, "docs.parquet", setup=parquet_with_int_text),
    Case(
        "empty-val-split",
        ["data", R, *RUN],
        0,
        "validation split",
        setup=data_case([doc(i) for i in range(30)], data__split__val_fraction=0.0),
    ),
    Case(
        "tokenizer-on-too-little-text",
        ["data", R, *RUN],
        0,
        "warning: tokenizer: learned only",
        setup=data_case([doc(i, 30) for i in range(12)], tokenizer__vocab_size=4000),
    ),
    Case(
        "source-contributes-nothing",
        ["data", R, *RUN],
        0,
        "warning: data: source 'short' contributed no document",
        setup=two_sources_one_too_short,
    ),
    Case(
        "schedule-longer-than-the-data",
        ["pretrain", R, *RUN],
        0,
        "warning: pretrain: the training split",
        setup=on_copied_run(pretrain__global_batch_tokens=8192, pretrain__micro_batch_size=32),
    ),
    Case(
        "corpus-too-small",
        ["pretrain", R, *RUN],
        2,
        "training split has",
        setup=data_case(
            [doc(i, 20) for i in range(4)],
            data__filters__min_chars=1,
            data__dedup__near=False,
            tokenizer__vocab_size=300,
            pretrain__global_batch_tokens=4096,
            pretrain__seq_len=512,
            pretrain__micro_batch_size=8,
        ),
    ),
    Case("full-disk", ["data", R, *RUN], 2, "no space left", setup=recipe_case(), limit_fsize=4096),
    Case(
        "run-dir-read-only",
        ["data", R, "--run-dir", "{dir}/ro/run"],
        2,
        "permission denied",
        setup=readonly_run_dir,
        read_only_for_root=True,
    ),
    Case("run-dir-under-a-file", ["data", "{recipe}", "--run-dir", "{recipe}/run"], 2, "recipe.yaml"),
    # tokenizer
    Case(
        "tokenizer-path-missing",
        ["tokenizer", R, *RUN],
        2,
        "no-such-tok",
        setup=recipe_case(tokenizer__path="/no-such-tok"),
    ),
    Case(
        "tokenizer-dir-without-json",
        ["tokenizer", R, *RUN],
        2,
        "tokenizer.json",
        setup=lambda w, d: (d / "tok").mkdir() or recipe_with(w["base"], d, tokenizer__path=str(d / "tok")),
    ),
    Case(
        "tokenizer-json-corrupt",
        ["tokenizer", R, *RUN],
        2,
        "tokenizer.json",
        setup=lambda w, d: (
            write("tok/tokenizer.json", "{not json")(w, d)
            or recipe_with(w["base"], d, tokenizer__path=str(d / "tok"))
        ),
    ),
    Case(
        "vocab-too-small",
        ["tokenizer", R, *RUN],
        2,
        "tokenizer.vocab_size",
        setup=recipe_case(tokenizer__vocab_size=10),
    ),
    # pretrain
    Case(
        "init-from-missing",
        ["pretrain", R, *RUN],
        2,
        "model.init_from: /no/such/model",
        setup=on_copied_run(model__init_from="/no/such/model"),
    ),
    Case(
        "resume-truncated-weights",
        ["pretrain", R, "--run-dir", "{dir}/run"],
        2,
        "model.safetensors",
        setup=resume_from_damaged(truncate("model.safetensors")),
    ),
    Case(
        "resume-corrupt-optimizer",
        ["pretrain", R, "--run-dir", "{dir}/run"],
        2,
        "optimizer.pt",
        setup=resume_from_damaged(garbage("optimizer.pt")),
    ),
    Case(
        "resume-other-config",
        ["pretrain", R, "--run-dir", "{dir}/run"],
        2,
        "checkpoint",
        setup=lambda w, d: (
            resume_from_damaged(lambda c: None)(w, d) or recipe_with(w["base"], d, model__hidden_size=48)
        ),
    ),
    # synth
    Case(
        "synth-without-data",
        ["synth", R],
        2,
        "synth needs a data section",
        setup=recipe_case(data=None, synth={}),
    ),
    Case(
        "synth-unknown-kind",
        ["synth", R, *RUN],
        2,
        "synth.kinds",
        setup=recipe_case(synth={"kinds": ["poems"]}),
    ),
    # finetune
    Case(
        "finetune-base-missing",
        ["finetune", R, *RUN],
        2,
        "finetune.base: /no/such/base",
        setup=lambda w, d: finetune_data([CHAT] * 4)(w, d) or _set_base(d, "/no/such/base"),
    ),
    Case(
        "finetune-base-recipe",
        ["finetune", R, *RUN],
        2,
        "a file, not a model",
        setup=lambda w, d: finetune_data([CHAT] * 4)(w, d) or _set_base(d, str(w["recipe"])),
    ),
    Case(
        "finetune-base-hub-offline",
        ["finetune", R, *RUN],
        2,
        "nosuchorg/nosuchmodel",
        setup=lambda w, d: finetune_data([CHAT] * 4)(w, d) or _set_base(d, "nosuchorg/nosuchmodel"),
    ),
    Case(
        "finetune-data-missing",
        ["finetune", R, *RUN],
        2,
        "nope.jsonl",
        setup=lambda w, d: finetune_data([CHAT])(w, d) or _set_data(d, str(d / "nope.jsonl")),
    ),
    Case(
        "finetune-all-bad",
        ["finetune", R, *RUN],
        2,
        "sft.jsonl",
        setup=finetune_data(["{broken", '{"messages": 3}']),
    ),
    Case(
        "finetune-some-bad",
        ["finetune", R, *RUN],
        0,
        "sft.jsonl:5",
        setup=finetune_data([CHAT] * 4 + ["{broken"]),
    ),
    # eval
    Case("eval-model-missing", ["eval", "{dir}/nope", "--tasks", "x.yaml"], 2, "nope: no such"),
    Case("eval-no-tasks", ["eval", "{run}"], 2, "--tasks"),
    Case(
        "eval-contamination-corpus-missing",
        ["eval", "{run}", "--tasks", "{dir}/suite.yaml", "--contamination", "{dir}/nope"],
        2,
        "nope: no such file or directory",
        setup=lambda w, d: (
            write("mc.jsonl", MC_LINE + "\n")(w, d)
            or write("suite.yaml", "- {name: mc, path: mc.jsonl, type: multiple_choice}\n")(w, d)
        ),
    ),
    Case(
        "eval-task-file-bad-line",
        ["eval", "{run}", "--tasks", "{dir}/suite.yaml"],
        2,
        "mc.jsonl:2",
        setup=lambda w, d: (
            write("mc.jsonl", MC_LINE + "\n{broken\n")(w, d)
            or write("suite.yaml", "- {name: mc, path: mc.jsonl, type: multiple_choice}\n")(w, d)
        ),
    ),
    Case("eval-tasks-missing", ["eval", "{run}", "--tasks", "{dir}/none.yaml"], 2, "none.yaml"),
    Case(
        "eval-tasks-yaml-broken",
        ["eval", "{run}", "--tasks", "{dir}/suite.yaml"],
        2,
        "suite.yaml",
        setup=write("suite.yaml", SUITE_BROKEN),
    ),
    Case(
        "eval-json-as-model",
        ["eval", "{dir}/x.json", "--tasks", "s.yaml"],
        2,
        "a file, not a model",
        setup=write("x.json", "{}"),
    ),
    # generate, chat
    Case("generate-missing-dir", ["generate", "/no/such/dir", "hi"], 2, "/no/such/dir: no such"),
    # one slash, like a hub name, but its first part is a local folder: a typo of a path
    Case(
        "generate-typo-in-a-path",
        ["generate", "models/nope", "hi"],
        2,
        "models/nope: no such",
        setup=write("models/x", ""),
    ),
    Case("generate-hub-offline", ["generate", "nosuchorg/nosuchmodel", "hi"], 2, "no Hugging Face hub model"),
    Case("generate-recipe-as-model", ["generate", "{recipe}", "hi"], 2, "a file, not a model"),
    Case("generate-plain-directory", ["generate", "{dir}", "hi"], 2, "not a model"),
    Case("generate-checkpoints-folder", ["generate", "{run}/checkpoints", "hi"], 2, "not a model"),
    Case(
        "generate-truncated-checkpoint",
        ["generate", "{dir}/run", "hi"],
        2,
        "model.safetensors",
        setup=copied_checkpoint(truncate("model.safetensors")),
    ),
    Case(
        "generate-corrupt-config",
        ["generate", "{dir}/run", "hi"],
        2,
        "config.json",
        setup=copied_checkpoint(garbage("config.json")),
    ),
    Case(
        "generate-tokenizer-too-big",
        ["generate", "{dir}/model", "hi"],
        2,
        "embeddings",
        setup=big_tokenizer_hf_dir,
    ),
    Case("generate-bad-precision", ["generate", "{run}", "hi", "--precision", "fp8"], 2, "--precision"),
    Case("generate-negative-tokens", ["generate", "{run}", "hi", "--max-tokens", "-1"], 2, "--max-tokens"),
    Case("generate-release", ["generate", "{release}", "def", "--max-tokens", "4", "--seed", "0"], 0, "def"),
    Case("chat-missing", ["chat", "/no/such/dir"], 2, "no such"),
    Case("chat-run-dir", ["chat", "{run}", "--max-tokens", "3"], 0, "", stdin="hello\n\n"),
    # serve
    Case("serve-missing-dir", ["serve", "/no/such/dir"], 2, "/no/such/dir: no such file or directory"),
    Case("serve-bad-engine", ["serve", "{run}", "--engine", "tgi"], 2, "--engine tgi"),
    Case("serve-vllm-absent", ["serve", "{run}", "--engine", "vllm"], 2, "vllm"),
    Case("serve-port-in-use", ["serve", "{run}", "--port", "{port}"], 2, "already in use", setup=bound_port),
    Case(
        "serve-run-without-checkpoint",
        ["serve", "{dir}"],
        2,
        "no checkpoint yet",
        setup=write("ledger.jsonl", ""),
    ),
    # export
    Case("export-missing", ["export", "/no/such/ckpt", "--out", "{dir}/o"], 2, "/no/such/ckpt"),
    Case("export-no-out", ["export", "{ckpt}"], 2, "--out"),
    Case("export-out-is-file", ["export", "{ckpt}", "--out", "{recipe}"], 2, "recipe.yaml"),
    Case(
        "export-corrupt-weights",
        ["export", "{dir}/run", "--out", "{dir}/o"],
        2,
        "model.safetensors",
        setup=copied_checkpoint(truncate("model.safetensors")),
    ),
    Case("export-run-dir", ["export", "{run}", "--out", "{dir}/o"], 0, "exported"),
    # inspect, report
    Case("inspect-missing", ["inspect", "/no/such/run"], 2, "/no/such/run"),
    Case("inspect-batch-no-step", ["inspect", "batch", "{run}"], 2, "--step"),
    Case("inspect-batch-step-out-of-range", ["inspect", "batch", "{run}", "--step", "999"], 2, "--step 999"),
    Case("inspect-a-file", ["inspect", "{recipe}"], 2, "recipe.yaml"),
    Case("report-missing", ["report", "/no/such/run"], 2, "/no/such/run"),
    Case("report-not-a-run", ["report", "{dir}"], 2, "not a trulyopen run"),
    # release, audit, verify
    Case("release-missing", ["release", "/no/such/run"], 2, "/no/such/run"),
    Case(
        "release-yaml-broken", ["release", R], 2, "not valid YAML", setup=write("recipe.yaml", "name: [x\n")
    ),
    Case("release-not-a-run", ["release", "{dir}"], 2, "recipe"),
    Case("audit-missing", ["audit", "/no/such/dir"], 2, "/no/such/dir"),
    Case("audit-a-file", ["audit", "{recipe}"], 2, "recipe.yaml"),
    Case("verify-missing", ["verify", "/no/such/release"], 2, "/no/such/release"),
    Case("verify-not-a-release", ["verify", "{dir}"], 2, "SHA256SUMS"),
    Case("verify-replay-no-checkpoints", ["verify", "{release}", "--replay", "999"], 2, "--replay 999"),
]


def _set_base(d: Path, base: str) -> None:
    r = yaml.safe_load((d / "recipe.yaml").read_text())
    r["finetune"]["base"] = base
    (d / "recipe.yaml").write_text(yaml.safe_dump(r))


def _set_data(d: Path, path: str) -> None:
    r = yaml.safe_load((d / "recipe.yaml").read_text())
    r["finetune"]["data"] = [{"path": path}]
    (d / "recipe.yaml").write_text(yaml.safe_dump(r))


# ----------------------------------------------------------------------------- running them


def _run_case(case: Case, w: dict, root: Path, forks: Forks) -> dict:
    d = root / case.id
    d.mkdir()
    if case.setup:
        try:
            case.setup(w, d)
        except Exception as e:  # a broken row fails alone
            return {"code": None, "out": "", "err": f"setup failed: {e!r}", "seconds": 0}
    subs = {"run": w["run"], "ckpt": w["ckpt"], "release": w["release"], "recipe": w["recipe"], "dir": d}
    if (d / "port").exists():
        subs["port"] = (d / "port").read_text()
    argv = [a.format(**subs) for a in case.argv]
    t0 = time.time()
    options = {
        "stdin": case.stdin,
        "limit_fsize": case.limit_fsize,
        "read_only_for_root": case.read_only_for_root,
    }
    return forks.run(argv, d, **options) | {"seconds": time.time() - t0}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tiny trained and released run, then every case's result."""
    from trulyopen import pipeline
    from trulyopen.recipe import load_recipe

    root = tmp_path_factory.mktemp("errors")
    corpus = build_corpus(root)
    recipe = write_recipe(root, corpus, release={})
    base = yaml.safe_load(recipe.read_text())
    run_dir = root / "run"
    pipeline.run(load_recipe(recipe), run_dir)
    w = {
        "base": base,
        "recipe": recipe,
        "run": run_dir,
        "ckpt": sorted((run_dir / "checkpoints" / "pretrain").glob("step_*"))[-1],
        "release": run_dir / "release",
        "sockets": [],
    }
    cases = root / "cases"
    cases.mkdir()
    forks = Forks(3, ENV, preload=("trulyopen.pipeline", "trulyopen.serve.launch"))
    try:
        with ThreadPoolExecutor(3) as pool:
            done = pool.map(lambda c: _run_case(c, w, cases, forks), CASES)
            results = dict(zip([c.id for c in CASES], done, strict=True))
    finally:
        forks.close()
    for sock in w["sockets"]:
        sock.close()
    w["results"] = results
    # for a reader of the catalogue: what each case said, and how long it took
    (root / "catalogue.json").write_text(
        json.dumps(
            {k: {"seconds": round(r["seconds"], 1), "stderr": r["err"][-600:]} for k, r in results.items()}
        )
    )
    return w


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(world, case: Case):
    r = world["results"][case.id]
    shown = f"exit {r['code']}\n--- stdout\n{r['out'][-2000:]}\n--- stderr\n{r['err'][-3000:]}"
    assert "Traceback" not in r["err"] + r["out"], shown
    assert r["code"] == case.code, shown
    if case.code == 2:
        lines = [x for x in r["err"].splitlines() if x.strip() and not x.startswith("warning: ")]
        assert len(lines) == 1 and lines[0].startswith("error: "), shown
        assert case.says in lines[0], shown
    else:
        assert case.says in r["out"] + r["err"], shown


def test_a_bug_is_one_line_naming_a_crash_report_in_the_run_directory(recipe_file, tmp_path, monkeypatch):
    """An internal error (here: a stage that divides by zero) is exit 1 and one line; the traceback,
    the versions and the command are in the crash report, in the run directory."""
    from typer.testing import CliRunner

    from trulyopen import cli, pipeline

    def broken(*args, **kwargs):
        return 1 / 0

    monkeypatch.setattr(pipeline, "run", broken)
    result = CliRunner().invoke(cli.app, ["run", str(recipe_file), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 1, result.output
    (line,) = [x for x in result.stderr.splitlines() if x.strip()]
    assert line.startswith("error: internal error (ZeroDivisionError: division by zero)"), line
    report = Path(line.split("the crash report is ")[1].split(" ")[0])
    assert report.parent == (tmp_path / "run").resolve()
    text = report.read_text()
    assert "Traceback" in text and "ZeroDivisionError" in text and "in broken" in text
    assert "command: " in text and "torch: " in text and "python: " in text


def test_ctrl_c_that_a_library_turns_into_its_own_error_is_still_an_interruption(
    recipe_file, tmp_path, monkeypatch
):
    """Ctrl-C during an extension module's import surfaces as "ImportError: initialization failed",
    not as KeyboardInterrupt: it is still an interruption (one line, 130), not a crash report."""
    from typer.testing import CliRunner

    from trulyopen import cli, pipeline

    def importing(*args, **kwargs):
        try:
            cli._on_ctrl_c(signal.SIGINT, None)  # what Python calls on SIGINT once main() installed it
        except KeyboardInterrupt:
            raise ImportError("initialization failed") from None

    monkeypatch.setattr(pipeline, "run", importing)
    monkeypatch.setattr(cli, "_ctrl_c_seen", False)
    result = CliRunner().invoke(cli.app, ["run", str(recipe_file), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 130, result.output
    (line,) = [x for x in result.stderr.splitlines() if x.strip()]
    assert line.startswith("interrupted"), line  # (the rerun command it names comes from sys.argv)
    assert not list((tmp_path / "run").glob("crash-*.txt"))


def test_ctrl_c_that_lands_in_a_finalizer_still_stops_the_run(recipe_file, tmp_path):
    """Ctrl-C while the collector runs an object's __del__ (regex's compiled groups have one) would
    be printed as "Exception ignored ... Traceback" and lost, and the run would go on: it must stop
    the run as any Ctrl-C does. A real `trulyopen` process, its signal handlers installed by main()."""
    script = f"""
import gc, os, signal, sys, time
from trulyopen import cli, pipeline

class Finalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, arriving as this finalizer runs
        time.sleep(0.05)  # the handler runs here, inside __del__

def stage(*args, **kwargs):
    Finalized()
    gc.collect()
    time.sleep(2)  # a stage that goes on working: the interruption must land before it ends
    print("the stage finished")

pipeline.run = stage
sys.argv = ["trulyopen", "run", {str(recipe_file)!r}, "--run-dir", {str(tmp_path / "run")!r}]
cli.main()
"""
    env = {**os.environ, "TRULYOPEN_QUIET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 130, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "the stage finished" not in done.stdout, done.stderr
    (line,) = [x for x in done.stderr.splitlines() if x.strip()]
    assert line.startswith("interrupted"), line
