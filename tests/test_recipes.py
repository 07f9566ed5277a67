"""The recipe library (recipes/, shipped in the package as trulyopen/recipes/): every recipe validates
against the schema, starts with its header (what it does, hardware and time, how to run it), and runs
end to end at toy size with --set overrides; `trulyopen recipes` lists them, `trulyopen init` copies one.

A recipe made for GPUs runs its CPU-sized variant: a tiny model, a few steps, fp32. The overrides are
one table, TOY, a row per recipe. Data stages are made once per module and shared: a recipe whose
data sections (after its overrides) equal a fixture's starts from a copy of that run directory, where
the pipeline finds them up to date (same config hash, code and inputs), so only its own stages run.

    stdlib  the quickstart's data at toy size ──► pretrain-moe (its data section is the quickstart's)
              └─► + tiny pretrain, synth ──► runs/quickstart/synth/*.jsonl: the data of the post-
                                              training recipes, each copied by `trulyopen init` beside it
    web     pretrain-150m's data stages, the toy corpus in FineWeb-Edu's place ──► pretrain-150m, -1b-fsdp
    (own)   curate-corpus: its data stages on the toy corpus (local processes: test_data_scale
            shows that Ray, which the recipe asks for, makes the same bytes)
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from trulyopen import pipeline, recipe_library
from trulyopen.cli import app
from trulyopen.recipe import load_recipe

from .conftest import build_corpus

LIBRARY = Path(__file__).parent.parent / "recipes"
ENTRIES = {e.name: e for e in recipe_library.entries(LIBRARY)}
RECIPES = [name for name, e in ENTRIES.items() if not e.is_space]

# Run end to end by their own tests; here they are validated and their headers checked.
ELSEWHERE = {
    "quickstart": "test_release.py",
    "vlm-quickstart": "test_vlm_quickstart.py",
    "launch-*": "test_launch.py",
}
# Paths a user replaces with their own (the recipe's header says so): validation points them at a
# folder that exists; the end-to-end runs provide them.
PLACEHOLDERS = {
    "curate-corpus": ["data.sources.0.path"],
    **{
        name: ["finetune.data.0.path"]  # runs/quickstart/synth/*.jsonl, beside a copy made by init
        for name in ("sft", "lora", "qlora", "dpo", "kto", "orpo", "simpo", "reward-model", "grpo", "distill")
    },
}

# ----------------------------------------------------------------------------- the toy sizes

STDLIB = [  # the quickstart's corpus at toy size: two packages and a module of the standard library
    'data.sources.0.include=["json/*.py", "email/*.py", "textwrap.py"]',
    "data.split.val_fraction=0.2",
    "tokenizer.vocab_size=600",
]
WEB = [  # the toy corpus (conftest.build_corpus) in FineWeb-Edu's place
    'data.sources=[{{name: toy, type: directory, path: "{corpus}", include: ["**/*.py"], license: MIT}}]',
    "data.split.val_fraction=0.2",
    "tokenizer.vocab_size=400",
]
PRETRAIN = [
    "model.size=tiny",
    "pretrain.seq_len=64",
    "pretrain.global_batch_tokens=512",
    "pretrain.micro_batch_size=4",
    "pretrain.max_steps=4",
    "pretrain.warmup_steps=1",
    "pretrain.eval_every=2",
    "pretrain.eval_sequences=4",
    "pretrain.checkpoint_every=2",
    "pretrain.precision=fp32",
    "pretrain.compile=false",
]
POST = [  # a tiny Llama over the toy quickstart's tokenizer in place of the hub model
    "finetune.base={student}",
    "finetune.max_steps=2",
    "finetune.batch_size=2",
    "finetune.micro_batch_size=2",
    "finetune.warmup_steps=1",
    "finetune.eval_every=2",
    "finetune.checkpoint_every=2",
    "finetune.precision=fp32",
]


@dataclass(frozen=True)
class Toy:
    start: str  # stdlib, web: a copy of that fixture's run; init: a copy of the recipe made by
    #             `trulyopen init` in a folder holding runs/quickstart/ (stdlib's synth run); "": fresh
    sets: list[str]
    verb: str = "run"  # the command: run (every stage) or data (the data stages only)


TOY = {
    "pretrain-150m": Toy("web", PRETRAIN),
    "pretrain-1b-fsdp": Toy("web", PRETRAIN),  # one process here; test_distributed runs FSDP2 on two
    "pretrain-moe": Toy("stdlib", PRETRAIN + ["eval.builtin_items=4"]),
    "curate-corpus": Toy(
        "",
        [
            "data.executor=local",  # the same bytes as on Ray (test_data_scale), without Ray's start
            "data.sources.0.path={corpus}",
            'data.sources.0.include=["**/*.py"]',
            "data.decontamination.eval_files=[{evals}]",
            "data.split.val_fraction=0.2",
            "tokenizer.vocab_size=400",
        ],
        verb="data",
    ),
    "sft": Toy("init", POST),
    "lora": Toy("init", POST),
    "qlora": Toy("init", POST),  # bitsandbytes' NF4 on the CPU
    "dpo": Toy("init", POST),
    "kto": Toy("init", POST),
    "orpo": Toy("init", POST),
    "simpo": Toy("init", POST),
    "reward-model": Toy("init", POST),
    "grpo": Toy(
        "init",
        POST
        + [
            "finetune.micro_batch_size=4",  # replies: 2 prompts x 2
            "finetune.grpo.group_size=2",
            "finetune.grpo.max_new_tokens=8",
            "finetune.grpo.dynamic_sampling=false",  # a random model's groups all score 0: none to keep
        ],
    ),
    "distill": Toy(
        "init", POST + ["finetune.distill.teacher={teacher}", "finetune.distill.max_new_tokens=8"]
    ),
}
# the toy overrides above fill STDLIB and WEB in where a row starts from that fixture
SHARED = {"stdlib": STDLIB, "web": WEB}


def elsewhere(name: str) -> str | None:
    return next((test for pattern, test in ELSEWHERE.items() if fnmatch(name, pattern)), None)


# ----------------------------------------------------------------------------- every recipe, cheaply


@pytest.mark.parametrize("name", list(ENTRIES))
def test_every_recipe_has_its_header(name):
    """What it does (first line), the hardware it expects and about how long it takes, how to run it."""
    header = ENTRIES[name].header
    assert len(header.summary) >= 20, f"{name}: the first line should say what the recipe does"
    hardware, run = header.fields.get("Hardware", ""), header.fields.get("Run", "")
    assert any(unit in hardware for unit in ("second", "minute", "hour")), f"{name}: Hardware: no time"
    assert f"recipes/{name}.yaml" in run or f"--from {name}" in run, f"{name}: Run: names another recipe"


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_validates(name, tmp_path):
    """The schema accepts it as it is; the only paths missing are the ones its user replaces."""
    path = ENTRIES[name].path
    placeholders = PLACEHOLDERS.get(name, [])
    assert [field for field, _ in recipe_library.missing_paths(path)] == placeholders
    recipe = load_recipe(path, [f"{field}={tmp_path}" for field in placeholders])
    assert recipe.name == name  # so that its run directory is runs/<file name>/
    assert elsewhere(name) or name in TOY, f"{name}: add its toy-size overrides to TOY"


def test_search_spaces_fit_their_recipes():
    from trulyopen.tune.space import check_against_recipe, load_space

    for name, entry in ENTRIES.items():
        if entry.is_space:
            recipe = LIBRARY / f"{name.removesuffix(recipe_library.SPACE_SUFFIX)}.yaml"
            check_against_recipe(load_space(entry.path), entry.path, recipe, [])


# ----------------------------------------------------------------------------- shared data stages


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--workers", "1"])
    assert result.exit_code == 0, result.output
    return result.output


def _sets(overrides: list[str], **values: str) -> list[str]:
    return [x for o in overrides for x in ("--set", o.format(**values))]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    """The shared runs and files: stdlib and web data stages, the toy quickstart's synth records,
    the toy corpus, and two tiny Hugging Face models over the toy quickstart's tokenizer."""
    from trulyopen.model.build import from_preset
    from trulyopen.model.export import export_hf
    from trulyopen.model.presets import SIZES

    tmp = tmp_path_factory.mktemp("recipes")
    corpus = build_corpus(tmp)
    values = {"corpus": str(corpus["root"]), "evals": str(corpus["evals"])}
    stdlib, web = tmp / "stdlib", tmp / "web"
    _invoke("data", str(LIBRARY / "quickstart.yaml"), "--run-dir", str(stdlib), *_sets(STDLIB))
    _invoke("data", str(LIBRARY / "pretrain-150m.yaml"), "--run-dir", str(web), *_sets(WEB, **values))
    # the quickstart's synth stage at toy size, where the post-training recipes look for their data
    quickstart = tmp / "work" / "runs" / "quickstart"
    shutil.copytree(stdlib, quickstart)
    tiny = PRETRAIN + ["pretrain.max_steps=1", "pretrain.checkpoint_every=1", "synth.max_per_kind=24"]
    _invoke("synth", str(LIBRARY / "quickstart.yaml"), "--run-dir", str(quickstart), *_sets(STDLIB + tiny))
    for seed, role in ((0, "student"), (1, "teacher")):
        model = from_preset("llama", SIZES["tiny"], vocab=600, max_len=1024, seed=seed)
        values[role] = str(export_hf(model, quickstart / "tokenizer", tmp / role))
    return {"stdlib": stdlib, "web": web, "work": tmp / "work", "values": values}


# ----------------------------------------------------------------------------- every recipe, at toy size


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_runs_at_toy_size(name, made, tmp_path, monkeypatch):
    if elsewhere(name):
        pytest.skip(f"run end to end by {elsewhere(name)}")
    toy = TOY[name]
    overrides = [o.format(**made["values"]) for o in SHARED.get(toy.start, []) + toy.sets]
    sets = [x for o in overrides for x in ("--set", o)]
    if toy.start == "init":  # as its header says: a copy beside runs/quickstart/, then run
        monkeypatch.chdir(made["work"])
        recipe = Path(f"my-{name}.yaml")
        assert "to provide" not in _invoke_init(recipe.stem, name)
        run_dir = made["work"] / "runs" / recipe.stem
    else:
        recipe, run_dir = ENTRIES[name].path, tmp_path / "run"
        if toy.start:
            shutil.copytree(made[toy.start], run_dir)
    output = _invoke(toy.verb, str(recipe), "--run-dir", str(run_dir), *sets)
    until = "shards" if toy.verb == "data" else None
    r = load_recipe(recipe, overrides)
    expected = _stages(r, until)
    done = [json.loads(line)["stage"] for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert set(expected) <= set(done), output
    if toy.start in SHARED:  # its data stages were found up to date, not made again
        assert "data: up to date, skipped" in output and "shards: up to date, skipped" in output
    if "pretrain" in expected:
        _trained(run_dir, "pretrain", r.pretrain.max_steps)
    if "finetune" in expected:
        ckpt = _trained(run_dir, "finetune", r.finetune.max_steps)
        assert (ckpt / "adapter.safetensors").exists() == (r.finetune.adapter != "none")
    if "release" in expected:
        verified = CliRunner().invoke(app, ["verify", str(run_dir / "release")])
        assert verified.exit_code == 0 and " 0 problems" in verified.output, verified.output
    CHECKS.get(name, lambda run_dir: None)(run_dir)


def _invoke_init(name: str, source: str) -> str:
    result = CliRunner().invoke(app, ["init", name, "--from", source])
    assert result.exit_code == 0, result.output
    return result.output


def _stages(recipe, until: str | None) -> list[str]:
    names = []
    for stage in pipeline.STAGES:
        if stage.enabled(recipe):
            names.append(stage.name)
        if stage.name == until:
            break
    return names


def _trained(run_dir: Path, stage: str, steps: int) -> Path:
    """The stage's final checkpoint; its losses finite, and falling where there were a few steps."""
    rows = [json.loads(x) for x in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses), losses
    if steps >= 4:
        assert losses[-1] < losses[0], losses
    ckpt = run_dir / "checkpoints" / stage / f"step_{steps:06d}"
    assert (ckpt / "state.json").exists()
    return ckpt


def _moe(run_dir: Path) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(run_dir / "checkpoints/pretrain/step_000004")
    assert config.model_type == "qwen3_moe" and (config.num_experts, config.num_experts_per_tok) == (8, 2)
    assert not (run_dir / "release/model/gguf").exists()  # llama.cpp export covers no qwen3_moe
    metrics = [json.loads(line) for line in (run_dir / "pretrain/metrics.jsonl").read_text().splitlines()]
    assert all(1.5 < m["router_aux"] < 8 for m in metrics if "loss" in m)  # the load-balancing loss


def _curated(run_dir: Path) -> None:
    removed = [json.loads(x) for x in (run_dir / "data/removed.jsonl").read_text().splitlines()]
    why = {(r["id"].rsplit("/", 1)[-1], r["step"]) for r in removed}
    assert {("zz_exact_copy.py", "exact_dedup"), ("mod_07.py", "decontamination")} <= why, why
    assert any(step == "near_dedup" for _, step in why), why
    assert (run_dir / "data/DATACARD.md").exists() and (run_dir / "data/shards/shards.json").exists()
    assert not (run_dir / "checkpoints").exists()  # `trulyopen data` stops after the shards


def _reward(run_dir: Path) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(run_dir / "checkpoints/finetune/step_000002")
    assert config.architectures == ["LlamaForSequenceClassification"] and config.num_labels == 1


CHECKS = {"pretrain-moe": _moe, "curate-corpus": _curated, "reward-model": _reward}


# ----------------------------------------------------------------------------- the two verbs


def test_recipes_lists_every_recipe_with_its_hardware_line():
    result = CliRunner().invoke(app, ["recipes"])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    for name, entry in ENTRIES.items():
        assert f" {name} {' '.join(entry.header.summary.split())}" in flat
        assert " ".join(entry.header.fields["Hardware"].split()) in flat
    shown = CliRunner().invoke(app, ["recipes", "pretrain-1b-fsdp"])
    assert shown.exit_code == 0 and "torchrun --standalone --nproc_per_node 8" in shown.output


def test_init_copies_a_recipe_under_its_new_name_and_never_overwrites(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = _invoke_init("my-run", "pretrain-moe")
    copy, original = tmp_path / "my-run.yaml", (LIBRARY / "pretrain-moe.yaml").read_text()
    assert "my-run.yaml" in out and "trulyopen run my-run.yaml" in out
    # the same bytes, comments kept, but for the name (so its runs go to runs/my-run/)
    assert copy.read_text() == original.replace("name: pretrain-moe", "name: my-run")
    assert load_recipe(copy).name == "my-run"
    copy.write_text("# mine\n")
    again = CliRunner().invoke(app, ["init", "my-run", "--from", "pretrain-moe"])
    assert again.exit_code == 2 and again.output.count("\n") == 1 and "already exists" in again.output
    assert copy.read_text() == "# mine\n"  # untouched
    # --from takes a file too; a path as NAME; what the copy still needs is named
    _invoke_init("sub/from-file.yml", str(LIBRARY / "lora.yaml"))
    assert yaml.safe_load((tmp_path / "sub/from-file.yml").read_text())["name"] == "from-file"
    needs = _invoke_init("mine", "curate-corpus")
    assert f"to provide: data.sources.0.path: {tmp_path / 'my-corpus'}" in needs
    for source, message in (("no-such-recipe", "no recipe of that name"), ("README.md", "not a recipe file")):
        (tmp_path / "README.md").write_text("hello\n")
        bad = CliRunner().invoke(app, ["init", "x", "--from", source])
        assert bad.exit_code == 2 and message in bad.output and bad.output.count("\n") == 1, bad.output
    assert not (tmp_path / "x.yaml").exists()


def test_the_package_finds_the_recipes_where_a_wheel_puts_them():
    """In a checkout trulyopen/recipes is a link to the repository's recipes/; pyproject ships its
    YAML files as package data, so an installed wheel finds them in the same place."""
    import tomllib

    assert recipe_library.library_dir().resolve() == LIBRARY.resolve()
    pyproject = tomllib.loads((LIBRARY.parent / "pyproject.toml").read_text())
    assert "recipes/*.yaml" in pyproject["tool"]["setuptools"]["package-data"]["trulyopen"]
