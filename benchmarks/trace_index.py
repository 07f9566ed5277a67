"""The trace index: build time, bytes per token and peak memory, against infini-gram's own indexer;
and trace latency for 450-token answers, against the engine call OLMoTrace's spans come from.

    .venv/bin/python benchmarks/trace_index.py               # quickstart shards + 0.1 GB of issue 8's corpus
    .venv/bin/python benchmarks/trace_index.py --quick       # quickstart shards only, 20 queries

Corpora (each through our data stages to token shards, made once into --workdir):
  quickstart   the quickstart recipe's data, tokenizer and shards (the Python standard library)
  scale        issue 8's generated web-like corpus (benchmarks/_scale_corpus.py, --scale-gb of gzip
               JSONL), with an 8,192-token BPE trained on it, as benchmarks/data_scale.py makes it

Build rows, each in a fresh interpreter (peak RSS is the row's own, children included):
  ours         `build_index` (trulyopen.trace.index) as the index stage runs it, 2 local workers:
               infini-gram's input files written from our shards, its Rust indexer for the suffix array
  infini-gram  its own driver (`python -m infini_gram.indexing`, --cpus 2) on the same input files, so
               it skips its tokenizing step and sorts the same tokens: the index must come out byte
               for byte the same, and the ratio shows what our orchestration costs or saves

Trace latency: --queries texts of 450 tokens (half windows of training documents, which trace to long
spans, half of held-out ones), each traced with the default options (spans of 8+ tokens, 5% kept, 3
documents each): p50 and p99 of ours, and of infini-gram's `attribute` call alone on the same tokens
(the maximal-span search OLMoTrace runs), which our spans start from. Target: p99 under 1 s.
The last line is a JSON object of all figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _machine import run_row  # (benchmarks/_machine.py, beside this script)

ROOT = Path(__file__).resolve().parent.parent
QUERY_TOKENS = 450
TARGET_P99_S = 1.0


# ----------------------------------------------------------------------------- rows (child processes)


def row_ours(p: dict) -> dict:
    from trulyopen.data.executor.local import LocalExecutor
    from trulyopen.recipe import IndexConfig
    from trulyopen.trace.index import build_index

    out = Path(p["out"])
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    executor = LocalExecutor(2)
    index = build_index(Path(p["shards"]), out, {}, executor, IndexConfig(), {"benchmark": True})
    seconds = time.perf_counter() - t
    if executor.pool is not None:
        executor.pool.shutdown()
    return {"seconds": seconds, **_sizes(index), "peak_rss_mb": _peak_mb()}


def row_infini_gram(p: dict) -> dict:
    """infini-gram's driver on our input files, one index folder at a time (it builds one save_dir)."""
    ours, out = Path(p["ours"]), Path(p["out"])
    shutil.rmtree(out, ignore_errors=True)
    seconds, width = 0.0, json.loads((ours / "index.json").read_text())["token_width"]
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    for folder in sorted(d for d in ours.iterdir() if d.is_dir()):
        target = out / folder.name
        target.mkdir(parents=True)
        for name in ("tokenized.0", "offset.0"):  # present: its step 1 (tokenizing) is skipped
            shutil.copy(folder / name, target / name)
        cmd = [sys.executable, "-m", "infini_gram.indexing", "--data_dir", str(target), "--save_dir",
               str(target), "--token_dtype", "u16" if width == 2 else "u32", "--cpus", "2",
               "--mem", str(p["mem_gb"]), "--ulimit", str(hard)]  # fmt: skip
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        seconds += time.perf_counter() - t
    same = all(
        (out / d.name / "table.0").read_bytes() == (d / "table.0").read_bytes()
        for d in ours.iterdir()
        if d.is_dir()
    )
    return {"seconds": seconds, "same_table_as_ours": same, "peak_rss_mb": _peak_mb()}


def row_latency(p: dict) -> dict:
    from trulyopen.trace.spans import TraceOptions, Tracer

    tracer = Tracer(Path(p["index"]), Path(p["tokenizer"]))
    ours, peer, spans = [], [], []
    for text in json.loads(Path(p["queries"]).read_text()):
        ids = tracer.encode(text).ids
        t = time.perf_counter()
        tracer.engine.attribute(input_ids=ids, delim_ids=[], min_len=8, max_cnt=100_000, enforce_bow=False)
        peer.append(time.perf_counter() - t)
        t = time.perf_counter()
        result = tracer.trace(text, TraceOptions())
        ours.append(time.perf_counter() - t)
        spans.append(len(result["spans"]))
    return {"ours_s": ours, "attribute_s": peer, "spans": spans, "peak_rss_mb": _peak_mb()}


def _sizes(index: dict) -> dict:
    return {k: index[k] for k in ("tokens", "docs", "bytes", "bytes_per_token")} | {
        "folders": len(index["shards"])
    }


def _peak_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024


ROWS = {"ours": row_ours, "infini-gram": row_infini_gram, "latency": row_latency}


# ----------------------------------------------------------------------------- corpora


def quickstart_shards(workdir: Path) -> Path:
    run_dir = workdir / "quickstart"
    if not (run_dir / "data" / "shards" / "shards.json").is_file():
        from trulyopen.pipeline import run
        from trulyopen.recipe import load_recipe

        recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml")
        recipe.index = None
        run(recipe, run_dir=run_dir, until="shards")
    return run_dir


def scale_shards(workdir: Path, gb: float) -> Path:
    import yaml
    from data_scale import corpus, train_tokenizer

    run_dir = workdir / "scale"
    if (run_dir / "data" / "shards" / "shards.json").is_file():
        return run_dir
    full = corpus(workdir, gb, 8)
    tok = train_tokenizer(full, workdir / "tokenizer", 8192)
    source = {"name": "web", "type": "jsonl", "path": str(full), "license": "CC0-1.0", "id_field": "id"}
    recipe = {"name": "scale", "data": {"sources": [source]}, "tokenizer": {"path": str(tok)}}
    path = workdir / "scale.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "trulyopen", "data", str(path), "--run-dir", str(run_dir), "--workers", "2"]
    subprocess.run(cmd, check=True)
    return run_dir


def queries(run_dir: Path, n: int, seed: int = 0) -> list[str]:
    """n texts of QUERY_TOKENS tokens: half windows of training documents, half of held-out ones."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(run_dir / "tokenizer" / "tokenizer.json"))
    shards = run_dir / "data" / "shards"
    meta = json.loads((shards / "shards.json").read_text())
    rng, out = np.random.default_rng(seed), []
    for split, count in (("train", n - n // 2), ("val", n // 2)):
        tokens = np.concatenate(
            [
                np.fromfile(shards / f"{s['name']}.bin", dtype=meta["dtype"])
                for s in meta["splits"][split]["shards"]
            ]
        )
        for at in rng.integers(0, len(tokens) - QUERY_TOKENS, size=count):
            window = [int(t) for t in tokens[at : at + QUERY_TOKENS] if t != meta["eot_id"]]
            out.append(tok.decode(window))
    return out


# ----------------------------------------------------------------------------- main


def machine() -> dict:
    from importlib.metadata import version

    from data_scale import machine as described  # (benchmarks/data_scale.py: CPU, cores, ISA, memory)

    return {"machine": described(), "infini_gram": version("infini-gram")}


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the quickstart's shards only, 20 queries")
    ap.add_argument("--scale-gb", type=float, default=0.1, help="gzip GB of issue 8's corpus")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "trulyopen_trace_bench"))
    for hidden in ("--row", "--row-params", "--row-out"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.row:
        Path(a.row_out).write_text(json.dumps(ROWS[a.row](json.loads(a.row_params))))
        return
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = {"TRULYOPEN_QUIET": "1"}
    n = 20 if a.quick else a.queries
    r = {"benchmark": "trace_index", "date": time.strftime("%Y-%m-%d"), "machine": machine(), "corpora": {}}
    print(f"machine: {r['machine']}")
    corpora = {"quickstart": quickstart_shards(workdir)}
    if not a.quick:
        corpora["scale"] = scale_shards(workdir, a.scale_gb)
    for name, run_dir in corpora.items():
        shards, index = run_dir / "data" / "shards", workdir / f"{name}_index"
        print(f"\n[{name}] building the index (ours), then infini-gram's driver on the same input")
        ours = run_row(__file__, "ours", {"shards": str(shards), "out": str(index)}, env)
        mem_gb = max(1, int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30 // 2))
        peer = run_row(
            __file__,
            "infini-gram",
            {"ours": str(index), "out": str(workdir / f"{name}_peer"), "mem_gb": mem_gb},
            env,
        )
        qfile = workdir / f"{name}_queries.json"
        qfile.write_text(json.dumps(queries(run_dir, n)))
        print(f"[{name}] tracing {n} texts of {QUERY_TOKENS} tokens")
        tok = run_dir / "tokenizer" / "tokenizer.json"
        lat = run_row(
            __file__, "latency", {"index": str(index), "tokenizer": str(tok), "queries": str(qfile)}, env
        )
        row = {
            "index": {k: ours[k] for k in ("tokens", "docs", "bytes", "bytes_per_token", "folders")},
            "build_s": ours["seconds"],
            "build_peak_rss_mb": ours["peak_rss_mb"],
            "peer_build_s": peer["seconds"],
            "peer_peak_rss_mb": peer["peak_rss_mb"],
            "same_table": peer["same_table_as_ours"],
            "build_ratio": peer["seconds"] / ours["seconds"],
            "trace_p50_s": pct(lat["ours_s"], 50),
            "trace_p99_s": pct(lat["ours_s"], 99),
            "attribute_p50_s": pct(lat["attribute_s"], 50),
            "attribute_p99_s": pct(lat["attribute_s"], 99),
            "spans_median": statistics.median(lat["spans"]),
            "others_share": max(x["_run"]["others_share"] for x in (ours, peer, lat)),
        }
        r["corpora"][name] = row
        ix = row["index"]
        print(
            f"  index: {ix['tokens']:,} tokens, {ix['docs']:,} documents, {ix['folders']} folder(s), "
            f"{ix['bytes'] / 1e6:,.1f} MB = {ix['bytes_per_token']:.2f} bytes/token"
        )
        print(
            f"  build: ours {row['build_s']:.1f} s, peak {row['build_peak_rss_mb']:,.0f} MB; infini-gram's "
            f"driver {row['peer_build_s']:.1f} s, peak {row['peer_peak_rss_mb']:,.0f} MB "
            f"(ours {row['build_ratio']:.2f}x as fast; same suffix array: {row['same_table']})"
        )
        print(
            f"  trace ({QUERY_TOKENS} tokens): p50 {row['trace_p50_s'] * 1e3:.0f} ms, p99 "
            f"{row['trace_p99_s'] * 1e3:.0f} ms (attribute alone: p50 {row['attribute_p50_s'] * 1e3:.0f} ms, "
            f"p99 {row['attribute_p99_s'] * 1e3:.0f} ms); median {row['spans_median']} spans; target p99 < "
            f"{TARGET_P99_S:.0f} s: {'MET' if row['trace_p99_s'] < TARGET_P99_S else 'MISSED'}"
        )
        if row["others_share"] > 0.05:
            print(f"  WARNING: other processes took {row['others_share']:.0%} of the CPUs during a row")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
