"""Data stage at corpus scale: throughput per core and peak memory of every process, against datatrove.

    .venv/bin/python benchmarks/data_scale.py                 # 2 GB of gzip JSONL, as in BENCHMARKS.md
    .venv/bin/python benchmarks/data_scale.py --gb 0.05 --files 8 --quick     # a smoke run

A corpus of `--gb` GB of gzip-compressed JSONL in `--files` files (benchmarks/_scale_corpus.py:
English-like documents with ids, urls and dates, 2% planted near duplicates) is generated once into
`--workdir`; its first quarter of files is "the quarter", its first sixteenth "the sixteenth".

Rows, each a fresh `trulyopen data` process (data, tokenizer, shards stages) on the corpus as a jsonl
source with id_field and meta_fields, the default cleaning, filters and MinHash (5-word shingles,
112 permutations in 14 bands, threshold 0.8), and one tokenizer trained beforehand (reused through
tokenizer.path, so no row trains one; datatrove is given the same tokenizer.json):

  full      local, 2 workers;  Ray (a local Ray of 2 CPUs started by the stage)
  quarter   local, 1 worker;   local, 2 workers;  Ray
  sixteenth local, 2 workers;  datatrove's local pipeline, 2 workers (benchmarks/_datatrove_scale.py
            in --datatrove-python: read, MinHash signatures, buckets, clusters, filter + write,
            tokenize; whitespace word splitting, which is 7x faster than its spaCy default)

Every row reports its seconds (ours: the stages' own times from the ledger), MB/s of uncompressed
JSONL in all and per core (per worker process), the peak RSS of every process of its tree (sampled
from /proc every 0.2 s: the driver, its workers, Ray's processes), and near-duplicate recall: the
share of planted (original, copy) pairs that end in one cluster. "today's recall" is the in-memory
MinHash + LSH + verification that the data stage ran before it was cut into tasks (MinHasher and
lsh_clusters) on the same sixteenth, documents as read.

Targets: peak RSS on the full corpus within 1.2x of the quarter's; >= 4 MB/s per core end to end;
2 workers >= 1.8x one; >= 2x datatrove's throughput; recall no lower than today's. The last line of
the output is a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _scale_corpus import generate  # noqa: E402

DT_HELPER = ROOT / "benchmarks" / "_datatrove_scale.py"
DEFAULT_DT_PYTHON = ROOT / ".venv-bench" / "bin" / "python"


def machine() -> str:
    model = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in ln
        ),
        platform.processor(),
    )
    flags = Path("/proc/cpuinfo").read_text()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    return f"{model}, {os.cpu_count()} cores, {isa}, {memory:.0f} GiB"


# ----------------------------------------------------------------------------- corpus and slices


def corpus(workdir: Path, gb: float, files: int) -> Path:
    full = workdir / "full"
    stamp = full / "planted.json"
    want = {"total_compressed_bytes": int(gb * 1e9), "files": files}
    if stamp.is_file() and all(json.loads(stamp.read_text())["params"][k] == v for k, v in want.items()):
        return full
    shutil.rmtree(full, ignore_errors=True)
    t = time.perf_counter()
    generate(full, int(gb * 1e9), files)
    print(f"generated {gb} GB in {time.perf_counter() - t:.0f}s", flush=True)
    return full


def slice_of(full: Path, share: int, name: str) -> Path:
    """The first 1/share of the files, linked, with the planted pairs that lie inside them."""
    meta = json.loads((full / "planted.json").read_text())
    keep = meta["files"][: max(1, len(meta["files"]) // share)]
    out = full.parent / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    for f in keep:
        (out / f["file"]).symlink_to(full / f["file"])
    docs = sum(f["docs"] for f in keep)
    inside = [p for p in meta["pairs"] if max(int(x.split("-")[1]) for x in p) < docs]
    totals = {
        k: sum(f[k] for f in keep) for k in ("docs", "jsonl_bytes", "compressed_bytes", "raw_text_bytes")
    }
    (out / "planted.json").write_text(json.dumps({**totals, "pairs": inside, "files": keep}))
    return out


def train_tokenizer(sample_dir: Path, out: Path, vocab: int) -> Path:
    """One byte-level BPE tokenizer for every row, trained on the sixteenth's first 40 MB."""
    if (out / "tokenizer.json").is_file():
        return out
    import gzip

    from trulyopen.data.tokenizer import save_hf
    from trulyopen.data.tokenizer import train_tokenizer as train
    from trulyopen.recipe import TokenizerConfig

    def texts():
        seen = 0
        for f in sorted(sample_dir.glob("*.jsonl.gz")):
            with gzip.open(f, "rt") as fh:
                for line in fh:
                    text = json.loads(line)["text"]
                    seen += len(text)
                    yield text
                    if seen > 40e6:
                        return

    save_hf(train(texts(), TokenizerConfig(vocab_size=vocab)), out)
    return out


# ----------------------------------------------------------------------------- measuring a process tree


class TreeRss:
    """Peak RSS of every process under `pid`, sampled from /proc."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval = pid, interval
        self.peak: dict[int, tuple[int, str]] = {}
        self.peak_sum = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _children(self) -> dict[int, list[int]]:
        kids: dict[int, list[int]] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                kids.setdefault(ppid, []).append(int(d))
        return kids

    def _run(self) -> None:
        while not self._stop.is_set():
            kids, todo, total = self._children(), [self.pid], 0
            while todo:
                p = todo.pop()
                todo += kids.get(p, [])
                try:
                    status = Path(f"/proc/{p}/status").read_text()
                    rss = (
                        int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS")))
                        * 1024
                    )
                    cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
                except (OSError, StopIteration):
                    continue
                total += rss
                if rss > self.peak.get(p, (0, ""))[0]:
                    self.peak[p] = (rss, cmd)
            self.peak_sum = max(self.peak_sum, total)
            self._stop.wait(self.interval)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        procs = sorted(self.peak.values(), reverse=True)
        return {
            "processes": len(procs),
            "peak_rss_max_mb": procs[0][0] / 2**20 if procs else 0,
            "peak_rss_sum_mb": self.peak_sum / 2**20,
            "top": [{"rss_mb": round(r / 2**20, 1), "cmd": c} for r, c in procs[:6]],
        }


def measured(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[float, dict]:
    """Run a command with its output in `log`; its wall time and its process tree's memory."""
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
        rss = TreeRss(proc.pid)
        code = proc.wait()
        wall, mem = time.perf_counter() - t0, rss.stop()
    if code != 0:
        raise RuntimeError(f"{cmd[1]} failed; see {log}")
    return wall, mem


def recall(pairs: list[list[str]], removed_file: Path, prefix: str) -> float:
    """Share of planted pairs in one cluster, from removed.jsonl's duplicate_of links."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    with open(removed_file) as f:
        for line in f:
            r = json.loads(line)
            if "duplicate_of" in r:
                parent[find(r["id"])] = find(r["duplicate_of"])
    return sum(find(prefix + a) == find(prefix + b) for a, b in pairs) / max(1, len(pairs))


# ----------------------------------------------------------------------------- rows


def ours(name: str, data_dir: Path, tok: Path, workdir: Path, workers: int, executor: str) -> dict:
    run_dir = workdir / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    recipe = {
        "name": name,
        "data": {
            "sources": [
                {
                    "name": "web",
                    "type": "jsonl",
                    "path": str(data_dir),
                    "license": "CC0-1.0",
                    "id_field": "id",
                    "meta_fields": ["url", "date"],
                }
            ],
            "executor": executor,
        },
        "tokenizer": {"path": str(tok)},
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = [
        sys.executable,
        "-m",
        "trulyopen",
        "data",
        str(path),
        "--run-dir",
        str(run_dir),
        "--workers",
        str(workers),
    ]
    wall, mem = measured(cmd, workdir / f"{name}.log", {"TRULYOPEN_QUIET": "0"})
    seconds = {
        json.loads(x)["stage"]: json.loads(x)["seconds"]
        for x in (run_dir / "ledger.jsonl").read_text().splitlines()
    }
    meta = json.loads((data_dir / "planted.json").read_text())
    stages = seconds["data"] + seconds["shards"]
    curation = json.loads((run_dir / "data/curation.json").read_text())
    row = {
        "row": name,
        "tool": "trulyopen" + (" (ray)" if executor == "ray" else ""),
        "workers": workers,
        "seconds": seconds,
        "seconds_data_shards": stages,
        "wall_s": wall,
        "jsonl_mb": meta["jsonl_bytes"] / 1e6,
        "mb_per_s": meta["jsonl_bytes"] / 1e6 / stages,
        "mb_per_s_per_core": meta["jsonl_bytes"] / 1e6 / stages / workers,
        "recall": recall(meta["pairs"], run_dir / "data/removed.jsonl", "web/"),
        "removed": {s["step"]: sum(s["removed"].values()) for s in curation["steps"]},
        "tasks": curation["tasks"]["count"],
        "encoders": json.loads((run_dir / "data/shards/shards.json").read_text()).get("encoders"),
        **mem,
    }
    shutil.rmtree(run_dir)
    return row


def datatrove(name: str, data_dir: Path, tok: Path, workdir: Path, workers: int, python: Path) -> dict:
    out, work = workdir / f"{name}.json", workdir / "dt_work"
    shutil.rmtree(work, ignore_errors=True)
    n_files = len(list(data_dir.glob("*.jsonl.gz")))
    cmd = [str(python), str(DT_HELPER), str(data_dir), str(out), "--work", str(work)]
    cmd += ["--tokenizer", str(tok / "tokenizer.json"), "--tasks", str(n_files), "--workers", str(workers)]
    cmd += ["--word-tokenizer", "whitespace"]
    wall, mem = measured(cmd, workdir / f"{name}.log", {})
    r = json.loads(out.read_text())
    shutil.rmtree(work, ignore_errors=True)
    meta = json.loads((data_dir / "planted.json").read_text())
    total = r["seconds"]["total"]
    return {
        "row": name,
        "tool": "datatrove",
        "workers": workers,
        "seconds_data_shards": total,
        "stage_seconds": r["seconds"],
        "wall_s": wall,
        "jsonl_mb": meta["jsonl_bytes"] / 1e6,
        "mb_per_s": meta["jsonl_bytes"] / 1e6 / total,
        "mb_per_s_per_core": meta["jsonl_bytes"] / 1e6 / total / workers,
        "recall": r["recall"]["recall"],
        **mem,
    }


def todays_recall(data_dir: Path) -> float:
    """The in-memory MinHash + LSH + verification the stage ran before tasks, on the documents as read."""
    from trulyopen.data.dedup import MinHasher, lsh_clusters
    from trulyopen.data.sources import Document, input_files, read_source
    from trulyopen.recipe import DedupConfig, SourceConfig

    src = SourceConfig(name="web", type="jsonl", path=data_dir, license="CC0-1.0", id_field="id")
    docs = [d for d in read_source(src, input_files(src), "skip") if isinstance(d, Document)]
    cfg = DedupConfig()
    import numpy as np

    sig = np.concatenate(
        [MinHasher(cfg).signatures([d.text for d in docs[i : i + 256]]) for i in range(0, len(docs), 256)]
    )
    rep = lsh_clusters(sig, cfg.bands, cfg.threshold)
    index = {d.id: i for i, d in enumerate(docs)}
    pairs = json.loads((data_dir / "planted.json").read_text())["pairs"]
    return sum(rep[index["web/" + a]] == rep[index["web/" + b]] for a, b in pairs) / max(1, len(pairs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0, help="compressed size of the full corpus")
    ap.add_argument("--files", type=int, default=64)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/trulyopen_data_scale"))
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--datatrove-python", type=Path, default=DEFAULT_DT_PYTHON)
    ap.add_argument("--quick", action="store_true", help="skip the full-corpus rows")
    ap.add_argument("--rows", default="", help="comma-separated row names to run (default: all)")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}", flush=True)
    full = corpus(args.workdir, args.gb, args.files)
    quarter, sixteenth = slice_of(full, 4, "quarter"), slice_of(full, 16, "sixteenth")
    tok = train_tokenizer(sixteenth, args.workdir / "tokenizer", args.vocab)
    plan = [
        ("sixteenth-local-2", lambda: ours("sixteenth-local-2", sixteenth, tok, args.workdir, 2, "local")),
        (
            "sixteenth-datatrove-2",
            lambda: datatrove(
                "sixteenth-datatrove-2", sixteenth, tok, args.workdir, 2, args.datatrove_python
            ),
        ),
        ("quarter-local-1", lambda: ours("quarter-local-1", quarter, tok, args.workdir, 1, "local")),
        ("quarter-local-2", lambda: ours("quarter-local-2", quarter, tok, args.workdir, 2, "local")),
        ("quarter-ray-2", lambda: ours("quarter-ray-2", quarter, tok, args.workdir, 2, "ray")),
    ]
    if not args.quick:
        plan += [
            ("full-local-2", lambda: ours("full-local-2", full, tok, args.workdir, 2, "local")),
            ("full-ray-2", lambda: ours("full-ray-2", full, tok, args.workdir, 2, "ray")),
        ]
    wanted = set(filter(None, args.rows.split(",")))
    rows = {}
    for name, fn in plan:
        if wanted and name not in wanted:
            continue
        rows[name] = fn()
        r = rows[name]
        print(
            f"{name:<22} {r['tool']:<16} {r['seconds_data_shards']:8.1f}s  {r['mb_per_s']:6.2f} MB/s  "
            f"{r['mb_per_s_per_core']:5.2f} MB/s/core  peak RSS max {r['peak_rss_max_mb']:7.0f} MB "
            f"sum {r['peak_rss_sum_mb']:7.0f} MB ({r['processes']} processes)  recall {r['recall']:.3f}",
            flush=True,
        )
    today = todays_recall(sixteenth) if not wanted or "today" in wanted else None
    ratios = {}

    def ratio(key: str, a: str, b: str, field: str) -> None:
        if a in rows and b in rows:
            ratios[key] = rows[a][field] / rows[b][field]

    ratio("rss_full_over_quarter_local2", "full-local-2", "quarter-local-2", "peak_rss_max_mb")
    ratio("rss_full_over_quarter_ray", "full-ray-2", "quarter-ray-2", "peak_rss_max_mb")
    ratio("two_workers_over_one", "quarter-local-2", "quarter-local-1", "mb_per_s")
    ratio("ours_over_datatrove", "sixteenth-local-2", "sixteenth-datatrove-2", "mb_per_s")
    ratio("ray_over_local_quarter", "quarter-ray-2", "quarter-local-2", "mb_per_s")
    if today is not None:
        print(f"today's recall (in-memory MinHash + LSH + verification, sixteenth): {today:.3f}")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    print(
        json.dumps({"machine": machine(), "rows": rows, "ratios": ratios, "todays_recall_sixteenth": today})
    )


if __name__ == "__main__":
    main()
