"""SYNTHCARD.md: the data card of the post-training data, for the people who will train on it.

It says what each file holds and how it was made, whose text it came from and under which licence,
what was left out and why, whether an outside model touched it, and what it is not good for. Every
number comes from the manifest it is written from, so card and manifest cannot disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trulyopen.files import write_text
from trulyopen.synth.tool_use import MAX_CALLS_PER_FUNCTION

WHAT = {
    "sft.jsonl": "chat records: the user gives a function's signature and docstring, the assistant "
    "answers with the function as written in the corpus (decorators and comments included)",
    "preference.jsonl": "preference pairs: the same prompt, the real function as `chosen` and a copy with "
    "one behaviour-changing edit as `rejected` (both printed by `ast.unparse`, so they differ only by "
    "the edit; the edit is named in `corruption`)",
    "grpo.jsonl": "prompts with checkable answers: what a constant expression found in the corpus "
    "evaluates to, with a verifier (`numeric` for numbers, `exact` repr for the rest)",
    "tools.jsonl": "tool-use conversations (OpenAI's format, trained with sft): a corpus function among "
    "others as tools, a question made from its summary and arguments the corpus calls it with, the "
    "assistant's call, the result of running it in the sandbox, and an answer",
    "tools_heldout.jsonl": "the same for held-out functions, never trained on: the eval stage's "
    "`tool_call` task",
}


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v:,}" for k, v in d.items()) or "none"


def card_text(m: dict[str, Any]) -> str:
    """The card's Markdown, from a synth manifest."""
    cfg = m["config"]
    lines = [
        "# Synthetic post-training data card",
        "",
        "Made by `trulyopen synth` from the training split of a curated corpus, with no outside model",
        "unless the remote section below says otherwise. Every number here is taken from `manifest.json`",
        "beside this file, which also holds the sha256 of the input corpus and of every file.",
        "",
        "## Files",
        "",
        "| file | records | what it holds |",
        "|---|---|---|",
    ]
    for name, f in m["files"].items():
        lines.append(f"| `{name}` | {f['records']:,} | {WHAT[name]} |")
    c = m["corpus"]
    lines += [
        "",
        "## Source and licence",
        "",
        f"Input: `{c['file']}` (sha256 `{c['sha256']}`), {c['docs']:,} documents; only the training",
        "split was read, never the validation split, which evaluation uses.",
        "",
        "Every example quotes or is derived from corpus text, so it carries the licence of the source its",
        "document came from:",
        "",
        "| source | licence | examples |",
        "|---|---|---|",
    ]
    lines += [f"| {s['name']} | {s['license']} | {s['examples']:,} |" for s in m["sources"]]
    fn = m["functions"]
    lines += [
        "",
        "## How the examples were made",
        "",
        f"{c['unparsable']:,} documents did not parse as Python and gave nothing. Functions (module "
        "level, in classes, and in module-level if/try/with blocks; not nested in other functions) were "
        "used when they had a docstring of at least 20 characters, at most "
        f"{fn['max_answer_lines']} lines of code after it, and a body that is not a stub: "
        f"{fn['usable']:,} were usable; the others were left out for these reasons: "
        f"{_counts(fn['skipped'])}.",
        "",
        f"Each kind keeps at most {cfg['max_per_kind']:,} examples, chosen by a hash of "
        f"(seed {cfg['seed']}, record id): the same corpus and config always give the same files.",
        "",
        "| kind | candidates | no record made | removed by decontamination | kept |",
        "|---|---|---|---|---|",
    ]
    for kind, k in m["kinds"].items():
        row = [f"{k['candidates']:,}", _counts(k["failed"]), f"{k['decontaminated']:,}", f"{k['kept']:,}"]
        lines.append(f"| {kind} | " + " | ".join(row) + " |")
    if "preference" in m["kinds"]:
        lines += [
            "",
            f"Corruptions used in preference pairs: {_counts(m['kinds']['preference']['corruptions'])}.",
        ]
    if "grpo" in m["kinds"]:
        g = m["kinds"]["grpo"]
        lines += [
            "",
            f"GRPO expressions: {g['occurrences']:,} safe expressions found ({g['candidates']:,} distinct). "
            "Only literals, operators, displays, subscripts, a few pure builtins and str/bytes/list methods "
            "pass the whitelist; expressions standing in statements were refused for: "
            f"{_counts(g['rejected'])}. Answers come from evaluating each expression in the sandbox "
            "(`trulyopen.rewards.sandbox`), never in the synth process. "
            f"Verifiers: {_counts(g['verifiers'])}.",
        ]
    if "tools" in m["kinds"]:
        t = m["kinds"]["tools"]
        h = t["heldout"]
        lines += [
            "",
            f"Tools: {t['tools']:,} documented module-level functions made tool specs (the others: "
            f"{_counts(t['tools_skipped'])}); {t['calls']:,} calls with JSON-literal arguments were found "
            f"in code and doctests, and {t['functions_called']:,} functions are called. Calls left out "
            f"before running: {t.get('calls_not_a_tool', 0):,} call no tool, "
            f"{t.get('calls_not_fitting_schema', 0):,} do not fit its schema, "
            f"{t.get('calls_repeated', 0):,} repeat another, {t.get('calls_over_cap', 0):,} exceed "
            f"{MAX_CALLS_PER_FUNCTION} per function. Each call ran twice in the sandbox, its document "
            "run as its module; a result that differed was dropped. Functions of modules that read "
            "the machine (os, sys, time, ...) or whose body does were never run. Held out of training, "
            f"in `tools_heldout.jsonl`: {h['kept_by_kind'].get('function', 0):,} conversations of "
            f"functions never shown in training (a seeded {cfg['tools_heldout']:.0%} of them), and "
            f"{h['kept_by_kind'].get('call', 0):,} new questions to trained functions (one of each "
            "function called three or more times).",
        ]
    lines += ["", "## Decontamination", ""]
    d = m["decontamination"]
    if d is None:
        lines.append("No evaluation sets were given, so examples were not checked for contamination.")
    else:
        lines += [
            f"Examples sharing a {d['ngram']}-word n-gram with an evaluation set (over the whole example:",
            "prompt, answer, both sides of a pair) were removed and the next candidate taken:",
            "",
        ]
        for kind, k in m["kinds"].items():
            lines.append(f"- {kind}: {_counts(k['decontaminated_by_eval_set'])}")
    lines += ["", "## Outside model", ""]
    r = m["remote"]
    if r is None:
        lines.append("None: no outside model wrote or judged any example.")
    elif r["skipped"]:
        lines.append(
            f"A remote {r['task']} step with `{r['model']}` was configured but skipped: {r['skipped']}."
        )
    else:
        lines.append(
            f"`{r['model']}` ({r['provider']} API) was asked to {r['task']} {r['asked']:,} SFT examples: "
            f"{_counts(r['outcomes'])}."
        )
        if r["task"] == "write":
            lines.append(
                "Rewritten examples keep the corpus answer under `reference` and name the model in "
                f"`written_by`; {r['reverted_for_contamination']} were put back because the new answer "
                "overlapped an evaluation set. The licence of the outside model's output is governed by "
                "its provider's terms, not only by the corpus licence."
            )
        else:
            lines.append(
                f"Examples rated below {r['min_rating']} were dropped ({r['dropped']:,}); ratings: "
                f"{_counts(r['ratings'])}. Each judged example records its `rating`."
            )
    lines += [
        "",
        "## Limitations",
        "",
        "- The instructions are templated, not written by people; they teach completing a documented",
        "  signature, not following free-form requests.",
        "- Answers are whatever the corpus holds: they may rely on names imported elsewhere in their",
        "  module, and are as correct as the corpus is. Nothing here was executed except GRPO expressions",
        "  and tool calls, both in the sandbox.",
        "- Tool-use questions are templated from a docstring's summary and the call's arguments: they",
        "  teach choosing a tool and filling its arguments, not understanding what a user means.",
        "- Rejected answers differ from chosen ones by one mechanical edit; some edits may leave the",
        "  behaviour unchanged for every input (for example an off-by-one in an unused constant).",
        "- GRPO expressions are small, constant and often simple; they test reading Python, not writing it.",
        "",
    ]
    return "\n".join(lines)


def write_card(manifest: dict[str, Any], path: Path) -> None:
    write_text(path, card_text(manifest))
