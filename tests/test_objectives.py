"""The post-training objectives beyond SFT/DPO/GRPO, on the one loop, with a tiny model: each learns
on a toy task (its loss falls, its margin grows), and the pieces around them work: KTO on pairs and
on unpaired records, a reward model used as a GRPO reward, distillation from a teacher (and the
refusal of a teacher with another tokenizer), on-policy distillation, GRPO's variants and its
Python tool environment, whose output is masked out of the loss. The losses themselves are checked
against TRL in test_losses.py."""

import json

import pytest
import torch

from trulyopen.finetune.stage import FinetunePaths, finetune
from trulyopen.recipe import FinetuneConfig, TokenizerConfig
from trulyopen.train import TrainingError

from .conftest import tiny_llama_config

COLORS = {"alpha": "red", "beta": "green", "gamma": "blue", "delta": "white", "omega": "black"}
CALL = '<tool_call>{"name": "python", "arguments": {"code": "print(6*7)"}}</tool_call>'


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_base(out, vocab: int, seed: int):
    """A tiny Llama over a small BPE tokenizer with our chat template, as a Hugging Face directory."""
    from transformers import LlamaForCausalLM

    from trulyopen.data.tokenizer import save_hf, train_tokenizer
    from trulyopen.model.export import export_hf

    texts = [f"colour of {w}? {c} no idea I do not know {CALL} 42" for w, c in COLORS.items()]
    tok = train_tokenizer(iter(texts * 20), TokenizerConfig(vocab_size=vocab))
    save_hf(tok, out / "tok")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tok.get_vocab_size(), max_position_embeddings=256))
    return export_hf(model, out / "tok", out / "model")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base"), 400, seed=0)


def pairs(path, n=30):
    rows = []
    for i in range(n):
        w = list(COLORS)[i % len(COLORS)]
        rows.append({"id": f"p{i}", "prompt": f"colour of {w}?", "chosen": COLORS[w], "rejected": "no idea"})
    return write_jsonl(path, rows)


def chats(path, n=30):
    rows = []
    for i in range(n):
        w = list(COLORS)[i % len(COLORS)]
        msgs = [{"role": "user", "content": f"colour of {w}?"}, {"role": "assistant", "content": COLORS[w]}]
        rows.append({"id": f"c{i}", "messages": msgs})
    return write_jsonl(path, rows)


def cfg(base, data, method, **kw) -> FinetuneConfig:
    settings = dict(
        method=method,
        base=str(base),
        data=[{"path": str(data)}],
        seq_len=64,
        batch_size=6,
        micro_batch_size=3,
        max_steps=12,
        lr=3e-3,
        warmup_steps=1,
        eval_every=12,
        checkpoint_every=12,
        precision="fp32",
        val_fraction=0.0,
    )
    return FinetuneConfig(**{**settings, **kw})


def metrics(run):
    return [json.loads(x) for x in (run / "finetune" / "metrics.jsonl").read_text().splitlines()]


def early_late(rows, key):
    return sum(r[key] for r in rows[:3]) / 3, sum(r[key] for r in rows[-3:]) / 3


@pytest.mark.parametrize("method", ["orpo", "simpo", "kto", "reward"])
def test_preference_methods_learn_the_preferred_reply(base, tmp_path, method):
    finetune(cfg(base, pairs(tmp_path / "pairs.jsonl"), method), FinetunePaths(tmp_path / "run"))
    rows = metrics(tmp_path / "run")
    assert len(rows) == 12 and all(r["loss"] == r["loss"] for r in rows)
    first, last = early_late(rows, "loss")
    assert last < first, (method, first, last)
    if method in ("simpo", "reward"):
        assert early_late(rows, "reward_margin")[1] > early_late(rows, "reward_margin")[0]


def test_kto_reads_unpaired_records_and_pairs_alike(base, tmp_path):
    unpaired = [
        {"prompt": f"colour of {w}?", "completion": c if good else "no idea", "label": good}
        for w, c in COLORS.items()
        for good in (True, False)
    ]
    data = write_jsonl(
        tmp_path / "kto.jsonl", [*unpaired, {"prompt": "x", "completion": "y", "label": "yes"}]
    )
    finetune(
        cfg(base, data, "kto", max_steps=4, eval_every=4, checkpoint_every=4), FinetunePaths(tmp_path / "r")
    )
    records = json.loads((tmp_path / "r" / "finetune" / "records.json").read_text())
    assert records["train"] == 10 and records["bad"][0]["reason"].startswith("label must be true or false")
    rows = metrics(tmp_path / "r")
    assert {"reward_desirable", "reward_undesirable", "kl"} <= set(rows[0])


def test_a_trained_reward_model_scores_grpo_completions(base, tmp_path):
    """The reward model's checkpoint scores sequences; as a GRPO reward it adds to the verifier's."""
    from trulyopen.train.objectives.reward import RewardScorer

    rm = finetune(
        cfg(base, pairs(tmp_path / "pairs.jsonl"), "reward", max_steps=16), FinetunePaths(tmp_path / "rm")
    )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    scorer = RewardScorer(rm, torch.device("cpu"), tok.pad_token_id)
    good = tok.apply_chat_template(
        [{"role": "user", "content": "colour of alpha?"}, {"role": "assistant", "content": "red"}],
        tokenize=False,
    )
    bad = good.replace("red", "no idea")
    scores = scorer([tok(t, add_special_tokens=False)["input_ids"] for t in (good, bad)])
    assert scores[0] > scores[1]
    from trulyopen.train.checkpoint import load_for_inference

    with pytest.raises(TrainingError, match="a reward model .* use it as finetune.grpo.reward_model"):
        load_for_inference(rm)  # what generate, serve and export load: not a writer of text

    prompts = [{"prompt": f"colour of {w}?", "verifier": {"type": "regex", "pattern": "^$"}} for w in COLORS]
    data = write_jsonl(tmp_path / "grpo.jsonl", prompts)
    grpo = {"group_size": 4, "max_new_tokens": 4, "reward_model": str(rm), "reward_model_weight": 1.0}
    finetune(
        cfg(base, data, "grpo", batch_size=2, micro_batch_size=4, max_steps=2, grpo=grpo),
        FinetunePaths(tmp_path / "g"),
    )
    rows = metrics(tmp_path / "g")
    assert all(r["reward"] != 0.0 for r in rows)  # the regex never matches: all reward is the model's


def test_distillation_pulls_the_student_towards_the_teacher(base, tmp_path):
    teacher = make_base(tmp_path / "teacher", 400, seed=1)  # same tokenizer, other weights
    data = chats(tmp_path / "chats.jsonl")
    finetune(cfg(base, data, "distill", distill={"teacher": str(teacher)}), FinetunePaths(tmp_path / "kd"))
    first, last = early_late(metrics(tmp_path / "kd"), "loss")
    assert last < 0.5 * first
    # on-policy (GKD): every step on the student's own samples, JSD halfway
    on = cfg(
        base,
        data,
        "distill",
        max_steps=3,
        distill={"teacher": str(teacher), "lmbda": 1.0, "beta": 0.5, "max_new_tokens": 8},
    )
    finetune(on, FinetunePaths(tmp_path / "gkd"))
    assert [r["on_policy"] for r in metrics(tmp_path / "gkd")] == [1.0, 1.0, 1.0]


def test_a_teacher_with_another_tokenizer_is_refused(base, tmp_path):
    other = make_base(tmp_path / "other", 300, seed=1)
    data = chats(tmp_path / "chats.jsonl")
    with pytest.raises(TrainingError, match=r"distill.teacher: .* has another tokenizer than the student"):
        finetune(cfg(base, data, "distill", distill={"teacher": str(other)}), FinetunePaths(tmp_path / "kd"))


@pytest.mark.parametrize(
    "variant",
    [
        {"loss_type": "dr_grpo", "scale_rewards": "none"},
        {"loss_type": "dapo", "epsilon_high": 0.28, "dynamic_sampling": True, "updates_per_batch": 2},
        {"loss_type": "grpo", "scale_rewards": "batch", "kl_coef": 0.1},
    ],
)
def test_grpo_variants_train(base, tmp_path, variant):
    prompts = [{"prompt": f"colour of {w}?", "verifier": {"type": "regex", "pattern": "r"}} for w in COLORS]
    data = write_jsonl(tmp_path / "grpo.jsonl", prompts)
    grpo = {"group_size": 4, "max_new_tokens": 6, "temperature": 1.5, **variant}
    c = cfg(base, data, "grpo", batch_size=2, micro_batch_size=4, max_steps=4, checkpoint_every=4, grpo=grpo)
    finetune(c, FinetunePaths(tmp_path / "run"))
    rows = metrics(tmp_path / "run")
    assert len(rows) == 4 and all(r["loss"] == r["loss"] for r in rows)
    if variant.get("dynamic_sampling"):
        assert all("dropped_groups" in r for r in rows)


def test_tool_environment_runs_python_and_masks_its_output(base, tmp_path):
    """A model taught to answer with a python call: the rollout runs it in the sandbox, appends the
    tool turn with its output, and lets the model go on; the output's tokens get no loss."""
    from transformers import AutoTokenizer

    from trulyopen.finetune.render import ChatRenderer
    from trulyopen.infer.sampling import SamplingParams
    from trulyopen.rewards.verifiers import parse_verifier
    from trulyopen.train.objectives.grpo import GRPO, Prompt
    from trulyopen.train.packing import IGNORE

    call = CALL
    rows = [
        {"messages": [{"role": "user", "content": "compute"}, {"role": "assistant", "content": call}]}
    ] * 8
    sft = cfg(
        base,
        write_jsonl(tmp_path / "sft.jsonl", rows),
        "sft",
        seq_len=200,
        max_steps=50,
        lr=1e-2,
        schedule="constant",
        checkpoint_every=50,
    )
    taught = finetune(sft, FinetunePaths(tmp_path / "sft"))
    from trulyopen.train.checkpoint import load_for_inference

    model = load_for_inference(taught)
    tok = AutoTokenizer.from_pretrained(str(base))
    renderer = ChatRenderer(tok)
    gcfg = cfg(
        base,
        tmp_path / "unused.jsonl",
        "grpo",
        seq_len=250,
        grpo={"tools": True, "max_new_tokens": 40, "max_tool_calls": 1, "group_size": 2},
    )
    prompt = Prompt(
        renderer.prompt([{"role": "user", "content": "compute"}]),
        parse_verifier({"type": "regex", "pattern": "42"}),
    )
    grpo = GRPO(
        gcfg,
        [prompt],
        [],
        tok.decode,
        renderer.stop_ids(),
        tok.pad_token_id,
        None,
        tool_turn=renderer.tool_turn,
    )
    greedy = SamplingParams(
        max_new_tokens=40, temperature=0.0, stop_ids=renderer.stop_ids(), stop_strings=("</tool_call>",)
    )
    [r] = grpo.rollout(model, [prompt], greedy, seed=0)
    assert r.tool_calls == 1, tok.decode(r.tokens)
    text = tok.decode(r.tokens)
    assert call in text and "<|tool|>\n42\n" in text
    masked = tok.decode([t for t, tr in zip(r.tokens, r.trained, strict=True) if not tr])
    assert "42" in masked and "<|tool|>" in masked and "print" not in masked
    sb = grpo.batch(0, model)  # the batch's targets leave the tool turn out
    targets = sb.micros[0].batch.targets[0]
    trained = tok.decode([int(t) for t in targets if t != IGNORE])
    assert "print(6*7)" in trained and "<|tool|>" not in trained
