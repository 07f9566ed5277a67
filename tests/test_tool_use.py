"""Tool use end to end at toy size: the synth stage's tool conversations, fine-tuning on them, and
the built-in tool_call tasks on questions held out of training, for the base and the tuned model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from trulyopen import pipeline
from trulyopen.recipe import load_recipe

from .conftest import make_doc, write_recipe

# Twelve small documented functions, each called six times in its module's main block: the tuned
# model must learn the call format and which tool a question asks for.
FUNCTIONS = [
    ("add_numbers", "a, b", "Return the sum of the two numbers a and b.", "a + b"),
    ("multiply", "a, b", "Return the product of the two numbers a and b.", "a * b"),
    ("maximum", "a, b", "Return the larger of the two numbers a and b.", "max(a, b)"),
    ("shout", "text", "Return the text in capital letters.", "text.upper()"),
    ("whisper", "text", "Return the text in small letters.", "text.lower()"),
    ("reverse", "text", "Return the text written backwards.", "text[::-1]"),
    ("count_vowels", "text", "Count the vowels in the text.", 'sum(c in "aeiou" for c in text)'),
    ("word_count", "text", "Count the words in the text.", "len(text.split())"),
    ("first_word", "text", "Return the first word of the text.", "text.split()[0]"),
    ("square", "x", "Return the square of the number x.", "x * x"),
    ("halve", "x", "Return half of the number x.", "x / 2"),
    ("is_even", "x", "Tell whether the number x is even.", "x % 2 == 0"),
]
ARGUMENTS = {
    "a, b": ["1, 2", "10, 5", "-3, 3", "7, 8", "4, 4", "9, -2"],
    "text": ['"hi there"', '"Tool Use"', '"level up"', '"banana"', '"a b c"', '"Open Models"'],
    "x": ["3", "12", "-4", "7", "100", "0"],
}


def module(functions: list[tuple]) -> str:
    out, calls = ['"""Small functions."""\n'], []
    for name, params, doc, body in functions:
        out.append(f'\ndef {name}({params}):\n    """{doc}"""\n    return {body}\n')
        calls += [f"    print({name}({e}))" for e in ARGUMENTS[params]]
    return "\n".join(out) + '\n\nif __name__ == "__main__":\n' + "\n".join(calls) + "\n"


def test_finetuning_on_tool_conversations_calls_the_right_tool_more_often_than_the_base(tmp_path: Path):
    """The whole run at toy size: synth makes tool conversations from the corpus's functions, SFT
    trains on them, and the eval stage asks both models questions that were held out of training.
    The tuned model calls the right tool more often than its base; both rates are printed, and those
    for tools held out altogether (which a model this small does not generalise to) as well."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(0, len(FUNCTIONS), 4):
        (src / f"tools_{i // 4}.py").write_text(module(FUNCTIONS[i : i + 4]))
    rng = random.Random(0)
    for i in range(8):  # code without tools, so pretraining has a batch to read
        (src / f"filler_{i}.py").write_text(make_doc(rng))
    (tmp_path / "evals.jsonl").write_text(json.dumps({"text": "nothing in common"}) + "\n")
    recipe = write_recipe(
        tmp_path,
        {"root": src, "evals": tmp_path / "evals.jsonl"},
        data__split__val_fraction=0.0,  # the held-out questions come from synth, not from a split
        tokenizer__vocab_size=1500,
        shards__shard_tokens=20_000,
        model__hidden_size=128,
        pretrain__seq_len=512,
        pretrain__global_batch_tokens=2048,
        pretrain__max_steps=30,
        pretrain__eval_every=30,
        pretrain__checkpoint_every=30,
        pretrain__lr=3e-3,
        synth={"kinds": ["tools"], "tools_per_example": 2, "tools_heldout": 0.25},
        finetune={
            "method": "sft",
            "seq_len": 512,
            "batch_size": 2,
            "micro_batch_size": 2,
            "max_steps": 300,
            "lr": 2e-3,
            "warmup_steps": 5,
            "eval_every": 300,
            "checkpoint_every": 300,
            "precision": "fp32",
        },
        eval={"models": ["pretrain", "finetune"], "contamination": False},
    )
    # one thread: this small model's steps are too short to share two cores with the test beside it
    # (two threads each, on two cores, made it five times slower in the parallel suite)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = pipeline.run(load_recipe(recipe), tmp_path / "run", workers=1)
    finally:
        torch.set_num_threads(threads)
    rates = {}
    for stage in ("pretrain", "finetune"):
        tasks = json.loads((run / "eval" / stage / "results.json").read_text())["tasks"]
        for task in ("tool_call", "tool_call_new_tools"):
            rates[stage, task] = {k: round(m["value"], 3) for k, m in tasks[task]["metrics"].items()}
            print(stage, task, rates[stage, task], "n =", tasks[task]["metrics"]["right_tool"]["n"])
    assert rates["finetune", "tool_call"]["right_tool"] > rates["pretrain", "tool_call"]["right_tool"]
    assert rates["finetune", "tool_call"]["called"] > rates["pretrain", "tool_call"]["called"]
