"""Training in bf16 at the machine's speed: fp32 master weights (resume stays bit-exact), the CPU's
matmul attention and the blockwise cross-entropy, each against the plain computation."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from trulyopen import pipeline
from trulyopen.finetune.stage import FinetunePaths, finetune
from trulyopen.recipe import FinetuneConfig, ModelConfig, PretrainConfig, load_recipe
from trulyopen.train import cpu_attention
from trulyopen.train.attention import segment_attention
from trulyopen.train.objectives.causal_lm import lm_loss
from trulyopen.train.precision import MasterWeights
from trulyopen.train.pretrain import Paths, pretrain

from .conftest import build_corpus, tiny_llama_config, write_recipe


@pytest.fixture(scope="module")
def data_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bf16")
    recipe = write_recipe(tmp, build_corpus(tmp), shards__shard_tokens=100_000)
    return pipeline.run(load_recipe(recipe), tmp / "run", workers=1)


def _killed_and_resumed(run, monkeypatch, at: int):
    """`run(dir)` whole, then killed as step `at` begins and run again: (whole's, resumed's) final dirs."""
    import trulyopen.train.loop as loop

    whole = run("whole")
    real = loop.learning_rate

    def dying(step, *a):
        if step == at:
            raise KeyboardInterrupt("killed")
        return real(step, *a)

    monkeypatch.setattr(loop, "learning_rate", dying)
    with pytest.raises(KeyboardInterrupt):
        run("killed")
    monkeypatch.setattr(loop, "learning_rate", real)
    return whole, run("killed")


def test_bf16_pretraining_keeps_fp32_masters_and_resumes_to_identical_bits(data_run, tmp_path, monkeypatch):
    cfg = PretrainConfig(
        seq_len=64,
        global_batch_tokens=512,
        micro_batch_size=2,  # 4 micro-batches: gradients summed in fp32 across them
        max_steps=8,
        warmup_steps=2,
        eval_every=4,
        eval_sequences=4,
        checkpoint_every=4,
        precision="bf16",
    )
    shards, tok = data_run / "data" / "shards", data_run / "tokenizer"

    def run(name):
        return pretrain(cfg, ModelConfig(arch="llama", size="tiny"), Paths(tmp_path / name, shards, tok))

    whole, resumed = _killed_and_resumed(run, monkeypatch, at=6)
    for name in ("model.safetensors", "optimizer.pt"):
        assert (resumed / name).read_bytes() == (whole / name).read_bytes()
    weights = load_file(str(whole / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}  # masters, not the bf16 copies
    lines = [
        json.loads(x) for x in (tmp_path / "whole" / "pretrain" / "metrics.jsonl").read_text().splitlines()
    ]
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.5 and lines[-1]["val_bpb"] > 0


def test_lora_and_qlora_train_in_bf16_and_lora_resumes_to_identical_bits(data_run, tmp_path, monkeypatch):
    records = [
        {
            "id": f"r{i}",
            "messages": [
                {"role": "user", "content": f"colour {i % 5}?"},
                {"role": "assistant", "content": c},
            ],
        }
        for i, c in enumerate(["red", "green", "blue", "white", "black"] * 6)
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))

    def cfg(adapter: str) -> FinetuneConfig:
        return FinetuneConfig(
            method="sft",
            adapter=adapter,
            data=[{"path": str(data)}],
            seq_len=64,
            batch_size=4,
            micro_batch_size=2,
            max_steps=6,
            lr=1e-2,
            warmup_steps=1,
            eval_every=6,
            checkpoint_every=3,
            precision="bf16",
            val_fraction=0.0,
        )

    def run(name, adapter="lora"):
        paths = FinetunePaths(tmp_path / name)
        (paths.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        link = paths.run_dir / "checkpoints" / "pretrain"
        if not link.exists():
            link.symlink_to(data_run / "checkpoints" / "pretrain")
            (paths.run_dir / "tokenizer").symlink_to(data_run / "tokenizer")
        return finetune(cfg(adapter), paths)

    whole, resumed = _killed_and_resumed(run, monkeypatch, at=4)
    for name in ("adapter.safetensors", "optimizer.pt"):
        assert (resumed / name).read_bytes() == (whole / name).read_bytes()
    assert {w.dtype for w in load_file(str(whole / "adapter.safetensors")).values()} == {torch.float32}
    run("qlora", "qlora")
    for name in ("whole", "qlora"):
        losses = [
            json.loads(x)["loss"]
            for x in (tmp_path / name / "finetune" / "metrics.jsonl").read_text().splitlines()
        ]
        assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0], (name, losses)


def test_master_weights_compute_in_bf16_and_sum_gradients_in_fp32():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(50))
    model.model.embed_tokens.weight.requires_grad_(False)  # a frozen parameter, as a LoRA base
    masters = MasterWeights(model)
    ids = torch.randint(0, 50, (4, 12))
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    with masters.computing():
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        for half in ids.split(2):
            out = model(input_ids=half, labels=half)
            grads = torch.autograd.grad(
                out.loss, [p for p in model.parameters() if p.requires_grad], retain_graph=True
            )
            for (name, _), g in zip(
                ((n, p) for n, p in model.named_parameters() if p.requires_grad), grads, strict=True
            ):
                expected[name] += g.float()
            out.loss.backward()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.model.embed_tokens.weight.grad is None
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad.dtype == torch.float32 and torch.equal(p.grad, expected[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "documents"])
def test_matmul_attention_equals_sdpa(dtype, masked):
    class Heads(torch.nn.Module):
        num_key_value_groups, is_causal = 2, True  # grouped-query: 4 query heads on 2 key-value heads

    torch.manual_seed(0)
    q = torch.randn(2, 4, 16, 8, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 2, 16, 8, dtype=dtype, requires_grad=True) for _ in range(2))
    mask = segment_attention(torch.tensor([[0] * 5 + [1] * 11, [0] * 16]))[0] if masked else None
    out, _ = cpu_attention.matmul_attention(Heads(), q, k, v, mask)
    g = torch.randn_like(out)
    ref = F.scaled_dot_product_attention(
        *(x.float() for x in (q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))),
        attn_mask=mask,
        is_causal=mask is None,
    ).transpose(1, 2)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert torch.allclose(out.float(), ref, atol=tol)
    for ours, theirs in zip(
        torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g.float()), strict=True
    ):
        assert torch.allclose(ours.float(), theirs.float(), atol=tol)


def test_matmul_attention_only_inside_the_training_window():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(50))
    assert model.config._attn_implementation == "sdpa"
    cpu = torch.device("cpu")
    with cpu_attention.for_training(model, cpu, torch.bfloat16):
        assert model.config._attn_implementation == cpu_attention.NAME
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = model(input_ids=torch.arange(10)[None]).logits
    with cpu_attention.for_training(model, cpu, torch.float32):  # fp32: SDPA's kernel is as fast
        assert model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "sdpa"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outside = model(input_ids=torch.arange(10)[None]).logits
    assert torch.allclose(inside.float(), outside.float(), atol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blockwise_cross_entropy_equals_torch(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(3, 40, 300) * 4).to(dtype).requires_grad_()  # 120 rows: blocks of 32 and a rest
    targets = torch.randint(0, 300, (3, 40))
    for z in (0.0, 1e-2):
        loss, ce = lm_loss(logits, targets, z)
        ours = torch.autograd.grad(loss, logits)[0]
        x = logits.detach().float().requires_grad_()
        ref_ce = F.cross_entropy(x.flatten(0, 1), targets.flatten())
        ref = ref_ce + z * torch.logsumexp(x.flatten(0, 1), -1).pow(2).mean()
        assert ce.item() == pytest.approx(ref_ce.item(), abs=1e-5) and loss.item() == pytest.approx(
            ref.item(), abs=1e-5
        )
        assert torch.allclose(
            ours.float(), torch.autograd.grad(ref, x)[0], atol=1e-6 if dtype == torch.float32 else 1e-4
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_dropout_drops_at_rate_p_keeps_the_mean_and_follows_torch_seed(dtype):
    from trulyopen.train.cpu_dropout import FastDropout, install

    drop = FastDropout(0.1).train()
    x = torch.randn(400, 500, dtype=dtype, requires_grad=True)
    torch.manual_seed(5)
    y = drop(x)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.1) < 0.005  # 200,000 draws: 4 standard deviations
    assert torch.allclose(y[kept].float(), x[kept].float() / 0.9, rtol=1e-2)  # bf16 rounds the scaled value
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g != 0, kept)  # the gradient flows where the unit was kept, scaled alike
    torch.manual_seed(5)
    assert torch.equal(drop(x), y)  # the mask is a function of torch's RNG state (which checkpoints hold)
    # compiled, the same mask (an opaque op: inductor's own generator draws one element at a time)
    torch.manual_seed(5)
    assert torch.equal(torch.compile(drop, fullgraph=True)(x), y)
    assert torch.equal(drop.eval()(x), x)

    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(50, attention_dropout=0.0))
    model.model.extra = torch.nn.ModuleDict({"default": torch.nn.Dropout(0.05)})
    assert install(model) == 1 and type(model.model.extra["default"]) is FastDropout
