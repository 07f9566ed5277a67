"""`trulyopen merge`: souping checkpoints of one toy pretraining run, slerp, ties, adapters, refusals.

Every expectation is computed here from the checkpoints' own tensors (the average, the spherical
interpolation, the elected signs) or by hand on a few numbers, never read back from the code under test.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from trulyopen import cli, pipeline
from trulyopen.files import sha256_file
from trulyopen.merge.methods import MergeError, merge_tensor, method
from trulyopen.recipe import load_recipe

from .conftest import build_corpus, write_recipe

pytest.importorskip("mergekit")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> list[Path]:
    """The checkpoints at steps 2, 4 and 6 of one toy pretraining run."""
    tmp = tmp_path_factory.mktemp("merge")
    recipe = write_recipe(
        tmp,
        build_corpus(tmp),
        pretrain__max_steps=6,
        pretrain__checkpoint_every=2,
        pretrain__eval_every=6,
        pretrain__lr=3e-3,
    )
    run = pipeline.run(load_recipe(recipe), tmp / "run", workers=1)
    found = sorted((run / "checkpoints" / "pretrain").glob("step_*"))
    assert [p.name for p in found] == ["step_000002", "step_000004", "step_000006"]
    return found


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def merge(*args: str) -> None:
    result = CliRunner().invoke(cli.app, ["merge", *args])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def soup(ckpts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("soup") / "soup"
    merge(str(ckpts[0]), str(ckpts[1]), "--weights", "0.5,0.5", "--out", str(out))
    return out


def test_soup_is_the_average_and_loads_in_transformers(ckpts, soup):
    from transformers import AutoModelForCausalLM

    from trulyopen.train.checkpoint import load_for_inference

    a, b, merged = weights(ckpts[0]), weights(ckpts[1]), weights(soup)
    assert merged.keys() == a.keys()
    average = {name: (a[name] + b[name]) / 2 for name in a}
    for name in a:
        torch.testing.assert_close(merged[name], average[name], rtol=0, atol=1e-7)
    assert any(not torch.equal(a[n], b[n]) for n in a)  # the two checkpoints differ: an average is news

    loaded = AutoModelForCausalLM.from_pretrained(str(soup)).eval()
    by_hand = load_for_inference(ckpts[0])
    by_hand.load_state_dict(average)
    ids = torch.tensor([[1, 5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, by_hand(ids).logits, rtol=0, atol=1e-5)
    # generate, chat and serve take it (a ledger.jsonl beside config.json does not make it a run)
    result = CliRunner().invoke(cli.app, ["generate", str(soup), "def", "--max-tokens", "4", "--seed", "0"])
    assert result.exit_code == 0, result.output


def test_the_ledger_records_inputs_and_outputs_with_their_hashes(ckpts, soup):
    (entry,) = [json.loads(line) for line in (soup / "ledger.jsonl").read_text().splitlines()]
    assert entry["stage"] == "merge" and entry["method"] == "linear"
    assert entry["parameters"] == {"weights": [0.5, 0.5], "normalize": True}
    assert [m["model"] for m in entry["models"]] == [str(ckpts[0]), str(ckpts[1])]
    assert entry["code_version"]["source_sha256"] and entry["libraries"]["mergekit"] == "0.1.5"
    inputs = {r["path"]: r for r in entry["inputs"]}
    for ckpt in ckpts[:2]:
        record = inputs[str((ckpt / "model.safetensors").resolve())]
        assert record["sha256"] == sha256_file(ckpt / "model.safetensors")
        assert record["model"] == str(ckpt)
    assert str((ckpts[0].parents[2] / "tokenizer" / "tokenizer.json").resolve()) in inputs
    outputs = {r["path"]: r for r in entry["outputs"]}
    on_disk = {str(p.relative_to(soup)) for p in soup.rglob("*") if p.is_file()} - {"ledger.jsonl"}
    assert outputs.keys() == on_disk and "model.safetensors" in on_disk
    for path, record in outputs.items():
        assert record["sha256"] == sha256_file(soup / path) and record["size"] == (soup / path).stat().st_size


def test_the_merge_is_a_run_of_its_project_with_its_parents(ckpts, soup):
    from trulyopen.history.project import Project

    run = Project(soup.parent).runs()["soup"]
    assert run.parents == ["run"] and run.status == "finished"  # two checkpoints of one run: a soup
    assert run.why == ["merge of run (linear)"] and run.recipe["merge"]["weights"] == [0.5, 0.5]


def test_weights_are_normalised_unless_told_not_to(ckpts, tmp_path):
    a, b = weights(ckpts[0]), weights(ckpts[1])
    name = "model.layers.0.mlp.up_proj.weight"
    merge(str(ckpts[0]), str(ckpts[1]), "--weights", "1,3", "--out", str(tmp_path / "n"))
    torch.testing.assert_close(weights(tmp_path / "n")[name], (a[name] + 3 * b[name]) / 4)
    merge(str(ckpts[0]), str(ckpts[1]), "--weights", "1,3", "--no-normalize", "--out", str(tmp_path / "raw"))
    torch.testing.assert_close(weights(tmp_path / "raw")[name], a[name] + 3 * b[name])


def slerp_by_hand(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The great-circle interpolation of two tensors taken as flat vectors (float64)."""
    x, y = a.double(), b.double()
    theta = math.acos(float((x.flatten() / x.norm()) @ (y.flatten() / y.norm())))
    return (math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta)


def test_slerp_ends_at_the_endpoints_and_follows_the_great_circle(ckpts, tmp_path):
    a, b = weights(ckpts[0]), weights(ckpts[2])
    for t, expected in (("0", a), ("1", b)):
        merge(str(ckpts[0]), str(ckpts[2]), "--method", "slerp", "--t", t, "--out", str(tmp_path / t))
        got = weights(tmp_path / t)
        assert all(torch.equal(got[n], expected[n]) for n in a)
    merge(str(ckpts[0]), str(ckpts[2]), "--method", "slerp", "--t", "0.5", "--out", str(tmp_path / "mid"))
    mid = weights(tmp_path / "mid")
    name = "model.layers.0.self_attn.q_proj.weight"
    cos = float(torch.nn.functional.cosine_similarity(a[name].flatten(), b[name].flatten(), dim=0))
    assert cos < 0.9995  # a real angle: not the linear fallback
    expected = slerp_by_hand(0.5, a[name], b[name]).float()
    torch.testing.assert_close(mid[name], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(mid[name], (a[name] + b[name]) / 2, rtol=1e-5, atol=1e-6)


def test_slerp_falls_back_to_linear_for_nearly_parallel_tensors():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    w = v * 3 + 1e-4  # cos > 0.9995: mergekit interpolates linearly
    got = merge_tensor(method("slerp", 2, t=0.25), [v, w])
    torch.testing.assert_close(got, 0.75 * v + 0.25 * w)
    # orthogonal: a quarter of the right angle, on the unit circle
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    got = merge_tensor(method("slerp", 2, t=0.25), [e1, e2])
    torch.testing.assert_close(got, torch.tensor([math.cos(math.pi / 8), math.sin(math.pi / 8)]))


def test_ties_by_hand_on_a_small_example():
    base = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    # task vectors            [ 2,   -3,   0.5,  1,    0.1]   trimmed to 0.4 (2 largest): [2, -3, 0, 0, 0]
    #                         [-1,    2,   0.2,  4,   -0.3]   trimmed:                     [0,  2, 0, 4, 0]
    a = base + torch.tensor([2.0, -3.0, 0.5, 1.0, 0.1])
    b = base + torch.tensor([-1.0, 2.0, 0.2, 4.0, -0.3])
    # weights 1 and 2:     weighted [2, -3, 0, 0, 0] and [0, 4, 0, 8, 0]; their sum [2, 1, 0, 8, 0]
    # elected signs (sum >= 0: +)   [+, +, +, +, +]: in element 1, a's -3 disagrees and is dropped
    # kept, weighted, summed        [2, 4, 0, 8, 0]; divided by the kept weights [1, 2, -, 2, -]
    got = merge_tensor(method("ties", 2, [1.0, 2.0], density=0.4, base=True), [a, b], base)
    torch.testing.assert_close(got, base + torch.tensor([2.0, 2.0, 0.0, 4.0, 0.0]))
    raw = merge_tensor(method("ties", 2, [1.0, 2.0], density=0.4, normalize=False, base=True), [a, b], base)
    torch.testing.assert_close(raw, base + torch.tensor([2.0, 4.0, 0.0, 8.0, 0.0]))


def test_ties_of_two_checkpoints_elects_signs_against_the_base(ckpts, tmp_path):
    base, a, b = weights(ckpts[0]), weights(ckpts[1]), weights(ckpts[2])
    out = tmp_path / "ties"
    merge(str(ckpts[1]), str(ckpts[2]), "--method", "ties", "--base", str(ckpts[0]), "--out", str(out))
    got = weights(out)
    for (
        name
    ) in base:  # density 1: nothing trimmed; per element the task vectors of the elected sign, averaged
        da, db = a[name] - base[name], b[name] - base[name]
        up = (da + db) >= 0
        keep_a = torch.where(up, da > 0, da < 0).float()
        keep_b = torch.where(up, db > 0, db < 0).float()
        mixed = (da * keep_a + db * keep_b) / (keep_a + keep_b).clamp(min=1)
        torch.testing.assert_close(got[name], base[name] + mixed, rtol=1e-6, atol=1e-7)
    ledger = json.loads((out / "ledger.jsonl").read_text())
    assert [m["role"] for m in ledger["models"]] == ["base", "model", "model"]
    assert ledger["parameters"] == {"weights": [1.0, 1.0], "normalize": True, "density": 1.0}


def test_an_adapter_checkpoint_is_merged_into_its_base_first(ckpts, tmp_path):
    from peft import LoraConfig, get_peft_model

    from trulyopen.finetune.base import lora_config_dict
    from trulyopen.train import checkpoint

    base_model = checkpoint.load_for_inference(ckpts[2])
    peft_model = get_peft_model(base_model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter: B is no longer zero
    state = {"base": str(ckpts[2]), "lora_config": lora_config_dict(peft_model)}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad])
    adapter = checkpoint.save(tmp_path / "ft", 1, peft_model, optimizer, state, adapter=True)
    for f in (ckpts[2].parents[2] / "tokenizer").iterdir():  # the checkpoint's own tokenizer
        shutil.copy(f, adapter / f.name)
    tuned = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}

    merge(str(adapter), str(ckpts[2]), "--out", str(tmp_path / "out"))
    got, plain = weights(tmp_path / "out"), weights(ckpts[2])
    name = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.allclose(tuned[name], plain[name])
    for n in plain:
        torch.testing.assert_close(got[n], (tuned[n] + plain[n]) / 2, rtol=1e-6, atol=1e-6)
    (entry,) = [json.loads(line) for line in (tmp_path / "out" / "ledger.jsonl").read_text().splitlines()]
    assert entry["models"][0]["kind"] == "adapter" and entry["models"][0]["adapter_base"] == str(ckpts[2])
    assert str((adapter / "adapter.safetensors").resolve()) in {r["path"] for r in entry["inputs"]}


def test_another_architecture_is_refused_in_one_line_through_the_cli(ckpts, tmp_path):
    from trulyopen.model.build import from_preset
    from trulyopen.model.export import export_hf
    from trulyopen.model.presets import SIZES

    other = export_hf(
        from_preset("qwen3", SIZES["tiny"], vocab=400, max_len=64),
        ckpts[0].parents[2] / "tokenizer",
        tmp_path / "q",
    )
    out = tmp_path / "out"
    # the app `trulyopen` runs, with its error contract (cli._Contract), invoked in this process
    result = CliRunner().invoke(cli.app, ["merge", str(ckpts[0]), str(other), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert result.stderr.startswith(f"error: {other}: not the same architecture as {ckpts[0]}: model_type")
    assert "'qwen3' here, 'llama' there" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out-scratch-*"))


def test_a_wider_model_or_another_tokenizer_is_refused_naming_the_difference(ckpts, tmp_path):
    from trulyopen.merge.stage import merge_models
    from trulyopen.model.export import export_checkpoint

    wider = export_checkpoint(ckpts[1], tmp_path / "wider")
    config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    linear = method("linear", 2)
    with pytest.raises(MergeError, match="config intermediate_size is 256 here, 192 there"):
        merge_models([str(ckpts[0]), str(wider)], linear, tmp_path / "out")

    retokenized = export_checkpoint(ckpts[1], tmp_path / "retok")
    spec = json.loads((retokenized / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    x, y = sorted(vocab, key=vocab.get)[300:302]
    vocab[x], vocab[y] = vocab[y], vocab[x]
    (retokenized / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(MergeError, match=f"token {x!r} is id {vocab[x]} here, {vocab[y]} there"):
        merge_models([str(ckpts[0]), str(retokenized)], linear, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--method", "ties"], "--method ties: give --base"),
        (["--method", "slerp", "{c}"], "give exactly two models"),
        (["--weights", "1,2,3"], "--weights: 3 weights for 2 models"),
        (["--weights", "1,x"], "--weights 1,x: give numbers"),
        (["--method", "dare"], "--method dare: not a merge method"),
        (["--density", "0.5"], "--density: only ties"),
        (["--out", "{c}"], "a directory with other things in it"),
    ],
)
def test_wrong_options_are_one_line_errors(ckpts, tmp_path, args, says):
    argv = ["merge", str(ckpts[0]), str(ckpts[1]), "--out", str(tmp_path / "out")]
    argv += [a.replace("{c}", str(ckpts[2])) for a in args]
    result = CliRunner().invoke(cli.app, argv)
    assert result.exit_code == 2, result.output
    assert says in result.output and "Traceback" not in result.output
