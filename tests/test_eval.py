"""Evaluation: exact scores on a model whose preferences are known, both multiple-choice forms,
few-shot determinism, code execution limits, lm-eval agreement, and the eval stage of a run."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from trulyopen import pipeline
from trulyopen.evaluate.loglik import encode_pair
from trulyopen.evaluate.taskfile import TaskSpec, load_instances
from trulyopen.recipe import load_recipe

from .conftest import build_corpus, write_recipe


class Bigram(torch.nn.Module):
    """A language model whose next-token logits are a fixed table row of the current token: its
    log-likelihoods can be computed by hand, and its preferences are set by the table."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)
        self.config = SimpleNamespace(max_position_embeddings=256)

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False
    ):
        return SimpleNamespace(logits=self.table[input_ids], past_key_values=None)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    recipe = write_recipe(
        tmp,
        build_corpus(tmp),
        shards__shard_tokens=100_000,
        pretrain__max_steps=20,
        pretrain__checkpoint_every=20,
        pretrain__eval_every=20,
    )
    return pipeline.run(load_recipe(recipe), tmp / "run", workers=1)


@pytest.fixture(scope="module")
def tok(run_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def by_hand(table: torch.Tensor, ids: list[int]) -> float:
    """log p(ids[1:] | ids[0]) under the bigram table."""
    lp = torch.log_softmax(table, dim=-1)
    return float(sum(lp[a, b] for a, b in zip(ids, ids[1:], strict=False)))


MC = [
    {"id": "q1", "context": "def alphax(y):\n    return", "choices": ["y + 1", "None", "betay"], "answer": 0},
    {"id": "q2", "context": "import", "choices": ["os", "sys", "json"], "answer": 2},
    {"id": "q3", "context": "x =", "choices": ["1", "2"], "answer": 1, "question": "What is x?"},
    {"id": "q4", "context": "class A:\n    pass\n", "choices": ["gammaz", "deltaz"], "answer": 0},
]


def test_multiple_choice_scores_are_exact_and_follow_the_model(tok, tmp_path):
    from trulyopen.evaluate.multiple_choice import LETTERS, cloze_choice, evaluate, lettered_prompt

    torch.manual_seed(0)
    table = torch.randn(len(tok), len(tok))
    path = write_jsonl(tmp_path / "mc.jsonl", MC)
    items = load_instances(path, "multiple_choice")
    spec = TaskSpec(name="mc", path=path, type="multiple_choice", normalization="none")
    metrics, records = evaluate(Bigram(table), tok, spec, items, max_len=256)
    for inst, rec in zip(items, records, strict=True):
        for j, choice in enumerate(inst.choices):
            ctx, cont = encode_pair(tok, inst.context, cloze_choice(inst, choice))
            assert rec["cloze"]["logprobs"][j] == pytest.approx(by_hand(table, [ctx[-1], *cont]), abs=1e-4)
        assert rec["lettered"]["prompt"] == lettered_prompt(inst)
    q3 = records[2]["lettered"]["prompt"]
    assert q3 == "Question: What is x?\n A. 1\n B. 2\nAnswer:"

    # boost the right answers' token paths, and " B" after "Answer:": cloze predictions must be the
    # by-hand argmax (mostly right), the lettered form must pick B every time
    for inst in items:
        ctx, cont = encode_pair(tok, inst.context, cloze_choice(inst, inst.choices[inst.answer]))
        path = [ctx[-1], *cont]
        for a, b in zip(path, path[1:], strict=False):
            table[a, b] += 50.0
    ctx, cont = encode_pair(tok, lettered_prompt(items[0]), " B")
    path = [ctx[-1], *cont]
    for a, b in zip(path, path[1:], strict=False):
        table[a, b] += 50.0
    metrics, records = evaluate(Bigram(table), tok, spec, items, max_len=256)
    expected = []
    for inst in items:
        pairs = [encode_pair(tok, inst.context, cloze_choice(inst, c)) for c in inst.choices]
        hand = [by_hand(table, [ctx[-1], *cont]) for ctx, cont in pairs]
        expected.append(max(range(len(hand)), key=hand.__getitem__))
    assert [r["cloze"]["prediction"] for r in records] == expected
    right = sum(e == i.answer for e, i in zip(expected, items, strict=True))
    assert right >= 3 and metrics["acc_cloze"]["value"] == right / 4
    assert [r["lettered"]["prediction"] for r in records] == [1, 1, 1, 1]
    assert metrics["acc_lettered"]["value"] == 0.25  # only q3's answer is B
    assert metrics["acc"]["value"] == right / 4 and metrics["acc"]["form"] == "cloze"
    assert LETTERS[:3] == "ABC"


def test_trees_and_truncation_equal_plain_forwards_over_lm_eval_windows():
    """Each continuation's score equals one plain forward pass over lm-eval's window
    `(context + continuation)[-(max_len + 1):][:-1]`, whether the continuations share a tree or a
    long context is cut, and whether the model takes `logits_to_keep` or gives logits everywhere."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trulyopen.evaluate.loglik import Request, score

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()

    class NoKeep(torch.nn.Module):  # the same model without logits_to_keep in its signature
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask=None, position_ids=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(1, 50, (n,), generator=g).tolist()  # noqa: E731
    max_len = 24
    requests = [
        Request(rand(5), [rand(2), rand(3), rand(1)]),  # a tree
        Request(rand(7), [rand(4)]),
        Request(rand(30), [rand(3), rand(6)]),  # too long: cut from the left, one per continuation
        Request(rand(3), [rand(24)]),  # a continuation as long as the window
    ]

    def plain(ctx, cont):
        window = (ctx + cont)[-(max_len + 1) :][:-1]
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([window])).logits[0], dim=-1)
        rows = lp[-len(cont) :]
        return float(rows.gather(1, torch.tensor(cont)[:, None]).sum())

    for m in (model, NoKeep()):
        scores = score(m, requests, max_len=max_len, batch_rows=2)
        for req, got in zip(requests, scores, strict=True):
            for cont, s in zip(req.continuations, got, strict=True):
                assert s.tokens == len(cont)
                assert s.logprob == pytest.approx(plain(req.context, cont), abs=1e-4)
    with pytest.raises(ValueError, match="does not fit"):
        score(model, [Request(rand(3), [rand(25)])], max_len=max_len)


def test_length_normalisation_changes_the_choice(tok, tmp_path):
    """A long choice with a high total but a low per-character score loses under char normalisation."""
    from trulyopen.evaluate.multiple_choice import _normalised

    assert _normalised(-6.0, 3, 12, "char") == -0.5
    assert _normalised(-6.0, 3, 12, "token") == -2.0
    assert _normalised(-6.0, 3, 12, "none") == -6.0


def test_few_shot_examples_are_fixed_by_the_seed(tok, tmp_path):
    from trulyopen.evaluate.multiple_choice import evaluate, few_shot

    shots = few_shot(list(range(10)), 3, seed=7)
    assert shots == few_shot(list(range(10)), 3, seed=7) != few_shot(list(range(10)), 3, seed=8)
    assert all(i not in s and len(s) == 3 for i, s in enumerate(shots))
    path = write_jsonl(tmp_path / "mc.jsonl", MC)
    items = load_instances(path, "multiple_choice")
    spec = TaskSpec(name="mc", path=path, type="multiple_choice", few_shot=2, seed=3)
    table = torch.randn(len(tok), len(tok))
    _, a = evaluate(Bigram(table), tok, spec, items, max_len=256)
    _, b = evaluate(Bigram(table), tok, spec, items, max_len=256)
    assert [r["cloze"]["prompt"] for r in a] == [r["cloze"]["prompt"] for r in b]
    first = a[0]["cloze"]["prompt"]
    assert first.endswith(MC[0]["context"]) and first.count("\n\n") >= 2  # two solved examples before


def test_code_tasks_kill_loops_and_memory_bombs_and_score_them_zero(tok, tmp_path):
    from trulyopen.evaluate import generation
    from trulyopen.evaluate.stats import pass_at_k

    prompt = "def add(a, b):\n"
    tests = "assert add(2, 3) == 5"
    path = write_jsonl(tmp_path / "code.jsonl", [{"id": "add", "prompt": prompt, "tests": tests}])
    spec = TaskSpec(name="code", path=path, type="code", samples=4, temperature=1.0, k=[1, 2])
    answers = [
        "    return a + b\n",
        "    while True:\n        pass\n",
        "    x = bytearray(10**11)\n",
        "    return a - b\n",
    ]
    original = generation.complete
    generation.complete = lambda model, tok, prompts, spec, stops, seed: answers
    try:
        metrics, records = generation.evaluate_code(None, tok, spec, load_instances(path, "code"))
    finally:
        generation.complete = original
    assert records[0]["passed"] == [True, False, False, False]
    assert records[0]["status"][1] == "timeout" and records[0]["status"][2] == "memory"
    assert metrics["pass@1"]["value"] == pytest.approx(0.25)
    assert metrics["pass@2"]["value"] == pytest.approx(pass_at_k(4, 1, 2)) == pytest.approx(0.5)


def test_bits_per_byte_of_text_items(tok, tmp_path):
    from trulyopen.evaluate.text import evaluate_text

    table = torch.randn(len(tok), len(tok))
    text = "def alphax(betay):\n    return gammaz\n"
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": text}])
    spec = TaskSpec(name="t", path=path, type="text")
    metrics, _ = evaluate_text(Bigram(table), tok, spec, load_instances(path, "text"), max_len=8)
    ids = [tok.eos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
    expected = -by_hand(table, ids) / math.log(2) / len(text.encode())
    assert metrics["bits_per_byte"]["value"] == pytest.approx(expected, rel=1e-4)


def test_our_scores_equal_lm_eval_on_the_same_local_task(run_dir, tmp_path):
    from trulyopen.evaluate import models
    from trulyopen.evaluate.harness import run_lm_eval
    from trulyopen.evaluate.multiple_choice import evaluate

    em = models.load(run_dir)
    path = write_jsonl(tmp_path / "mc.jsonl", MC)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local_mc.yaml").write_text(
        f"""task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""
    )
    theirs = run_lm_eval(em, ["local_mc"], tmp_path / "out", tmp_path / "tasks")["results"]["local_mc"]
    items = load_instances(path, "multiple_choice")
    raw, _ = evaluate(
        em.model,
        em.tokenizer,
        TaskSpec(name="m", path=path, type="multiple_choice", normalization="none", forms=["cloze"]),
        items,
        em.max_len,
    )
    norm, _ = evaluate(
        em.model,
        em.tokenizer,
        TaskSpec(name="m", path=path, type="multiple_choice", normalization="char", forms=["cloze"]),
        items,
        em.max_len,
    )
    assert theirs["acc,none"] == pytest.approx(raw["acc_cloze"]["value"])
    assert theirs["acc_norm,none"] == pytest.approx(norm["acc_cloze"]["value"])
    samples = [json.loads(x) for x in (tmp_path / "out" / "local_mc.samples.jsonl").read_text().splitlines()]
    assert len(samples) == len(MC)


def test_the_eval_stage_of_a_run(run_dir, tmp_path):
    """`trulyopen eval RECIPE`: built-in tasks from the held-out split, results and contamination."""
    import yaml
    from typer.testing import CliRunner

    from trulyopen.cli import app

    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    write_jsonl(tmp_path / "mc.jsonl", MC)
    (tmp_path / "suite.yaml").write_text("- {name: mine, path: mc.jsonl, type: multiple_choice}\n")
    recipe["eval"] = {"builtin_items": 20, "models": ["pretrain"], "suite": str(tmp_path / "suite.yaml")}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["eval", str(path), "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    results = json.loads((run_dir / "eval" / "pretrain" / "results.json").read_text())
    made = {p.stem for p in (run_dir / "eval" / "tasks").glob("*.jsonl") if p.stat().st_size}
    assert "heldout_text" in made and set(results["tasks"]) == made | {"mine"}  # (tiny corpus: no doctests)
    assert results["tasks"]["mine"]["metrics"]["acc"]["n"] == 4
    assert results["tasks"]["heldout_text"]["metrics"]["bits_per_byte"]["value"] > 0
    report = json.loads((run_dir / "eval" / "contamination.json").read_text())
    assert set(report) == made | {"mine"} and report["mine"]["contaminated"] == 0
    ledger = [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert ledger[-1]["stage"] == "eval"


def test_eval_command_on_a_model_with_a_suite(run_dir, tmp_path):
    from typer.testing import CliRunner

    from trulyopen.cli import app

    write_jsonl(tmp_path / "mc.jsonl", MC)
    write_jsonl(
        tmp_path / "gen.jsonl",
        [
            {"prompt": "x = ", "verifier": {"type": "regex", "pattern": "."}},
            {"prompt": "y", "verifier": {"type": "exact", "answer": "zzz"}},
        ],
    )
    (tmp_path / "suite.yaml").write_text(
        "- {name: mc, path: mc.jsonl, type: multiple_choice, few_shot: 1}\n"
        "- {name: gen, path: gen.jsonl, type: generation, max_new_tokens: 4}\n"
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["eval", str(run_dir), "--tasks", str(tmp_path / "suite.yaml"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    res = json.loads((out / "results.json").read_text())
    assert res["tasks"]["gen"]["metrics"]["score"]["n"] == 2
    assert res["tasks"]["mc"]["sha256"] and (out / "mc.instances.jsonl").exists()
    assert "acc_lettered" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["x"], "answer": 3}\n')
    (tmp_path / "bad.yaml").write_text("- {name: bad, path: bad.jsonl, type: multiple_choice}\n")
    result = CliRunner().invoke(app, ["eval", str(run_dir), "--tasks", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 2 and "bad.jsonl:1" in result.output


def test_pretraining_runs_a_task_suite_in_the_loop(run_dir, tmp_path):
    from trulyopen.pipeline import suite_in_loop
    from trulyopen.recipe import ModelConfig, PretrainConfig
    from trulyopen.train.pretrain import Paths, pretrain

    write_jsonl(tmp_path / "mc.jsonl", MC)
    (tmp_path / "suite.yaml").write_text("- {name: mc, path: mc.jsonl, type: multiple_choice}\n")
    cfg = PretrainConfig(
        seq_len=64,
        global_batch_tokens=512,
        micro_batch_size=4,
        max_steps=4,
        eval_every=2,
        eval_sequences=2,
        checkpoint_every=4,
        precision="fp32",
        eval_suite=tmp_path / "suite.yaml",
    )
    paths = Paths(tmp_path / "run", run_dir / "data" / "shards", run_dir / "tokenizer")
    pretrain(cfg, ModelConfig(arch="llama", size="tiny"), paths, in_loop=suite_in_loop(cfg, paths))
    lines = [json.loads(x) for x in paths.metrics.read_text().splitlines()]
    assert [("eval/mc/acc" in r) for r in lines] == [False, True, False, True]
    assert 0 <= lines[1]["eval/mc/acc_cloze"] <= 1 and "eval/mc/acc_lettered" in lines[3]
