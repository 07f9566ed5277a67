"""Post-training on tiny models: SFT, LoRA, QLoRA, DPO and GRPO, on our checkpoint and on a Hugging
Face model directory; bad records; resume; export."""

import json
import random

import pytest
import torch

from trulyopen import pipeline
from trulyopen.data.sources import DataError
from trulyopen.finetune.stage import FinetunePaths, finetune
from trulyopen.recipe import FinetuneConfig, load_recipe
from trulyopen.train import checkpoint

from .conftest import build_corpus, write_recipe

COLORS = {
    "alpha": "red",
    "beta": "green",
    "gamma": "blue",
    "delta": "white",
    "omega": "black",
    "sigma": "pink",
}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A run with a tiny pretrained model (40 steps on the test corpus)."""
    tmp = tmp_path_factory.mktemp("finetune")
    recipe = write_recipe(
        tmp,
        build_corpus(tmp),
        shards__shard_tokens=100_000,
        pretrain__max_steps=40,
        pretrain__checkpoint_every=40,
        pretrain__eval_every=40,
        pretrain__lr=3e-3,
    )
    return pipeline.run(load_recipe(recipe), tmp / "run", workers=1)


@pytest.fixture(scope="module")
def hf_dir(base_run, tmp_path_factory):
    """A tiny Hugging Face model directory (a qwen3 config, random weights, our tokenizer)."""
    from trulyopen.model.build import from_preset
    from trulyopen.model.export import export_hf
    from trulyopen.model.presets import SIZES

    out = tmp_path_factory.mktemp("hf") / "tiny-qwen3"
    export_hf(
        from_preset("qwen3", SIZES["tiny"], vocab=400, max_len=128, seed=3), base_run / "tokenizer", out
    )
    return out


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def chat_data(path, n=48):
    rng = random.Random(0)
    records = []
    for i in range(n):
        word = rng.choice(list(COLORS))
        records.append(
            {
                "id": f"c{i}",
                "messages": [
                    {"role": "user", "content": f"colour of {word}?"},
                    {"role": "assistant", "content": f"{COLORS[word]}"},
                ],
            }
        )
    return write_jsonl(path, records)


def _cfg(data, **kw) -> FinetuneConfig:
    base = dict(
        method="sft",
        data=[{"path": str(data)}],
        seq_len=64,
        batch_size=4,
        micro_batch_size=2,
        max_steps=20,
        lr=3e-3,
        warmup_steps=2,
        eval_every=10,
        checkpoint_every=10,
        precision="fp32",
        val_fraction=0.1,
    )
    return FinetuneConfig(**{**base, **kw})


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "finetune" / "metrics.jsonl").read_text().splitlines()]


def _loop_paths(base_run, tmp_path):
    """A fresh run directory that shares the base run's pretraining checkpoints and tokenizer."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "pretrain").symlink_to(base_run / "checkpoints" / "pretrain")
    (run / "tokenizer").symlink_to(base_run / "tokenizer")
    return FinetunePaths(run)


# ----------------------------------------------------------------------------- SFT


def test_sft_loss_falls_on_our_checkpoint(base_run, tmp_path):
    paths = _loop_paths(base_run, tmp_path)
    final = finetune(_cfg(chat_data(tmp_path / "chat.jsonl")), paths)
    m = _metrics(paths.run_dir)
    assert [r["step"] for r in m] == list(range(1, 21))
    assert m[-1]["loss"] < m[0]["loss"] / 2
    assert m[9]["val_loss"] > m[19]["val_loss"]
    assert (final / "model.safetensors").exists() and json.loads((final / "state.json").read_text())[
        "step"
    ] == 20
    assert all(r["tokens_per_s"] > 0 for r in m)


def test_only_assistant_tokens_get_a_gradient(base_run):
    from transformers import AutoTokenizer

    from trulyopen.finetune.render import ChatRenderer, item_of
    from trulyopen.train.losses import token_logps
    from trulyopen.train.packing import IGNORE, collate

    tok = AutoTokenizer.from_pretrained(str(base_run / "tokenizer"))
    renderer = ChatRenderer(tok)
    conv = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "colour of alpha?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "and beta?"},
        {"role": "assistant", "content": "green"},
    ]
    item = item_of(renderer.conversation(conv))
    trained_text = tok.decode([t for t in item.targets if t != IGNORE])
    assert trained_text == "red<|end|>\ngreen<|end|>\n"
    model = checkpoint.load_for_inference(checkpoint.newest(base_run / "checkpoints" / "pretrain"))
    captured = {}

    def keep(_module, _inp, out):
        out.retain_grad()
        captured["logits"] = out

    model.lm_head.register_forward_hook(keep)
    batch = collate([item], [[0]], 64, tok.pad_token_id)
    (-token_logps(model, batch, torch.device("cpu")).sum()).backward()
    grad = captured["logits"].grad[0]
    n = len(item)
    masked = batch.targets[0, :n] == IGNORE
    assert grad[:n][masked].abs().max() == 0
    assert (grad[:n][~masked].abs().sum(dim=-1) > 0).all()


def test_packing_gives_the_same_loss_as_unpacked_examples(base_run):
    from transformers import AutoTokenizer

    from trulyopen.finetune.render import ChatRenderer, item_of
    from trulyopen.train.losses import token_logps
    from trulyopen.train.packing import collate

    tok = AutoTokenizer.from_pretrained(str(base_run / "tokenizer"))
    renderer = ChatRenderer(tok)
    items = [
        item_of(renderer.conversation([{"role": "user", "content": q}, {"role": "assistant", "content": a}]))
        for q, a in [
            ("colour of alpha?", "red"),
            ("say something longer", "def f(x):\n    return x"),
            ("hi", "ok"),
        ]
    ]
    model = checkpoint.load_for_inference(checkpoint.newest(base_run / "checkpoints" / "pretrain"))
    cpu = torch.device("cpu")
    with torch.no_grad():
        packed = collate(items, [[0, 1, 2]], 128, tok.pad_token_id)
        together = token_logps(model, packed, cpu).sum()
        alone = sum(
            token_logps(model, collate(items, [[i]], 128, tok.pad_token_id), cpu).sum() for i in range(3)
        )
    assert torch.allclose(together, alone, atol=1e-4), (together, alone)


def test_killed_finetune_resumes_to_identical_bits(base_run, tmp_path, monkeypatch):
    import trulyopen.train.loop as loop

    data = chat_data(tmp_path / "chat.jsonl")
    cfg = _cfg(data, adapter="lora", max_steps=8, checkpoint_every=4, eval_every=4, lora={"dropout": 0.1})
    whole = finetune(cfg, _loop_paths(base_run, tmp_path / "whole"))
    real = loop.learning_rate

    def dying(at, *a):
        if at == 6:
            raise KeyboardInterrupt("killed")
        return real(at, *a)

    monkeypatch.setattr(loop, "learning_rate", dying)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, _loop_paths(base_run, tmp_path / "killed"))
    monkeypatch.setattr(loop, "learning_rate", real)
    resumed = finetune(cfg, FinetunePaths(tmp_path / "killed" / "run"))
    for name in ("adapter.safetensors", "optimizer.pt"):
        assert (resumed / name).read_bytes() == (whole / name).read_bytes()


# ----------------------------------------------------------------------------- LoRA, QLoRA, export


def test_lora_trains_only_the_adapter_and_exports_merged(base_run, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from trulyopen.finetune.base import base_of, with_adapter
    from trulyopen.model.export import export_checkpoint

    paths = _loop_paths(base_run, tmp_path)
    pretrained = checkpoint.newest(base_run / "checkpoints" / "pretrain")
    before = (pretrained / "model.safetensors").read_bytes()
    final = finetune(_cfg(chat_data(tmp_path / "chat.jsonl"), adapter="lora", lr=1e-2), paths)
    m = _metrics(paths.run_dir)
    assert m[-1]["loss"] < m[0]["loss"]
    saved = load_file(str(final / "adapter.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    assert not (final / "model.safetensors").exists()
    assert (pretrained / "model.safetensors").read_bytes() == before  # the base is untouched
    targets = json.loads((final / "state.json").read_text())["lora_config"]["target_modules"]
    assert targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        adapted = with_adapter(final, base_of(final)).eval()(input_ids=ids).logits
        base = checkpoint.load_for_inference(pretrained)(input_ids=ids).logits
        # fp32 noise: merging rounds W + BA once, and the kernels sum in a CPU-dependent order (~1e-5 on
        # logits of ~2.5); the adapter itself moves the logits a hundred times more than we allow
        tol = 1e-4
        assert (adapted - base).abs().max() > 100 * tol  # the adapter changes the model
        out = export_checkpoint(final, tmp_path / "hf")
        merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()(input_ids=ids).logits
        assert torch.allclose(merged, adapted, atol=tol)
        fresh_base = AutoModelForCausalLM.from_pretrained(str(pretrained)).eval()
        via_peft = PeftModel.from_pretrained(fresh_base, str(out / "adapter")).eval()(input_ids=ids).logits
        assert torch.allclose(via_peft, adapted, atol=tol)


def test_qlora_trains_on_cpu(base_run, tmp_path):
    import bitsandbytes as bnb

    from trulyopen.finetune import base as bases

    cfg = _cfg(chat_data(tmp_path / "chat.jsonl"), adapter="qlora", lr=1e-2, max_steps=8, eval_every=8)
    paths = _loop_paths(base_run, tmp_path)
    final = finetune(cfg, paths)
    m = _metrics(paths.run_dir)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in m) and m[-1]["loss"] < m[0]["loss"]
    model = bases.load_model(bases.resolve(cfg, paths.run_dir), cfg, torch.float32, torch.device("cpu"))
    assert any(isinstance(x, bnb.nn.Linear4bit) for x in model.modules())
    assert (final / "adapter.safetensors").exists()


def test_finetune_a_hugging_face_directory_from_the_command_line(hf_dir, tmp_path):
    """A recipe with no data section: SFT on a Hugging Face model directory, via `trulyopen finetune`."""
    import yaml
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from trulyopen.cli import app

    data = chat_data(tmp_path / "chat.jsonl")
    recipe = tmp_path / "ft.yaml"
    cfg = _cfg(data, base=str(hf_dir), max_steps=6, eval_every=6, checkpoint_every=6).model_dump(mode="json")
    recipe.write_text(yaml.safe_dump({"name": "ft", "finetune": cfg}))
    result = CliRunner().invoke(app, ["finetune", str(recipe), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    final = tmp_path / "run" / "checkpoints" / "finetune" / "step_000006"
    m = _metrics(tmp_path / "run")
    assert m[-1]["loss"] < m[0]["loss"]
    assert CliRunner().invoke(app, ["export", str(final), "--out", str(tmp_path / "hf")]).exit_code == 0
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert model.config.model_type == "qwen3"
    ledger = [json.loads(x) for x in (tmp_path / "run" / "ledger.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in ledger] == ["finetune/checkpoint", "finetune"]


# ----------------------------------------------------------------------------- bad records


def test_bad_records_are_named_by_file_and_line(base_run, tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    long = {"messages": [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "a"}]}
    data = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            good,
            {"messages": [{"content": "no role"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
            "{not json",
            long,
            good,
        ],
    )
    paths = _loop_paths(base_run, tmp_path)
    finetune(_cfg(data, max_steps=2, eval_every=2, checkpoint_every=2, val_fraction=0.0), paths)
    summary = json.loads(paths.records.read_text())
    assert summary["records"] == 7 and summary["train"] == 2
    reasons = {b["where"].rsplit(":", 1)[1]: b["reason"] for b in summary["bad"]}
    assert reasons == {
        "2": "messages[0] has no role",
        "3": "messages[0].content is empty",
        "4": "messages[0].content must be a string or a list of parts (got int)",
        "5": reasons["5"],
        "6": "longer than finetune.seq_len (64 tokens)",
    }
    assert reasons["5"].startswith("not valid JSON")
    with pytest.raises(
        DataError, match=r"bad.jsonl:2: messages\[0\] has no role \(finetune.on_bad_record is stop\)"
    ):
        finetune(_cfg(data, on_bad_record="stop"), _loop_paths(base_run, tmp_path / "stop"))
    pref = write_jsonl(tmp_path / "pref.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(
        DataError, match=r"pref.jsonl:1: a preference record, but finetune.method sft takes chat"
    ):
        finetune(_cfg(pref), _loop_paths(base_run, tmp_path / "wrong"))


# ----------------------------------------------------------------------------- DPO


def preference_data(path, n=40):
    rng = random.Random(1)
    records = []
    for i in range(n):
        word = rng.choice(list(COLORS))
        wrong = rng.choice(["no idea", "I do not know", "cannot say"])  # a pattern to learn to avoid
        records.append(
            {"id": f"p{i}", "prompt": f"colour of {word}?", "chosen": COLORS[word], "rejected": wrong}
        )
    return write_jsonl(path, records)


def test_dpo_margin_grows_on_a_toy_preference_set(base_run, tmp_path):
    paths = _loop_paths(base_run, tmp_path)
    data = preference_data(tmp_path / "pref.jsonl")
    cfg = _cfg(
        data,
        method="dpo",
        lr=3e-3,
        max_steps=16,
        eval_every=8,
        val_fraction=0.2,
        batch_size=8,
        micro_batch_size=8,
        dpo={"beta": 0.5},
    )
    finetune(cfg, paths)
    m = _metrics(paths.run_dir)
    first, last = m[:4], m[-4:]
    assert sum(r["reward_margin"] for r in last) / 4 > sum(r["reward_margin"] for r in first) / 4 + 0.5
    assert sum(r["loss"] for r in last) < sum(r["loss"] for r in first)
    assert m[-1]["val_reward_accuracy"] == 1.0 and m[-1]["val_reward_margin"] > m[7]["val_reward_margin"] > 0
    assert {"logp_chosen", "logp_rejected", "reward_chosen", "reward_rejected"} <= set(m[0])
    assert (paths.stage_dir / "reference_logps.safetensors").exists()


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_loss_equals_trl(base_run, tmp_path, loss):
    """Our DPO loss on a batch equals what TRL's DPOTrainer computes for the same model and tokens."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from trulyopen.train.losses import dpo_losses, per_item, token_logps
    from trulyopen.train.packing import IGNORE, Item, collate, pack_rows

    ckpt = checkpoint.newest(base_run / "checkpoints" / "pretrain")
    tok = AutoTokenizer.from_pretrained(str(base_run / "tokenizer"))
    model = AutoModelForCausalLM.from_pretrained(str(ckpt))
    ref_model = AutoModelForCausalLM.from_pretrained(str(ckpt))
    with torch.no_grad():  # make the policy differ from the reference
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02, alpha=1.0)
    pairs = [
        ("def alphax", " = 1", " = 2 + 3"),
        ("return betay", " * 2", " or None"),
        ("class X", ":", "(Y):"),
    ]
    ds = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs])
    args = DPOConfig(
        output_dir=str(tmp_path),
        beta=0.3,
        loss_type=[loss],
        per_device_train_batch_size=3,
        report_to="none",
        use_cpu=True,
        max_length=64,
    )
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=ds, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        theirs = trainer.compute_loss(model, batch)
        # the same tokens, as our packed items: the completion mask says which tokens are trained
        items = []
        for i in range(batch["input_ids"].shape[0]):
            keep = batch["attention_mask"][i].bool()
            ids, comp = batch["input_ids"][i][keep].tolist(), batch["completion_mask"][i][keep].tolist()
            items.append(Item(ids[:-1], [t if c else IGNORE for t, c in zip(ids[1:], comp[1:], strict=True)]))
        b = collate(
            items, pack_rows([len(x) for x in items], list(range(len(items))), 64), 64, tok.pad_token_id
        )
        cpu = torch.device("cpu")
        n = len(pairs)
        pol = per_item(token_logps(model, b, cpu), b, 2 * n)
        ref = per_item(token_logps(ref_model, b, cpu), b, 2 * n)
        counts = per_item((b.targets != IGNORE).float(), b, 2 * n)
        ours, _, _ = dpo_losses(pol[:n], pol[n:], ref[:n], ref[n:], 0.3, loss, counts[:n], counts[n:])
    # rtol 1e-3: TRL pads and we pack, so fp32 sums run in a different order; IPO squares the margin and
    # the two differ by ~1e-4 on some CPUs. A wrong formula (beta, normalisation, sign) is off by >1%.
    assert torch.allclose(ours.mean(), theirs, rtol=1e-3, atol=1e-5), (ours.mean(), theirs)


# ----------------------------------------------------------------------------- GRPO and generation


def test_batched_generation_equals_one_at_a_time(base_run):
    from trulyopen.infer.engine import generate
    from trulyopen.infer.sampling import SamplingParams

    model = checkpoint.load_for_inference(checkpoint.newest(base_run / "checkpoints" / "pretrain"))
    prompts = [[5, 17, 42], [9, 8, 7, 6, 5, 4, 3], [100]]
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    together = generate(model, prompts, greedy)
    assert together == [generate(model, [p], greedy)[0] for p in prompts]
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.9)
    assert generate(model, prompts, sampled, seed=3) == generate(model, prompts, sampled, seed=3)
    assert generate(model, prompts, sampled, seed=3) != generate(model, prompts, sampled, seed=4)


@pytest.mark.parametrize(
    "variant",
    [
        {"lr": 2e-2},
        # an adapter, a KL penalty to the base (the adapter switched off) and two updates per batch
        {"lr": 5e-2, "adapter": "lora", "grpo": {"kl_coef": 0.05, "updates_per_batch": 2}},
    ],
    ids=["full", "lora-kl-2-updates"],
)
def test_grpo_mean_reward_rises_on_a_toy_task(base_run, tmp_path, variant):
    """Reward: the answer contains a digit. GRPO must raise the share of such answers."""
    records = [
        {"id": f"g{i}", "prompt": f"give a number for {w}", "verifier": {"type": "regex", "pattern": r"\d"}}
        for i, w in enumerate(list(COLORS) * 3)
    ]
    data = write_jsonl(tmp_path / "grpo.jsonl", records)
    grpo = {"group_size": 8, "max_new_tokens": 6, "temperature": 1.0, **variant.pop("grpo", {})}
    cfg = _cfg(
        data,
        method="grpo",
        batch_size=4,
        micro_batch_size=16,
        max_steps=16,
        eval_every=16,
        checkpoint_every=16,
        val_fraction=0.0,
        grpo=grpo,
        **variant,
    )
    paths = _loop_paths(base_run, tmp_path)
    finetune(cfg, paths)
    m = _metrics(paths.run_dir)
    first = sum(r["reward"] for r in m[:4]) / 4
    last = sum(r["reward"] for r in m[-4:]) / 4
    assert last > first + 0.2, [r["reward"] for r in m]
    if grpo.get("kl_coef"):
        assert max(r["kl"] for r in m) > 0  # the policy moved away from the base


def test_records_from_a_saved_dataset_and_every_format(tmp_path):
    from datasets import Dataset

    from trulyopen.finetune.records import read_examples
    from trulyopen.recipe import FinetuneDataConfig

    Dataset.from_list(
        [{"prompt": "add 1 and 2", "completion": "3"}, {"prompt": " ", "completion": "x"}]
    ).save_to_disk(str(tmp_path / "ds"))
    examples, bad = read_examples([FinetuneDataConfig(path=tmp_path / "ds")], "sft", "skip")
    assert examples[0].messages == [
        {"role": "user", "content": "add 1 and 2"},
        {"role": "assistant", "content": "3"},
    ]
    assert bad == [{"where": f"{tmp_path / 'ds'}[row 1]", "reason": "prompt is empty"}]

    pref = write_jsonl(
        tmp_path / "pref.jsonl",
        [
            {
                "prompt": [{"role": "user", "content": "q"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": "b",
            },
            {"prompt": "q", "chosen": "a"},
        ],
    )
    examples, bad = read_examples([FinetuneDataConfig(path=pref)], "dpo", "skip")
    assert (examples[0].chosen, examples[0].rejected) == ("a", "b")
    assert bad[0]["reason"] == "rejected must be a string (got NoneType)"

    grpo = write_jsonl(
        tmp_path / "grpo.jsonl",
        [
            {"prompt": "2+2?", "verifier": {"type": "numeric", "answer": 4}},
            {"prompt": "x", "verifier": {"type": "?"}},
        ],
    )
    examples, bad = read_examples([FinetuneDataConfig(path=grpo)], "grpo", "skip")
    assert examples[0].verifier == {"type": "numeric", "answer": 4}
    assert bad[0]["where"].endswith("grpo.jsonl:2") and bad[0]["reason"].startswith("verifier: ")


@pytest.mark.parametrize(
    ("method", "adapter"),
    [("dpo", "lora"), ("grpo", "none"), ("sft", "qlora")],
    ids=["dpo-lora", "grpo", "qlora"],
)
def test_every_method_runs_on_a_hugging_face_directory(hf_dir, tmp_path, method, adapter):
    from transformers import AutoModelForCausalLM

    from trulyopen.model.export import export_checkpoint

    if method == "dpo":
        data = preference_data(tmp_path / "pref.jsonl")
    elif method == "grpo":
        rows = [
            {"prompt": f"number for {w}", "verifier": {"type": "regex", "pattern": r"\d"}} for w in COLORS
        ]
        data = write_jsonl(tmp_path / "grpo.jsonl", rows)
    else:
        data = chat_data(tmp_path / "chat.jsonl")
    extra = {"grpo": {"group_size": 4, "max_new_tokens": 4}} if method == "grpo" else {}
    cfg = _cfg(data, method=method, adapter=adapter, base=str(hf_dir), max_steps=3, eval_every=3, **extra)
    final = finetune(cfg, FinetunePaths(tmp_path / "run"))
    assert len(_metrics(tmp_path / "run")) == 3
    out = export_checkpoint(final, tmp_path / "hf")
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.model_type == "qwen3"
    assert (out / "adapter" / "adapter_config.json").exists() == (adapter != "none")


def test_tool_records_in_openai_format_are_read_and_bad_ones_named(tmp_path):
    """Records as OpenAI writes them: tools, an assistant turn of calls with null content and JSON
    string arguments (read as an object, the template's convention), and tool turns; a bad call or
    tool is named by its field."""
    from trulyopen.finetune.records import read_examples
    from trulyopen.recipe import FinetuneDataConfig

    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}

    def talk(calls=None, tools=None):
        return {
            "tools": tools or [tool],
            "messages": [
                {"role": "user", "content": "add 2 and 3"},
                {"role": "assistant", "content": None, "tool_calls": calls or [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "5"},
                {"role": "assistant", "content": "5"},
            ],
        }

    bad_arguments = [{**call, "function": {"name": "add", "arguments": "{2, 3}"}}]
    data = write_jsonl(
        tmp_path / "tools.jsonl",
        [
            talk(),
            talk(calls=bad_arguments),
            talk(calls=[{"type": "function", "function": {"arguments": "{}"}}]),
            talk(tools=[{"type": "function", "function": {"name": "add", "parameters": "any"}}]),
        ],
    )
    examples, bad = read_examples([FinetuneDataConfig(path=data)], "sft", "skip")
    [ex] = examples
    assert ex.tools == [tool] and ex.messages[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
        ],
    }
    assert ex.messages[2] == {"role": "tool", "content": "5", "tool_call_id": "c1"}
    assert [b["reason"] for b in bad] == [
        "messages[1].tool_calls[0].function.arguments: not JSON",
        "messages[1].tool_calls[0].function.name must be a non-empty string",
        "tools[0].function.parameters must be a JSON schema object",
    ]
