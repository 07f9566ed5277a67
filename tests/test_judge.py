"""Judges: parsing verdicts, the rubric / reference / pairwise judges (position swapping), the eval
`judge` task end to end (a tiny model answers, a fake OpenAI-compatible judge on loopback scores),
and synth's judge filtering through the rubric judge with another provider."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from trulyopen import judge
from trulyopen.recipe import RemoteModelConfig
from trulyopen.synth.remote import remote_step

from .conftest import tiny_llama
from .fake_api import Reply, fake_api, openai_reply

KEY_ENV = "TRULYOPEN_TEST_JUDGE_KEY"
SECRET = "sk-judge-very-secret-0123456789"

# ----------------------------------------------------------------------------- parsing


def test_scores_are_read_however_the_judge_phrases_them() -> None:
    said = {
        "7": 7,
        " 10\n": 10,
        "6.": 6,
        "**8**": 8,
        "[[7]]": 7,
        "Rating: 8/10": 8,
        "I'd give it 9 out of 10": 9,
        "Score: 6": 6,
        "First, 3 checks pass. Second, the style is fine. Score: 9": 9,
        "The answer is fine, 8.": 8,
        "7.5": 7.5,
    }
    assert {reply: judge.parse_score(reply) for reply in said} == said
    for unreadable in ("great!", "0", "42", "-3", "between 3 and 5", ""):
        assert judge.parse_score(unreadable) is None, unreadable
    assert judge.parse_score("4", scale=3) is None and judge.parse_score("3/3", scale=3) == 3

    verdicts = {"Yes.": True, "no": False, "[[yes]]": True, "Correct!": True, "Incorrect.": False}
    verdicts |= {"The answer is correct.": True, "The answer is not correct": False, "Verdict: no": False}
    assert {reply: judge.parse_verdict(reply) for reply in verdicts} == verdicts
    assert judge.parse_verdict("maybe") is None and judge.parse_verdict("") is None

    preferences = {"[[A]]": "A", "[[C]]": "tie", "B.": "B", "Verdict: tie": "tie", "[[b]]": "B"}
    preferences |= {
        "Answer A is better.": "A",
        "The better answer is B": "B",
        "Looking at both... [[A]]": "A",
    }
    assert {reply: judge.parse_preference(reply) for reply in preferences} == preferences
    assert judge.parse_preference("both are fine") is None


# ----------------------------------------------------------------------------- the judges


def test_rubric_and_reference_judges_fill_their_prompts_and_count_unreadable_replies() -> None:
    asked: list[tuple[str, str]] = []

    def ask(system: str, prompt: str) -> str:
        asked.append((system, prompt))
        return "Score: 4/5" if "Paris" in prompt else "hmm"

    s = judge.rubric(ask, "Capital of France?", "Paris", rubric="accuracy", scale=5)
    assert (s.value, s.reply) == (4, "Score: 4/5")
    system, prompt = asked[0]
    assert system == judge.RUBRIC.system
    assert (
        "from 1 to 5 for accuracy" in prompt and "Capital of France?" in prompt and prompt.endswith("Paris")
    )
    assert judge.rubric(ask, "Capital of Spain?", "Madrid").value is None  # counted by callers, no crash

    def grader(system: str, prompt: str) -> str:
        answer = prompt.rsplit("## Answer\n\n", 1)[1]
        reference = prompt.split("## Reference answer\n\n", 1)[1].split("\n\n")[0]
        return "yes" if answer.strip().lower() == reference.lower() else "No, it is not."

    assert judge.reference(grader, "2+2?", "4", "4").value == 1.0
    assert judge.reference(grader, "2+2?", "5", "4").value == 0.0
    scored = judge.reference(lambda s, p: "3" if "from 1 to 5" in p else "?", "q", "a", "r", scale=5)
    assert scored.value == 3


def test_pairwise_swaps_positions_so_a_position_biased_judge_gives_ties() -> None:
    asked: list[str] = []

    def always_first(system: str, prompt: str) -> str:
        asked.append(prompt)
        return "[[A]]"

    v = judge.pairwise(always_first, "Which?", "mine", "theirs")
    assert (v.first, v.second, v.outcome, v.consistent, v.value) == ("A", "A", "tie", False, 0.5)
    a1, b1 = re.findall(r"## Answer [AB]\n\n(\w+)", asked[0])
    a2, b2 = re.findall(r"## Answer [AB]\n\n(\w+)", asked[1])
    assert (a1, b1, a2, b2) == ("mine", "theirs", "theirs", "mine")

    def fair(system: str, prompt: str) -> str:  # prefers the answer that says "right", wherever it is
        a, b = re.findall(r"## Answer [AB]\n\n(\w+)", prompt)
        return "[[A]]" if a == "right" else "[[B]]" if b == "right" else "[[C]]"

    assert judge.pairwise(fair, "q", "right", "wrong").outcome == "win"
    loss = judge.pairwise(fair, "q", "wrong", "right")
    assert (loss.outcome, loss.value, loss.consistent) == ("loss", 0.0, True)
    tie = judge.pairwise(fair, "q", "meh", "bleh")
    assert (tie.outcome, tie.consistent) == ("tie", True)
    unread = judge.pairwise(lambda s, p: "they are both nice", "q", "right", "wrong")
    assert (unread.outcome, unread.consistent, unread.value) == (None, None, None)


def test_prompts_can_be_replaced_but_not_with_unknown_fields() -> None:
    mine = judge.custom(judge.RUBRIC, "rubric", system="Be harsh.", template="{answer} ({scale} max)")
    s = judge.rubric(lambda system, prompt: f"{system} {prompt}", "q", "5", scale=10, prompt=mine)
    assert s.reply == "Be harsh. 5 (10 max)" and s.value is None  # two numbers, no sign which
    with pytest.raises(judge.JudgeError, match=r"unknown field\(s\) \{anwser\}"):
        judge.custom(judge.RUBRIC, "rubric", template="Rate {anwser}")
    with pytest.raises(judge.JudgeError, match=r"lacks \{answer_b\}"):
        judge.check_template("{answer_a}", "pairwise")
    with pytest.raises(judge.JudgeError, match="write a literal brace twice"):
        judge.check_template("{answer} {", "rubric")


# ----------------------------------------------------------------------------- eval's judge task


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny random Llama models in the Hugging Face format, sharing one small tokenizer."""
    from transformers import AutoTokenizer

    from trulyopen.data.tokenizer import save_hf, train_tokenizer
    from trulyopen.recipe import TokenizerConfig

    root = tmp_path_factory.mktemp("judged")
    text = ["The capital of France is Paris. Two and two make four.\n", "def add(a, b):\n    return a + b\n"]
    save_hf(train_tokenizer(iter(text * 20), TokenizerConfig(vocab_size=300)), root / "tok")
    tok = AutoTokenizer.from_pretrained(str(root / "tok"))
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = tiny_llama(tok)
        with torch.no_grad():
            model.lm_head.weight.mul_(20)  # peaked: no near-ties in greedy decoding
        model.save_pretrained(root / f"m{seed}")
        tok.save_pretrained(root / f"m{seed}")
        dirs.append(root / f"m{seed}")
    return dirs[0], dirs[1]


ITEMS = [
    {"id": "paris", "prompt": "The capital of France is", "reference": "Paris"},
    {"id": "four", "prompt": "Two and two make", "reference": "four"},
    {"id": "add", "prompt": "def add(a, b):", "reference": "return a + b"},
    {"id": "odd", "prompt": "An unparseable question:", "reference": "none"},
]


def section(prompt: str, title: str) -> str:
    return prompt.split(f"## {title}\n\n", 1)[1].split("\n\n## ", 1)[0]


def fake_judge(path: str, headers: dict, body: dict, n: int) -> Reply:
    """A judge whose verdicts follow from what it is shown: rubric scores the answer's length,
    reference says yes for the France question, pairwise prefers the longer answer."""
    assert path == "/v1/chat/completions" and headers["authorization"] == f"Bearer {SECRET}"
    prompt = body["messages"][-1]["content"]
    if "unparseable" in prompt:
        return openai_reply("I would rather not say.")
    if "## Answer A" in prompt:
        a, b = len(section(prompt, "Answer A")), len(section(prompt, "Answer B"))
        return openai_reply("[[A]]" if a > b else "[[B]]" if b > a else "[[C]]")
    if "## Reference answer" in prompt:
        return openai_reply("yes" if "France" in prompt else "no")
    return openai_reply(f"Score: {len(section(prompt, 'Answer')) % 10 + 1}")


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_eval_judge_task_end_to_end(
    model_dirs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from trulyopen.cli import app
    from trulyopen.evaluate import models
    from trulyopen.evaluate.generation import ANSWER_STOPS, complete
    from trulyopen.evaluate.taskfile import load_suite

    model_dir, baseline_dir = model_dirs
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    with fake_api(fake_judge) as api:
        judge_cfg = {
            "provider": "openai",
            "model": "fake-judge",
            "base_url": api.url + "/v1",
            "api_key_env": KEY_ENV,
            "requests_per_minute": 1e6,
        }
        suite = [
            {"name": "rubric", "mode": "rubric", "rubric": "length"},
            {"name": "reference", "mode": "reference"},
            {"name": "pairwise", "mode": "pairwise", "baseline_model": str(baseline_dir)},
        ]
        (tmp_path / "suite.yaml").write_text(
            json.dumps(
                [
                    {
                        "name": t["name"],
                        "path": "items.jsonl",
                        "type": "judge",
                        "max_new_tokens": 8,
                        "judge": judge_cfg | {k: v for k, v in t.items() if k != "name"},
                    }
                    for t in suite
                ]
            )
        )
        monkeypatch.setenv(KEY_ENV, SECRET)
        out = tmp_path / "out"
        result = CliRunner().invoke(
            app, ["eval", str(model_dir), "--tasks", str(tmp_path / "suite.yaml"), "--out", str(out)]
        )
        assert result.exit_code == 0, result.output
        asked = [body["messages"][-1]["content"] for _, _, body in api.requests]

        monkeypatch.delenv(KEY_ENV)  # without the key: skipped with a line, nothing asked
        result_nokey = CliRunner().invoke(
            app,
            [
                "eval",
                str(model_dir),
                "--tasks",
                str(tmp_path / "suite.yaml"),
                "--out",
                str(tmp_path / "nokey"),
            ],
        )
        assert len(api.requests) == len(asked)
    res = json.loads((out / "results.json").read_text())
    records = {
        name: [json.loads(x) for x in (out / f"{name}.instances.jsonl").read_text().splitlines()]
        for name in ("rubric", "reference", "pairwise")
    }

    # the answers judged are the evaluated model's, made as generation tasks make theirs; the
    # baselines are the second model's
    spec = load_suite(tmp_path / "suite.yaml")[0]
    prompts = [i["prompt"] for i in ITEMS]
    mine, theirs = (
        complete(em.model, em.tokenizer, prompts, spec, ANSWER_STOPS, spec.seed)
        for em in (models.load(str(model_dir)), models.load(str(baseline_dir)))
    )
    assert mine != theirs
    for name, rows in records.items():
        assert [r["prediction"] for r in rows] == mine, name
    assert [r["baseline"] for r in records["pairwise"]] == theirs
    assert len(asked) == 4 + 4 + 2 * 4  # pairwise: both orders of every item
    assert [section(p, "Answer") for p in asked[:4]] == mine  # the rubric task's requests, in order

    tasks = res["tasks"]
    for name in ("rubric", "reference", "pairwise"):
        j = tasks[name]["judge"]
        assert (j["model"], j["provider"], j["mode"]) == ("fake-judge", "openai", name)
        assert j["endpoint"] == api.url + "/v1" and j["failed"] == 0 and "skipped" not in j
    assert tasks["rubric"]["judge"]["requests"] == 4
    assert tasks["pairwise"]["judge"]["baseline_model"] == str(baseline_dir)

    rubric = tasks["rubric"]["metrics"]
    expected = [len(a) % 10 + 1 for a in mine[:3]]
    assert rubric["score"]["value"] == pytest.approx(mean(expected)) and rubric["score"]["n"] == 3
    assert rubric["unparsed"]["value"] == pytest.approx(0.25) and rubric["unparsed"]["n"] == 4
    var = sum((x - mean(expected)) ** 2 for x in expected) / 2
    assert rubric["score"]["stderr"] == pytest.approx((var / 3) ** 0.5)
    assert records["rubric"][3]["value"] is None and records["rubric"][3]["replies"] == [
        "I would rather not say."
    ]

    reference = tasks["reference"]["metrics"]
    assert reference["accuracy"]["value"] == pytest.approx(1 / 3) and reference["accuracy"]["n"] == 3

    # the longer answer wins in both orders, so this judge is always consistent
    outcomes = [
        "win" if len(a) > len(b) else "loss" if len(a) < len(b) else "tie"
        for a, b in zip(mine[:3], theirs[:3], strict=True)
    ]
    pairwise = tasks["pairwise"]["metrics"]
    value = {"win": 1.0, "tie": 0.5, "loss": 0.0}
    assert pairwise["win_rate"]["value"] == pytest.approx(mean([value[o] for o in outcomes]))
    assert pairwise["wins"]["value"] == pytest.approx(outcomes.count("win") / 3)
    assert pairwise["consistency"]["value"] == 1.0 and pairwise["unparsed"]["value"] == pytest.approx(0.25)
    assert [r["outcome"] for r in records["pairwise"]] == [*outcomes, None]
    assert "judged by fake-judge" in result.output and SECRET not in json.dumps(res)

    assert result_nokey.exit_code == 0, result_nokey.output
    skipped = json.loads((tmp_path / "nokey" / "results.json").read_text())["tasks"]["rubric"]
    assert skipped["metrics"] == {} and skipped["judge"]["skipped"].startswith(f"${KEY_ENV} is not set")
    assert f"judge task rubric skipped: ${KEY_ENV} is not set" in result_nokey.output


@pytest.mark.parametrize(
    ("judge_settings", "items", "message"),
    [
        ({"mode": "reference"}, [{"prompt": "q"}], "items.jsonl:1: missing field 'reference'"),
        (
            {"mode": "pairwise"},
            [{"prompt": "q", "baseline": "b"}, {"prompt": "r"}],
            "items.jsonl:2: missing field 'baseline'",
        ),
        ({"mode": "rubric", "prompt": "Rate {anwser}"}, [{"prompt": "q"}], "unknown field(s) {anwser}"),
        (
            {"mode": "rubric", "baseline_model": "x"},
            [{"prompt": "q"}],
            "'baseline_model' applies to mode pairwise only",
        ),
        ({"mode": "rubric", "provider": "bedrock"}, [{"prompt": "q"}], "needs 'region'"),
        ({"mode": "rubric", "regoin": "x"}, [{"prompt": "q"}], "field 'judge.regoin': unknown key"),
    ],
)
def test_judge_task_settings_and_items_are_checked_before_any_model_runs(
    tmp_path: Path, judge_settings: dict, items: list[dict], message: str
) -> None:
    from trulyopen.evaluate.taskfile import TaskError, load_suite

    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    settings = {"provider": "openai", "model": "m"} | judge_settings
    task = {"name": "j", "path": "items.jsonl", "type": "judge", "judge": settings}
    (tmp_path / "suite.yaml").write_text(json.dumps([task]))
    with pytest.raises(TaskError) as e:
        load_suite(tmp_path / "suite.yaml")
    assert message in str(e.value) and ("suite.yaml" in str(e.value) or "items.jsonl" in str(e.value))
    (tmp_path / "suite.yaml").write_text(json.dumps([{k: v for k, v in task.items() if k != "judge"}]))
    with pytest.raises(TaskError, match="field 'judge': required for type judge"):
        load_suite(tmp_path / "suite.yaml")


def test_judge_items_round_trip_and_show_their_answers_to_the_contamination_check(tmp_path: Path) -> None:
    from trulyopen.evaluate.taskfile import TaskError, instance_text, load_instances, write_instances

    path = tmp_path / "items.jsonl"
    path.write_text(
        json.dumps({"id": "a", "prompt": "Q?", "reference": "the ref", "baseline": "the base"}) + "\n"
    )
    (item,) = load_instances(path, "judge")
    assert (item.prompt, item.reference, item.baseline) == ("Q?", "the ref", "the base")
    assert instance_text(item) == "Q?\nthe ref\nthe base"
    write_instances(tmp_path / "again.jsonl", [item])
    assert (tmp_path / "again.jsonl").read_text() == path.read_text()
    path.write_text(json.dumps({"prompt": "Q?", "answer": "x"}) + "\n")
    with pytest.raises(TaskError, match=r"items.jsonl:1: unknown field\(s\) 'answer' for a judge item"):
        load_instances(path, "judge")


# ----------------------------------------------------------------------------- synth's judge


def test_synth_judge_filters_through_the_rubric_judge_on_gemini() -> None:
    records = [
        {
            "id": f"sft-{i}",
            "messages": [
                {"role": "user", "content": f"Write f{i}"},
                {"role": "assistant", "content": f"```python\ndef f{i}():\n    return {i}\n```"},
            ],
        }
        for i in range(4)
    ]
    rating = {"f0": "Rating: 9/10", "f1": "2", "f2": "no idea", "f3": "[[7]]"}

    def respond(path: str, headers: dict, body: dict, n: int) -> Reply:
        assert path == "/v1beta/models/gemini-judge:generateContent" and headers["x-goog-api-key"] == SECRET
        prompt = body["contents"][0]["parts"][0]["text"]
        assert prompt.startswith("Rate the answer below from 1 to 10 for correctness (does the code do")
        assert "## Instruction\n\nWrite f" in prompt
        assert body["systemInstruction"]["parts"][0]["text"].startswith("You review training data")
        name = re.search(r"Write (f\d)", prompt).group(1)
        return (
            200,
            {},
            {"candidates": [{"content": {"parts": [{"text": rating[name]}]}, "finishReason": "STOP"}]},
        )

    with fake_api(respond) as api:
        cfg = RemoteModelConfig(
            provider="gemini",
            model="gemini-judge",
            base_url=api.url,
            api_key_env=KEY_ENV,
            task="judge",
            requests_per_minute=1e9,
        )
        kept, stats = remote_step(records, cfg, environ={KEY_ENV: SECRET}, log=lambda line: None)
    assert [r["id"] for r in kept] == [
        "sft-0",
        "sft-2",
        "sft-3",
    ]  # rated 2: dropped; unreadable: kept as it was
    assert kept[0]["rating"] == {"score": 9, "model": "gemini-judge"} and "rating" not in kept[1]
    assert stats["outcomes"] == {"rated": 3, "unusable_reply": 1} and stats["dropped_ids"] == ["sft-1"]
    assert stats["base_url"] == api.url and stats["requests"] == 4
