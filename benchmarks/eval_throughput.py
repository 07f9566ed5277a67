"""Multiple-choice evaluation throughput: our evaluator against lm-eval's Hugging Face backend.

    .venv/bin/python benchmarks/eval_throughput.py            # the run recorded in BENCHMARKS.md
    .venv/bin/python benchmarks/eval_throughput.py --quick    # a smoke run (under a minute)

One model (a Hugging Face directory), the same task files, every row in its own interpreter:

  ours      trulyopen.evaluate.multiple_choice.evaluate(), cloze form, normalisation "none"; the
            per-character (acc_norm-like) accuracy comes from the same log-probabilities
  hf        lm_eval.simple_evaluate on lm_eval.models.huggingface.HFLM(pretrained=DIR, dtype float32,
            device cpu, batch_size --hf-batch), the task as a local lm-eval YAML (json dataset,
            output_type multiple_choice, metrics acc and acc_norm)
  adapter   the same lm-eval run through our adapter (trulyopen.evaluate.harness, model TrulyopenLM)

Seconds are the scoring time only: our evaluate() call, and the time spent inside the harness
model's loglikelihood() (tokenisation and forward passes, as ours); model loading is excluded and
the whole simple_evaluate() call (the first run) is reported beside it. Each row warms the model up
with one forward pass, then scores --repeat times (lm-eval: its own requests again); the fastest
run counts, as this shared machine's speed drifts by 10-20% from one minute to the next.

Tasks: next_line (built-in, from the run's held-out split; 4 choices, short contexts) and window
(synthetic: 20-40 lines of a held-out file, the real next line against 3 lines of other files
given its indentation, the context cut from the top so that context + choices fit the window).

Model: --model DIR, or the newest pretraining checkpoint of runs/quickstart exported with
export_checkpoint, or (no quickstart run) a fixed Llama (the 30m preset, seed 0, window 512) with
the quickstart's tokenizer. Target: ours >= 2x the hf row's items/s. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from _machine import run_row  # (benchmarks/_machine.py, beside this script)

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "runs" / "quickstart"
RATIO_TARGET = 2.0
DISTURBED = 0.05  # a row during which other processes took more than this share of the CPUs
FIXED_WINDOW, SEED = 512, 0


# ----------------------------------------------------------------------------- rows (child processes)


def warm_up(model) -> None:
    import torch

    with torch.no_grad():
        model(input_ids=torch.ones((1, 16), dtype=torch.long))


def row_ours(p: dict) -> dict:
    from trulyopen.evaluate import models
    from trulyopen.evaluate.multiple_choice import evaluate
    from trulyopen.evaluate.taskfile import TaskSpec, load_instances

    t = time.perf_counter()
    em = models.load(p["model"])
    load_s = time.perf_counter() - t
    warm_up(em.model)
    spec = TaskSpec(
        name="bench", path=p["task"], type="multiple_choice", forms=["cloze"], normalization="none"
    )
    insts = load_instances(Path(p["task"]), "multiple_choice")
    runs = []
    for _ in range(p["repeat"]):
        t = time.perf_counter()
        _, records = evaluate(em.model, em.tokenizer, spec, insts, em.max_len)
        runs.append(time.perf_counter() - t)
    lps = {r["id"]: r["cloze"]["logprobs"] for r in records}
    raw = [max(range(len(v)), key=v.__getitem__) for v in lps.values()]
    char = [
        max(range(len(v)), key=lambda j, v=v, c=i.choices: v[j] / len(c[j]))
        for i, v in zip(insts, lps.values(), strict=True)
    ]
    answers = [i.answer for i in insts]
    return {
        "seconds": min(runs),
        "runs_s": runs,
        "total_s": runs[0],
        "load_s": load_s,
        "acc": statistics.mean(a == b for a, b in zip(raw, answers, strict=True)),
        "acc_norm": statistics.mean(a == b for a, b in zip(char, answers, strict=True)),
        "logprobs": lps,
        "max_len": em.max_len,
    }


def row_lmeval(p: dict) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from trulyopen.evaluate.multiple_choice import cloze_choice
    from trulyopen.evaluate.taskfile import load_instances

    t = time.perf_counter()
    if p["backend"] == "hf":
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=p["model"], dtype="float32", device="cpu", batch_size=p["batch"])
        model = lm.model
    else:
        from trulyopen.evaluate import models
        from trulyopen.evaluate.harness import _adapter_class

        lm = _adapter_class()(em=models.load(p["model"]))
        model = lm.em.model
    load_s = time.perf_counter() - t
    warm_up(model)
    inner, calls = lm.loglikelihood, []

    def timed(requests, *a, **kw):
        t0 = time.perf_counter()
        out = inner(requests, *a, **kw)
        calls.append((requests, time.perf_counter() - t0))
        return out

    lm.loglikelihood = timed
    t = time.perf_counter()
    res = simple_evaluate(
        model=lm,
        tasks=[p["lm_task"]],
        task_manager=TaskManager(include_path=p["yaml_dir"], include_defaults=False),
        log_samples=True,
    )
    total = time.perf_counter() - t
    runs = [sum(s for _, s in calls)]
    for _ in range(p["repeat"] - 1):  # the same requests again, as lm-eval made them
        t = time.perf_counter()
        for requests, _ in calls:
            inner(requests)
        runs.append(time.perf_counter() - t)
    metrics = res["results"][p["lm_task"]]
    insts = {i.id: i for i in load_instances(Path(p["task"]), "multiple_choice")}
    lps, bad_prompts = {}, 0
    for s in res["samples"][p["lm_task"]]:
        inst = insts[str(s["doc"]["id"])]
        lps[inst.id] = [r[0] for r in s["filtered_resps"]]
        want = [(inst.context, cloze_choice(inst, c)) for c in inst.choices]
        bad_prompts += [tuple(a) for a in s["arguments"]] != want
    return {
        "seconds": min(runs),
        "runs_s": runs,
        "total_s": total,
        "load_s": load_s,
        "acc": metrics["acc,none"],
        "acc_norm": metrics["acc_norm,none"],
        "logprobs": lps,
        "prompt_mismatches": bad_prompts,
        "batch": str(getattr(lm, "batch_size", p.get("batch"))),
    }


ROWS = {"ours": row_ours, "lmeval": row_lmeval}


# ----------------------------------------------------------------------------- harness


def child(name: str, params: dict) -> dict:
    env = {"TRULYOPEN_QUIET": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    return run_row(__file__, name, params, env, capture=True)


def git_commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True, text=True)
    return head.stdout.strip() + ("+dirty(src)" if dirty.stdout.strip() else "")


def machine() -> dict:
    import lm_eval
    import torch
    import transformers

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lm_eval": lm_eval.__version__,
    }
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), **versions} | {
        "transformers": transformers.__version__
    }


# ----------------------------------------------------------------------------- inputs


def prepare_model(arg: str | None, tmp: Path) -> tuple[str, str, Path]:
    """(model directory, what it is, the run whose held-out split makes the tasks)."""
    from trulyopen.model.export import export_checkpoint, export_hf
    from trulyopen.train.checkpoint import newest

    run = RUN
    if not (run / "data" / "corpus" / "val.jsonl").exists():
        from trulyopen.pipeline import run as run_pipeline
        from trulyopen.recipe import load_recipe

        run = tmp / "data_run"
        run_pipeline(load_recipe(ROOT / "recipes" / "quickstart.yaml"), run_dir=run, until="tokenizer")
    if arg and arg != "fixed":
        return str(Path(arg).resolve()), f"--model {arg}", run
    ckpt = newest(RUN / "checkpoints" / "pretrain") if arg != "fixed" else None
    if ckpt is not None:
        return str(export_checkpoint(ckpt, tmp / "model")), f"{ckpt.relative_to(ROOT)}, exported", run
    from transformers import AutoTokenizer

    from trulyopen.model.build import from_preset
    from trulyopen.model.presets import SIZES

    vocab = len(AutoTokenizer.from_pretrained(str(run / "tokenizer")))
    model = from_preset("llama", SIZES["30m"], vocab, FIXED_WINDOW, SEED)
    export_hf(model, run / "tokenizer", tmp / "model")
    return str(tmp / "model"), f"fixed llama, 30m preset, untrained, seed {SEED}", run


def window_items(val: Path, tok, max_len: int, n: int) -> list[dict]:
    """Synthetic items: 20-40 lines of a held-out file, the real next line and 3 lines of other files."""
    docs = [json.loads(x) for x in val.read_text().splitlines() if x.strip()]
    lines = [[ln.rstrip() for ln in d["text"].splitlines()] for d in docs]
    pool = [(k, ln.strip()) for k, ls in enumerate(lines) for ln in ls if len(ln.strip()) >= 6]
    rng, items, tries = random.Random(SEED), [], 0
    while len(items) < n and tries < 50 * n:
        tries += 1
        k = rng.randrange(len(docs))
        ls = lines[k]
        at = rng.randrange(20, len(ls)) if len(ls) > 21 else None
        if at is None or len(ls[at].strip()) < 6:
            continue
        indent = ls[at][: len(ls[at]) - len(ls[at].lstrip())]
        others = dict.fromkeys(indent + s for j, s in rng.sample(pool, 12) if j != k and indent + s != ls[at])
        choices = [ls[at], *list(others)[:3]]
        if len(choices) < 4:
            continue
        rng.shuffle(choices)
        ctx = ls[at - rng.randint(20, 40) : at]
        budget = max_len - 1 - sum(len(tok(c)["input_ids"]) + 1 for c in choices)
        while ctx and len(tok("\n".join(ctx) + "\n")["input_ids"]) > budget:
            ctx = ctx[1:]
        if len(ctx) >= 5 and "\n".join(ctx).strip():
            items.append(
                {"id": f"{docs[k]['id']}:{at}", "context": "\n".join(ctx) + "\n", "choices": choices}
            )
            items[-1]["answer"] = choices.index(ls[at])
    return list({it["id"]: it for it in items}.values())


def prepare_task(name: str, run: Path, model_dir: str, max_len: int, n: int, tmp: Path) -> dict:
    from transformers import AutoTokenizer

    from trulyopen.evaluate.builtin import build_builtin_tasks
    from trulyopen.evaluate.loglik import encode_pair
    from trulyopen.evaluate.multiple_choice import cloze_choice
    from trulyopen.evaluate.taskfile import load_instances, write_instances

    val, tok = run / "data" / "corpus" / "val.jsonl", AutoTokenizer.from_pretrained(model_dir)
    path = tmp / "tasks" / f"{name}.jsonl"
    if name == "next_line":
        build_builtin_tasks(val, tmp / "built", seed=SEED, max_items=n)
        path.parent.mkdir(exist_ok=True)
        path.write_text((tmp / "built" / "next_line.jsonl").read_text())
    else:
        write_instances(path, window_items(val, tok, max_len, n))
    insts = load_instances(path, "multiple_choice")
    ends = {i.context[-1].isspace() for i in insts}
    if len(ends) != 1:  # lm-eval has one delimiter per task; ours depends on each context's last character
        raise SystemExit(f"{name}: contexts both do and do not end in whitespace; split the task")
    lm_dir = tmp / "lm_eval" / name
    lm_dir.mkdir(parents=True)
    rows = [{"id": i.id, "context": i.context, "choices": i.choices, "answer": i.answer} for i in insts]
    (lm_dir / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    delim = '""' if ends == {True} else '" "'  # as cloze_choice: a space unless the context ends in one
    (lm_dir / "task.yaml").write_text(
        f"task: bench_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {lm_dir / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        f"doc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: answer\ntarget_delimiter: {delim}\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    ctx = [len(tok(i.context)["input_ids"]) for i in insts]
    pairs = {
        i.id: [sum(map(len, encode_pair(tok, i.context, cloze_choice(i, c)))) for c in i.choices]
        for i in insts
    }
    tree = [c + sum(len(tok(x)["input_ids"]) for x in i.choices) for c, i in zip(ctx, insts, strict=True)]
    return {
        "task": str(path),
        "lm_task": f"bench_{name}",
        "yaml_dir": str(lm_dir),
        "items": len(insts),
        "context_tokens": [min(ctx), statistics.median(ctx), max(ctx)],
        "fit_in_window": sum(t <= max_len for t in tree),
        "longer_than_window": sorted(k for k, v in pairs.items() if max(v) > max_len),
    }


# ----------------------------------------------------------------------------- the run


def agreement(name: str, t: dict, ours: dict, label: str, r: dict) -> str | None:
    """Print how the row's scores agree with ours; a mismatch (accuracy, a prediction, a prompt) is loud."""
    diffs = {
        k: max(abs(x - y) for x, y in zip(a, r["logprobs"][k], strict=True))
        for k, a in ours["logprobs"].items()
    }
    flips = sum(a.index(max(a)) != (b := r["logprobs"][k]).index(max(b)) for k, a in ours["logprobs"].items())
    far = sorted(k for k, d in diffs.items() if d > 1e-3)
    r["agreement"] = {"max_abs_logprob_diff": max(diffs.values()), "items_diff_gt_1e-3": far, "flips": flips}
    bad = [f"{m} {ours[m]:.4f} vs {r[m]:.4f}" for m in ("acc", "acc_norm") if ours[m] != r[m]]
    bad += [f"{flips} predictions differ"] * bool(flips)
    bad += [f"{r['prompt_mismatches']} items with other strings"] * bool(r["prompt_mismatches"])
    print(
        f"  agreement with {label}: acc {ours['acc']:.4f}/{r['acc']:.4f}, acc_norm {ours['acc_norm']:.4f}/"
        f"{r['acc_norm']:.4f}, max |d logprob| {max(diffs.values()):.2e}" + ("" if bad else ": AGREE")
    )
    if far:
        print(
            f"  note: {len(far)} items differ by > 1e-3 in a log-probability, "
            f"{len(set(far) & set(t['longer_than_window']))} of them with a context + choice longer than "
            "the window (truncated)"
        )
    if not bad:
        return None
    print("  " + "!" * 72 + f"\n  !! MISMATCH: {'; '.join(bad)}\n  " + "!" * 72)
    return f"{name}, ours vs {label}: " + "; ".join(bad)


def run_task(name: str, t: dict, common: dict, args) -> tuple[dict, list[str]]:
    rows = {"ours": child("ours", common)}
    for b in args.hf_batch.split(","):
        rows[f"lm-eval hf, batch {b}"] = child("lmeval", {**common, "backend": "hf", "batch": b})
    if not args.no_adapter:
        rows["lm-eval + our adapter"] = child("lmeval", {**common, "backend": "adapter"})
    head = ("row", "scoring s", "items/s", "total s", "acc", "acc_norm", "others")
    print("{:<24} {:>9} {:>8} {:>8} {:>6} {:>8} {:>6}  runs".format(*head))
    for label, r in rows.items():
        r["items_per_s"] = t["items"] / r["seconds"]
        print(
            f"{label:<24} {r['seconds']:>9.2f} {r['items_per_s']:>8.1f} {r['total_s']:>8.2f} "
            f"{r['acc']:>6.3f} {r['acc_norm']:>8.3f} {r['_run']['others_share']:>6.0%}  "
            + "/".join(f"{x:.1f}" for x in r["runs_s"])
            + ("  DISTURBED" if r["_run"]["others_share"] > DISTURBED else "")
        )
    ours = rows["ours"]
    best = min((k for k in rows if k.startswith("lm-eval hf")), key=lambda k: rows[k]["seconds"])
    ratio = rows[best]["seconds"] / ours["seconds"]
    verdict = "MET" if ratio >= RATIO_TARGET else "MISSED"
    print(f"ratio ours / {best} (the fastest hf row): {ratio:.2f}x items/s -> target 2x {verdict}")
    loud = [agreement(name, t, ours, k, r) for k, r in rows.items() if r is not ours]
    for r in rows.values():
        r.pop("logprobs")
    return {**t, "rows": rows, "ratio": ratio, "vs": best, "verdict": verdict}, [x for x in loud if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 24 items of next_line, one scoring")
    ap.add_argument("--model", help="a Hugging Face directory, or 'fixed' (default: runs/quickstart)")
    ap.add_argument("--items", type=int, default=300, help="items per task")
    ap.add_argument("--repeat", type=int, default=2, help="scorings per row; the fastest counts")
    ap.add_argument("--tasks", default="next_line,window")
    ap.add_argument("--hf-batch", default="16", help="HFLM batch_size(s), comma-separated (int or auto)")
    ap.add_argument("--no-adapter", action="store_true", help="leave out lm-eval through our adapter")
    for hidden in ("--row", "--row-params", "--row-out"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.row:
        Path(args.row_out).write_text(json.dumps(ROWS[args.row](json.loads(args.row_params))))
        return
    if args.quick:
        args.items, args.repeat = 24, 1
        args.tasks = "next_line" if args.tasks == ap.get_default("tasks") else args.tasks
    os.environ["TQDM_DISABLE"] = "1"  # the export's progress bar
    m = machine()
    print(
        f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"transformers {m['transformers']}, lm-eval {m['lm_eval']}, python {m['python']}"
    )
    result = {"benchmark": "eval_throughput", "date": datetime.now(UTC).strftime("%Y-%m-%d")}
    result |= {"commit": git_commit(), "argv": sys.argv[1:], "machine": m, "tasks": {}}
    loud = []
    with tempfile.TemporaryDirectory(prefix="trulyopen_bench_") as tmp_s:
        tmp = Path(tmp_s)
        model_dir, what, run = prepare_model(args.model, tmp)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
        max_len = min(int(getattr(config, "max_position_embeddings", 2048) or 2048), 4096)  # as EvalModel
        print(f"model: {what} (window {max_len} tokens)\ncommit: {result['commit']}")
        result["model"] = {"source": what, "window": max_len}
        for name in args.tasks.split(","):
            t = prepare_task(name, run, model_dir, max_len, args.items, tmp)
            c = t["context_tokens"]
            print(
                f"\ntask {name}: {t['items']} items x 4 choices, context tokens min/median/max "
                f"{c[0]}/{c[1]:.0f}/{c[2]}; context + choices fit the window: {t['fit_in_window']}/"
                f"{t['items']}; context + a choice longer than the window: {len(t['longer_than_window'])}"
            )
            result["tasks"][name], bad = run_task(
                name, t, {"model": model_dir, "repeat": args.repeat, **t}, args
            )
            loud += bad
    print(
        "\nsummary: "
        + "; ".join(f"{n}: {t['ratio']:.2f}x ({t['verdict']})" for n, t in result["tasks"].items())
    )
    print("accuracy: " + ("ALL AGREE" if not loud else "MISMATCHES:\n  " + "\n  ".join(loud)))
    disturbed = [
        f"{n}/{k}"
        for n, t in result["tasks"].items()
        for k, r in t["rows"].items()
        if r["_run"]["others_share"] > DISTURBED
    ]
    if disturbed:
        print(f"WARNING: other processes took > {DISTURBED:.0%} of the CPUs during {', '.join(disturbed)}")
    result |= {"mismatches": loud, "disturbed_rows": disturbed}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
