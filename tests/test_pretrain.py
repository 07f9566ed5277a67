"""Pretraining on a tiny model: the loss falls, and a killed run resumes to identical bits."""

import json

import pytest

from trulyopen import pipeline
from trulyopen.recipe import ModelConfig, PretrainConfig, load_recipe
from trulyopen.train import TrainingError, checkpoint
from trulyopen.train.pretrain import Paths, pretrain

from .conftest import build_corpus, write_recipe


@pytest.fixture(scope="module")
def data_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    recipe = write_recipe(tmp, build_corpus(tmp), shards__shard_tokens=100_000)
    return pipeline.run(load_recipe(recipe), tmp / "run", workers=1)


TINY = ModelConfig(arch="llama", size="tiny")


def _cfg(**kw) -> PretrainConfig:
    base = dict(
        seq_len=64,
        global_batch_tokens=512,
        micro_batch_size=4,
        max_steps=12,
        lr=3e-3,
        warmup_steps=2,
        eval_every=6,
        eval_sequences=4,
        checkpoint_every=4,
        precision="fp32",
    )
    return PretrainConfig(**{**base, **kw})


def _paths(data_run, run_dir) -> Paths:
    return Paths(run_dir, data_run / "data" / "shards", data_run / "tokenizer")


def _run_killed_at(step: int, cfg, paths, monkeypatch) -> None:
    """Run pretraining that dies (KeyboardInterrupt) as step `step` (0-based) begins."""
    import trulyopen.train.loop as loop

    real = loop.learning_rate

    def dying(at, *a):
        if at == step:
            raise KeyboardInterrupt("killed")
        return real(at, *a)

    monkeypatch.setattr(loop, "learning_rate", dying)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, TINY, paths)
    monkeypatch.setattr(loop, "learning_rate", real)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_checkpoints_are_kept(data_run, tmp_path):
    final = pretrain(_cfg(max_steps=40, checkpoint_every=10, eval_every=20), TINY, _paths(data_run, tmp_path))
    m = _metrics(tmp_path)
    assert [r["step"] for r in m] == list(range(1, 41))
    assert sum(r["loss"] for r in m[-5:]) / 5 < sum(r["loss"] for r in m[:5]) / 5 - 1.0
    assert m[19]["val_bpb"] > m[39]["val_bpb"] > 0
    kept = [p.name for p in checkpoint.complete(tmp_path / "checkpoints" / "pretrain")]
    assert kept == ["step_000010", "step_000020", "step_000030", "step_000040"] and final.name == kept[-1]


def test_killed_run_resumes_to_identical_bits(data_run, tmp_path, monkeypatch):
    whole = pretrain(_cfg(), TINY, _paths(data_run, tmp_path / "whole"))
    # a run that dies after its step-8 checkpoint, as step 10 begins
    _run_killed_at(9, _cfg(), _paths(data_run, tmp_path / "killed"), monkeypatch)
    resumed = pretrain(_cfg(), TINY, _paths(data_run, tmp_path / "killed"))
    assert (resumed / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert (resumed / "optimizer.pt").read_bytes() == (whole / "optimizer.pt").read_bytes()
    assert [r["loss"] for r in _metrics(tmp_path / "killed")] == [
        r["loss"] for r in _metrics(tmp_path / "whole")
    ]


def _poison_step(monkeypatch, bad_step: int):
    """Make the loss of one step NaN (counting the calls of lm_loss: one per micro-batch)."""
    import trulyopen.train.objectives.causal_lm as loop

    real, calls = loop.lm_loss, {"n": 0}
    micro_per_step = 2  # 512 tokens / 64 per sequence / 4 sequences per micro-batch

    def poisoned(logits, targets, z, *rest):
        calls["n"] += 1
        loss, ce = real(logits, targets, z, *rest)
        if (calls["n"] - 1) // micro_per_step == bad_step - 1:
            return loss * float("nan"), ce * float("nan")
        return loss, ce

    monkeypatch.setattr(loop, "lm_loss", poisoned)


def test_nan_loss_stops_and_names_the_last_checkpoint(data_run, tmp_path, monkeypatch):
    _poison_step(monkeypatch, 6)
    with pytest.raises(
        TrainingError, match=r"not finite at step 6 \(loss nan.*last good checkpoint is .*step_000004"
    ):
        pretrain(_cfg(), TINY, _paths(data_run, tmp_path))
    assert [p.name for p in checkpoint.complete(tmp_path / "checkpoints" / "pretrain")] == ["step_000004"]


def test_nan_loss_can_skip_the_step(data_run, tmp_path, monkeypatch, capsys):
    _poison_step(monkeypatch, 6)
    pretrain(_cfg(on_nan="skip"), TINY, _paths(data_run, tmp_path))
    assert "step 6: loss nan" in capsys.readouterr().out
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12]


def test_pipeline_pretrains_and_export_loads_in_transformers(data_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from trulyopen.cli import app

    final = data_run / "checkpoints" / "pretrain" / "step_000004"
    assert (final / "model.safetensors").exists()
    result = CliRunner().invoke(app, ["export", str(final), "--out", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ours = checkpoint.load_for_inference(final)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ids = torch.tensor([tok.encode("def alphax_0(betay, gammaz):\n    return")])
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    # generation stops at end-of-text and at the chat template's end-of-turn marker
    assert theirs.generation_config.eos_token_id == [tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")]
    bad = CliRunner().invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "a directory, but not a model" in bad.output


def test_inspect_batch_names_the_documents_of_a_step(data_run):
    from typer.testing import CliRunner

    from trulyopen.cli import app
    from trulyopen.train.loader import BatchPlan, TokenStream

    result = CliRunner().invoke(app, ["inspect", "batch", str(data_run), "--step", "2"])
    assert result.exit_code == 0, result.output
    plan = BatchPlan(TokenStream(data_run / "data" / "shards", "train"), 64, 512 // 64, seed=0)
    expected = {doc_id for row in plan.batch_documents(1) for doc_id, _, _ in row}
    shown = {line.split("] ")[1].split(":")[0] for line in result.output.splitlines() if "] " in line}
    assert shown == expected and len(result.output.splitlines()) > 8
    bad = CliRunner().invoke(app, ["inspect", "batch", str(data_run), "--step", "99"])
    assert bad.exit_code == 2 and "steps 1 to 4" in bad.output


def test_full_disk_while_checkpointing_keeps_the_last_checkpoint(data_run, tmp_path, monkeypatch):
    import errno

    import torch

    real = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the second checkpoint's optimizer.pt (each writes optimizer.pt, rng.pt)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(
        TrainingError, match=r"step_000008: No space left on device; the last complete .*step_000004"
    ):
        pretrain(_cfg(), TINY, _paths(data_run, tmp_path))
    root = tmp_path / "checkpoints" / "pretrain"
    assert [p.name for p in root.iterdir()] == ["step_000004"]  # no half-written directory left
    monkeypatch.setattr(torch, "save", real)
    assert pretrain(_cfg(), TINY, _paths(data_run, tmp_path)).name == "step_000012"  # resumes from step 4


def test_continue_from_a_hugging_face_checkpoint(data_run, tmp_path):
    from trulyopen.model.build import from_preset
    from trulyopen.model.export import export_hf
    from trulyopen.model.presets import SIZES, ModelSpecError

    base = from_preset("qwen3", SIZES["tiny"], vocab=400, max_len=64, seed=7)
    export_hf(base, data_run / "tokenizer", tmp_path / "base")
    cfg = ModelConfig(init_from=str(tmp_path / "base"))
    pretrain(_cfg(max_steps=2, checkpoint_every=2, eval_every=2), cfg, _paths(data_run, tmp_path / "run"))
    state = json.loads((tmp_path / "run/checkpoints/pretrain/step_000002/config.json").read_text())
    assert state["model_type"] == "qwen3"
    with pytest.raises(ModelSpecError, match=r"pretrain.seq_len \(128\) is beyond the 64 positions"):
        pretrain(_cfg(seq_len=128, global_batch_tokens=512), cfg, _paths(data_run, tmp_path / "long"))


def test_checkpoint_smaller_than_the_tokenizer_is_named(data_run, tmp_path):
    from trulyopen.model.build import from_preset
    from trulyopen.model.export import export_hf
    from trulyopen.model.presets import SIZES, ModelSpecError

    export_hf(from_preset("llama", SIZES["tiny"], vocab=300, max_len=64), None, tmp_path / "small")
    with pytest.raises(ModelSpecError, match="has 300 token embeddings but the tokenizer has 400 tokens"):
        pretrain(_cfg(), ModelConfig(init_from=str(tmp_path / "small")), _paths(data_run, tmp_path / "run"))


def test_document_masking_makes_a_packed_document_see_only_itself(data_run, tmp_path):
    import torch

    from trulyopen.model.build import from_preset
    from trulyopen.model.presets import SIZES
    from trulyopen.train.attention import document_attention

    model = from_preset("llama", SIZES["tiny"], vocab=100, max_len=64).eval()
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(1, 100, (n,), generator=g) for n in (5, 7, 4))
    eot = torch.tensor([0])
    row = torch.cat([a, eot, b, eot, c]).unsqueeze(0)
    mask, positions = document_attention(row, eot=0)
    assert positions.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]]
    with torch.no_grad():
        packed = model(input_ids=row, attention_mask=mask, position_ids=positions).logits[0]
        for doc, start in ((a, 0), (b, 6), (c, 14)):
            alone = model(input_ids=doc.unsqueeze(0)).logits[0]
            assert torch.allclose(packed[start : start + len(doc)], alone, atol=1e-5)
    pretrain(
        _cfg(max_steps=2, checkpoint_every=2, eval_every=2, document_masking=True),
        TINY,
        _paths(data_run, tmp_path),
    )
    assert all(r["loss"] > 0 for r in _metrics(tmp_path))


def test_keep_every_thins_old_checkpoints(data_run, tmp_path):
    pretrain(
        _cfg(max_steps=10, checkpoint_every=2, keep_every=2, eval_every=10), TINY, _paths(data_run, tmp_path)
    )
    kept = [p.name for p in checkpoint.complete(tmp_path / "checkpoints" / "pretrain")]
    assert kept == ["step_000004", "step_000008", "step_000010"]  # multiples of 4, and the newest


def test_resuming_on_other_data_is_refused(data_run, tmp_path, monkeypatch):
    import shutil

    from trulyopen.train.loader import DataMismatchError

    _run_killed_at(5, _cfg(), _paths(data_run, tmp_path), monkeypatch)
    other = tmp_path / "other_shards"
    shutil.copytree(data_run / "data" / "shards", other)
    meta = json.loads((other / "shards.json").read_text())
    meta["fingerprint"] = "0" * 64
    (other / "shards.json").write_text(json.dumps(meta))
    with pytest.raises(DataMismatchError, match=r"trained on data [0-9a-f]{16}, but the run.s data is 0{16}"):
        pretrain(_cfg(), TINY, Paths(tmp_path, other, data_run / "tokenizer"))


def test_metrics_go_to_tensorboard_when_asked(data_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pretrain(
        _cfg(max_steps=3, checkpoint_every=3, eval_every=3, log_to=["tensorboard"]),
        TINY,
        _paths(data_run, tmp_path),
    )
    events = EventAccumulator(str(tmp_path / "pretrain" / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("loss")]
    assert losses == pytest.approx([r["loss"] for r in _metrics(tmp_path)], rel=1e-6)
    assert [e.step for e in events.Scalars("val_bpb")] == [3]


@pytest.mark.parametrize("arch", ["qwen3", "olmo2", "qwen3_moe", "deepseek_v3"])
def test_every_named_family_pretrains_and_exports(data_run, tmp_path, arch):
    import torch
    from transformers import AutoModelForCausalLM

    from trulyopen.model.export import export_hf

    final = pretrain(
        _cfg(max_steps=2, checkpoint_every=2, eval_every=2),
        ModelConfig(arch=arch, size="tiny"),
        _paths(data_run, tmp_path),
    )
    assert all(r["loss"] > 0 for r in _metrics(tmp_path))
    # a mixture of experts trains with its load-balancing loss (2, its experts per token, if uniform)
    assert all((0.5 < r.get("router_aux", 0) < 8) == (arch == "qwen3_moe") for r in _metrics(tmp_path))
    ours = checkpoint.load_for_inference(final)
    export_hf(ours, data_run / "tokenizer", tmp_path / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.randint(0, 400, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_moe_load_balancing_loss_is_the_familys_own():
    """The router logits collected by hooks give what transformers computes itself when asked for
    them (with no document mask), times the config's coefficient, and its gradient reaches the
    routers; a dense model, or a family that balances without such a loss, gets none."""
    import torch

    from trulyopen.model.build import from_preset
    from trulyopen.model.presets import SIZES
    from trulyopen.train.router_balance import RouterBalance

    model = from_preset("qwen3_moe", SIZES["tiny"], vocab=400, max_len=64, seed=0)
    balance = RouterBalance.of(model)
    assert balance.coef == model.config.router_aux_loss_coef == 0.001
    x = torch.randint(0, 400, (2, 32), generator=torch.Generator().manual_seed(0))
    balance.start()
    model(input_ids=x)
    ours, logged = balance.loss()
    with torch.no_grad():
        theirs = model(input_ids=x, output_router_logits=True).aux_loss.item()
    assert ours.item() == pytest.approx(0.001 * theirs, rel=1e-6) and logged == pytest.approx(
        theirs, rel=1e-6
    )
    assert 0.5 < theirs < 8
    ours.backward()
    routers = [p.grad for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]
    assert len(routers) == model.config.num_hidden_layers and all(g.abs().sum() > 0 for g in routers)
    with torch.no_grad():
        model(input_ids=x)  # evaluation passes leave nothing behind
    assert balance.logits == []
    assert RouterBalance.of(from_preset("llama", SIZES["tiny"], vocab=400, max_len=64)) is None
    assert RouterBalance.of(from_preset("deepseek_v3", SIZES["tiny"], vocab=400, max_len=64)) is None


def test_schedules_warm_up_then_decay():
    from trulyopen.train.schedule import learning_rate

    def lrs(schedule):
        return [learning_rate(s, 100, 1.0, 10, schedule, 0.1, 0.2) for s in range(100)]

    cosine, wsd = lrs("cosine"), lrs("wsd")
    assert cosine[0] == wsd[0] == 0.1 and cosine[9] == wsd[9] == 1.0  # linear warmup to the peak
    assert all(a >= b for a, b in zip(cosine[9:], cosine[10:], strict=False)) and cosine[-1] == pytest.approx(
        0.1, abs=1e-3
    )
    assert set(wsd[10:80]) == {1.0} and wsd[-1] == pytest.approx(0.1) and wsd[85] < 1.0  # stable, then decay
    with pytest.raises(ValueError, match="unknown schedule"):
        learning_rate(20, 100, 1.0, 10, "linear", 0.1, 0.2)


def test_bf16_autocast_and_z_loss_train(data_run, tmp_path):
    cfg = _cfg(max_steps=3, checkpoint_every=3, eval_every=3, precision="bf16", z_loss=1e-4, schedule="wsd")
    pretrain(cfg, TINY, _paths(data_run, tmp_path))
    m = _metrics(tmp_path)
    assert len(m) == 3 and all(0 < r["loss"] < 10 for r in m) and m[-1]["val_bpb"] > 0


def test_compiled_model_trains_to_the_same_losses(data_run, tmp_path):
    """pretrain.compile = true (torch.compile with inductor) trains the same model as eager mode."""
    cfg = dict(max_steps=3, checkpoint_every=3, eval_every=3)
    pretrain(_cfg(**cfg), TINY, _paths(data_run, tmp_path / "eager"))
    pretrain(_cfg(compile=True, **cfg), TINY, _paths(data_run, tmp_path / "compiled"))
    eager, compiled = _metrics(tmp_path / "eager"), _metrics(tmp_path / "compiled")
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], abs=1e-4)
    assert compiled[-1]["val_bpb"] == pytest.approx(eager[-1]["val_bpb"], abs=1e-4)


def test_compiling_leaves_the_rotary_embedding_eager_except_under_peft():
    """compile: true computes cos/sin once a pass (not in every layer's kernels); a peft model keeps
    its rotary embedding in the graph, where a break would send the whole adapted forward to eager."""
    import torch
    from peft import LoraConfig, get_peft_model

    from trulyopen.model.build import from_preset
    from trulyopen.model.presets import SIZES
    from trulyopen.train.compiled import compile_for_training

    def rotary(m):
        return next(x for x in m.modules() if type(x).__name__.endswith("RotaryEmbedding"))

    model = from_preset("llama", SIZES["tiny"], vocab=400, max_len=64, seed=0)
    compiled = compile_for_training(model, model)
    assert "forward" in vars(rotary(model)) and getattr(rotary(model).forward, "_torchdynamo_disable", False)
    x = torch.randint(0, 400, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(compiled(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5)
    base = from_preset("llama", SIZES["tiny"], vocab=400, max_len=64, seed=0)
    adapted = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    compile_for_training(adapted, adapted)
    assert "forward" not in vars(rotary(adapted))
