"""Evaluation task files with images, run on tiny vision-language models of two families.

The scores are checked against an independent computation: a choice's log-probability against
transformers' own loss on the same processor inputs, and a generated answer against a greedy loop of
plain forward passes. A task whose images change gives different scores (the images are seen).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.tiny_vlm import FAMILIES, shape_image, tiny_vlm_dir

COLOURS = ["red", "green", "blue"]


def _task_files(d: Path) -> Path:
    """An image folder, a multiple-choice and a generation task file, and a suite naming both."""
    (d / "img").mkdir(parents=True)
    for c in COLOURS:
        shape_image(c).save(d / "img" / f"{c}.png")
    mc = [
        {
            "id": c,
            "context": "What colour is the shape? The shape is",
            "choices": COLOURS,
            "answer": i,
            "images": [f"img/{c}.png"],
        }
        for i, c in enumerate(COLOURS)
    ]
    gen = [
        {
            "id": c,
            "prompt": "What colour is the shape?",
            "verifier": {"type": "exact", "answer": c},
            "images": [f"img/{c}.png"],
        }
        for c in COLOURS
    ]
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (d / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    suite = [
        {"name": "colour_mc", "path": "mc.jsonl", "type": "multiple_choice"},
        {"name": "colour_gen", "path": "gen.jsonl", "type": "generation", "max_new_tokens": 6},
    ]
    (d / "suite.yaml").write_text(json.dumps(suite))
    return d / "suite.yaml"


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return _task_files(tmp_path_factory.mktemp("vlm_tasks"))


def _hf_logprob(model, processor, prompt: str, choice: str, image) -> float:
    """log p(choice | prompt, image) from transformers' loss, labels on the choice's tokens only."""
    n_prompt = processor(text=[prompt], images=[[image]], return_tensors="pt")["input_ids"].shape[1]
    enc = processor(text=[prompt + choice], images=[[image]], return_tensors="pt")
    labels = enc["input_ids"].clone()
    labels[:, :n_prompt] = -100
    with torch.no_grad():
        loss = model(**enc, labels=labels).loss  # mean over the choice's tokens
    return -float(loss) * (enc["input_ids"].shape[1] - n_prompt)


def _greedy(model, processor, prompt: str, image, n: int) -> str:
    """n greedy tokens by plain forward passes over the whole sequence (no cache, no generate())."""
    enc = processor(text=[prompt], images=[[image]], return_tensors="pt")
    ids, start = enc["input_ids"], enc["input_ids"].shape[1]
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    eos = processor.tokenizer.eos_token_id
    with torch.no_grad():
        for _ in range(n):
            if "mm_token_type_ids" in enc:  # Qwen2-VL: which tokens are image tokens (new ones: text)
                extra["mm_token_type_ids"] = torch.zeros_like(ids)
                extra["mm_token_type_ids"][:, :start] = enc["mm_token_type_ids"]
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits
            nxt = logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if int(nxt) == eos:
                break
    return processor.tokenizer.decode(ids[0, start:], skip_special_tokens=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_image_tasks_score_as_transformers_does(family: str, tasks: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from trulyopen.cli import app
    from trulyopen.evaluate import models
    from trulyopen.evaluate.generation import ANSWER_STOPS, _cut
    from trulyopen.evaluate.vision import user_prompt
    from trulyopen.vlm.images import load_image

    model_dir = tiny_vlm_dir(tmp_path, family)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", str(model_dir), "--tasks", str(tasks), "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"]["colour_mc"]["metrics"]["acc"]["n"] == 3
    assert results["tasks"]["colour_gen"]["metrics"]["score"]["n"] == 3

    em = models.load(model_dir)
    assert em.processor is not None
    mc = [json.loads(x) for x in (out / "colour_mc.instances.jsonl").read_text().splitlines()]
    for rec in mc:
        image = load_image(rec["images"][0])
        prompt = rec["cloze"]["prompt"]
        assert "What colour is the shape?" in prompt
        want = [_hf_logprob(em.model, em.processor, prompt, " " + c, image) for c in COLOURS]
        assert rec["cloze"]["logprobs"] == pytest.approx(want, abs=1e-4)
    # the images are seen: the same text with another image scores differently
    assert mc[0]["cloze"]["logprobs"] != pytest.approx(mc[1]["cloze"]["logprobs"], abs=1e-6)

    gen = [json.loads(x) for x in (out / "colour_gen.instances.jsonl").read_text().splitlines()]
    for rec in gen:
        image = load_image(rec["images"][0])
        prompt = user_prompt(em.processor, rec["prompt"], 1)
        want = _cut(_greedy(em.model, em.processor, prompt, image, 6), ANSWER_STOPS).strip()
        assert rec["prediction"] == want
        assert rec["score"] == float(want == rec["id"])


def test_bad_images_and_text_models_are_named(tasks: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from trulyopen.cli import app

    d = tmp_path / "bad"
    d.mkdir()
    (d / "not_an_image.png").write_text("hello")
    rows = [
        {"context": "a", "choices": ["x", "y"], "answer": 0, "images": ["missing.png"]},
        {"context": "a", "choices": ["x", "y"], "answer": 0, "images": ["not_an_image.png"]},
    ]
    for i, row in enumerate(rows):
        (d / f"t{i}.jsonl").write_text(
            json.dumps({"id": "one", "context": "q", "choices": ["x", "y"], "answer": 0})
            + "\n"
            + json.dumps(row)
            + "\n"
        )
        (d / f"s{i}.yaml").write_text(
            json.dumps([{"name": "t", "path": f"t{i}.jsonl", "type": "multiple_choice"}])
        )
        result = CliRunner().invoke(
            app, ["eval", str(tiny_vlm_dir(tmp_path, "llava")), "--tasks", str(d / f"s{i}.yaml")]
        )
        assert result.exit_code == 2, result.output
        assert f"t{i}.jsonl:2" in result.output
        assert ("no such image file" if i == 0 else "not an image") in result.output

    # a text-only model asked to evaluate images: one line naming the task and the model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_vlm import tiny_tokenizer

    tok = tiny_tokenizer("llava")
    text_dir = tmp_path / "text_model"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    ).save_pretrained(str(text_dir))
    tok.save_pretrained(str(text_dir))
    result = CliRunner().invoke(app, ["eval", str(text_dir), "--tasks", str(tasks)])
    assert result.exit_code == 2, result.output
    assert "has images" in result.output and "text-only model" in result.output
