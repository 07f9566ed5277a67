"""datatrove's local pipeline on a directory of compressed JSONL: MinHash near-dedup, then tokenize
(benchmark helper).

Not a trulyopen module and not a trulyopen dependency: `benchmarks/data_scale.py` runs it with a
separate interpreter that has datatrove installed (`python3 -m venv .venv-bench &&
.venv-bench/bin/pip install 'datatrove[processing]' orjson spacy`). Linux only (it reads /proc).

    .venv-bench/bin/python benchmarks/_datatrove_scale.py INPUT_DIR OUT.json --work WORK_DIR \\
        --tokenizer TOKENIZER.json --tasks N --workers W [--word-tokenizer spacy|whitespace] [--seed 1]

INPUT_DIR's `*.jsonl.gz` files (as benchmarks/_scale_corpus.py writes them; other files there, such
as planted.json, are not read) go through five LocalPipelineExecutor runs, one after the other, each
with at most `--workers` processes at a time:

  signatures  JsonlReader(gzip, text_key="text", id_key="id") -> MinhashDedupSignature  --tasks tasks
  buckets     MinhashDedupBuckets                                          num_buckets (14) tasks
  clusters    MinhashDedupCluster(save_cluster_id=True)                    1 task, in this process
  filter      JsonlReader -> MinhashDedupFilter -> JsonlWriter(WORK/output)     --tasks tasks
  tokenize    JsonlReader(WORK/output) -> DocumentTokenizer(tokenizer_name_or_path=TOKENIZER.json)
                                                                                --tasks tasks

with MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, seed=--seed (default 1, datatrove's))
and datatrove's default 64-bit xxhash; words are the tokens of datatrove's default word tokenizer
(spaCy's blank English one) on its simplified text, or, with --word-tokenizer whitespace, str.split()'s.
datatrove needs stage 2's task count to be a multiple of num_buckets (--bucket-tasks), and stage 4's
to equal stage 1's (the .remove files are per stage-1 rank, indexed by position in its stream); a
task of stages 1, 4 and 5 reads whole files, so tasks beyond the number of files idle. The tokenizer
file is loaded by datatrove's load_tokenizer (Tokenizer.from_file when the path is a file, else
Tokenizer.from_pretrained). Two settings differ from datatrove's defaults so that it does the work
trulyopen's data stage does (plain JSONL out; token shards in document order): JsonlWriter writes
uncompressed JSONL (--output-compression gzip: datatrove's default, gzip level 9), and
DocumentTokenizer keeps document order (--shuffle: its default, which copies every token file once
more). No cleaning step runs. The tokenizers library encodes each batch on all cores, in every
worker, unless --tokenizers-parallelism false (TOKENIZERS_PARALLELISM=false, set before any process
starts); CPU seconds (below) show what that costs.

Two small steps of this script ride along: after the reader in stage 1, `RecordIds` writes each
document's id (in stream order, the index of the .remove/.clusters files) and counts its text's UTF-8
bytes; at the end of every stage's pipeline, `RssProbe` records its process's peak RSS and CPU time
(getrusage). Both cost far under 1% of stage 1.

OUT.json: seconds per stage (the executor's run(), wall clock, which includes starting its Manager
and pool) and in all; datatrove's own time per step, summed over tasks; CPU seconds per stage (its
pool workers' user + system time, all threads, plus this process's during the stage) and raw MB per
CPU second; input compressed bytes, raw text bytes read, docs in and out, near duplicates removed,
tokens written; throughput (MB/s of raw text, in all and per worker); with a planted.json
(INPUT_DIR's by default, or --planted), recall: the share of its (original, copy) pairs that datatrove
puts in one cluster, the share where it removes one of the two, the pairs missed, and removed
documents in no pair; memory: the peak RSS of every process, sampled every --sample-interval s from
/proc and, where RssProbe ran, exact (ru_maxrss), by role (driver: this process, which also runs
every task when --workers is 1, and stage 3 always; manager: the multiprocess Manager server that each
executor forks from the driver; forkserver: started once, at the first pool; worker: pool processes
that the forkserver forks, a new pool per stage, each running several tasks; resource_tracker), and
the peak of the sum over all processes at one sample, per stage (RSS counts shared pages in every
process that maps them); and the removed documents' ids and the clusters (lists of ids).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import struct
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # stage 3 draws a tqdm bar

from _datatrove_minhash import WhitespaceTokenizer, _version, minhash_config  # noqa: E402 (str.split() words, as in that benchmark)
from datatrove.executor import LocalPipelineExecutor  # noqa: E402
from datatrove.pipeline.base import PipelineStep  # noqa: E402
from datatrove.pipeline.dedup.minhash import (  # noqa: E402
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.readers import JsonlReader  # noqa: E402
from datatrove.pipeline.tokens import DocumentTokenizer  # noqa: E402
from datatrove.pipeline.writers import JsonlWriter  # noqa: E402
from datatrove.utils.typeshelper import Languages  # noqa: E402
from loguru import logger  # noqa: E402

STAGES = ("signatures", "buckets", "clusters", "filter", "tokenize")


class RecordIds(PipelineStep):
    """Writes each document's id, one a line, in stream order, and counts its text's UTF-8 bytes."""

    name = "record ids"
    type = "bench"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data, rank: int = 0, world_size: int = 1):
        os.makedirs(self.folder, exist_ok=True)
        n = raw = 0
        with open(f"{self.folder}/{rank:05d}.ids", "w", encoding="utf-8") as f:
            for doc in data:
                f.write(f"{doc.id}\n")
                n += 1
                raw += len(doc.text.encode("utf-8"))
                yield doc
        with open(f"{self.folder}/{rank:05d}.json", "w") as f:
            json.dump({"docs": n, "raw_text_bytes": raw}, f)


class RssProbe(PipelineStep):
    """Last step of a pipeline: drains it, then records this process's peak RSS."""

    name = "rss probe"
    type = "bench"

    def __init__(self, folder: str, stage: str):
        super().__init__()
        self.folder, self.stage = folder, stage

    def run(self, data, rank: int = 0, world_size: int = 1):
        if data is not None:
            for _ in data:
                pass
        os.makedirs(self.folder, exist_ok=True)
        rec = {
            "stage": self.stage,
            "rank": rank,
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "ru_maxrss_bytes": (ru := resource.getrusage(resource.RUSAGE_SELF)).ru_maxrss * 1024,
            "cpu_s": ru.ru_utime + ru.ru_stime,  # all its threads (the tokenizers library starts some)
            "time": time.time(),
        }
        with open(f"{self.folder}/{self.stage}_{rank:05d}.json", "w") as f:
            json.dump(rec, f)


class Sampler(threading.Thread):
    """Every `interval` s: the RSS and CPU time of this process and all its descendants (from
    /proc/PID/stat; only pids above this one's are read, as descendants' are), max RSS kept by pid."""

    PAGE = os.sysconf("SC_PAGE_SIZE")
    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval = interval
        self.me = os.getpid()
        self.procs: dict[int, dict] = {}
        self.stage = "setup"
        self.peak_sum: dict[str, int] = {}
        self.samples = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)
        self.sample()

    def sample(self) -> None:
        stats = {}
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) >= self.me:
                try:
                    with open(f"/proc/{name}/stat", "rb") as f:
                        rest = f.read().rsplit(b")", 1)[1].split()
                except OSError:
                    continue
                # fields 4 (ppid), 14-15 (utime, stime, clock ticks), 24 (rss, pages)
                stats[int(name)] = (int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[21]))
        mine, frontier = {self.me}, [self.me]
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        while frontier:
            for c in children.get(frontier.pop(), []):
                if c not in mine:
                    mine.add(c)
                    frontier.append(c)
        total = 0
        for pid in mine:
            if pid not in stats:
                continue
            ppid, ticks, pages = stats[pid]
            rss = pages * self.PAGE
            rec = self.procs.get(pid)
            if rec is None:
                try:
                    cmd = (
                        Path(f"/proc/{pid}/cmdline")
                        .read_bytes()
                        .replace(b"\0", b" ")
                        .decode(errors="replace")
                    )
                except OSError:
                    cmd = "?"
                rec = self.procs[pid] = {
                    "pid": pid,
                    "ppid": ppid,
                    "cmdline": cmd[:160],
                    "max_rss_bytes": 0,
                    "stages": [],
                }
            total += rss
            rec["max_rss_bytes"] = max(rec["max_rss_bytes"], rss)
            rec["cpu_s_sampled"] = ticks / self.TICK
            if self.stage not in rec["stages"]:
                rec["stages"].append(self.stage)
        self.peak_sum[self.stage] = max(self.peak_sum.get(self.stage, 0), total)
        self.samples += 1


def roles(procs: dict[int, dict], driver: int) -> None:
    """Label each sampled process: driver, manager, forkserver, worker, resource_tracker, other."""
    forkservers = {pid for pid, r in procs.items() if "forkserver" in r["cmdline"] and r["ppid"] == driver}
    for pid, r in procs.items():
        if pid == driver:
            r["role"] = "driver"
        elif pid in forkservers:
            r["role"] = "forkserver"
        elif r["ppid"] in forkservers:
            r["role"] = "worker"
        elif "resource_tracker" in r["cmdline"]:
            r["role"] = "resource_tracker"
        elif r["ppid"] == driver:
            r["role"] = "manager"  # multiprocess.Manager(): forked from the driver, one per executor
        else:
            r["role"] = "other"


def read_u32_pairs(path: Path) -> list[tuple[int, int]]:
    return list(struct.iter_unpack("<2I", path.read_bytes())) if path.exists() else []


def read_u32(path: Path) -> list[int]:
    return [i for (i,) in struct.iter_unpack("<I", path.read_bytes())] if path.exists() else []


def step_times(stats_file: Path) -> dict[str, float]:
    """datatrove's time per pipeline step, summed over the stage's tasks (from its stats.json)."""
    if not stats_file.exists():
        return {}
    out = {}
    for step in json.loads(stats_file.read_text()):
        t = step.get("time_stats")
        if isinstance(t, dict):
            out[step.get("name", "?")] = float(t.get("total", 0.0))
        elif isinstance(t, int | float):
            out[step.get("name", "?")] = float(t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument(
        "--work", type=Path, required=True, help="working folder (its stage folders are replaced)"
    )
    ap.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer.json file (or hub name)")
    ap.add_argument("--tasks", type=int, required=True, help="tasks of stages 1, 4 and 5")
    ap.add_argument("--workers", type=int, required=True, help="processes at a time in every stage")
    ap.add_argument("--word-tokenizer", choices=["spacy", "whitespace"], default="spacy")
    ap.add_argument("--seed", type=int, default=1, help="MinhashConfig.seed (default 1, datatrove's)")
    ap.add_argument("--n-grams", type=int, default=5)
    ap.add_argument("--buckets", type=int, default=14)
    ap.add_argument("--hashes-per-bucket", type=int, default=8)
    ap.add_argument("--bucket-tasks", type=int, default=None, help="stage 2 tasks (a multiple of --buckets)")
    ap.add_argument("--output-compression", choices=["none", "gzip"], default="none")
    ap.add_argument(
        "--shuffle", action="store_true", help="DocumentTokenizer's document shuffle (its default)"
    )
    ap.add_argument("--eos-token", default=None, help="DocumentTokenizer's eos_token (default: none)")
    ap.add_argument(
        "--tokenizers-parallelism",
        choices=["default", "false"],
        default="default",
        help="false: TOKENIZERS_PARALLELISM=false, one thread per DocumentTokenizer task (default: the "
        "tokenizers library's own choice, which encodes batches on all cores in every worker)",
    )
    ap.add_argument("--planted", type=Path, default=None, help="planted.json (default: INPUT_DIR's)")
    ap.add_argument("--sample-interval", type=float, default=0.2)
    ap.add_argument("--log-level", default="WARNING")
    args = ap.parse_args()
    logger.remove()
    logger.add(sys.stderr, level=args.log_level)

    if args.tokenizers_parallelism == "false":  # before any process starts: the workers inherit it
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    inp = args.input_dir.resolve()
    files = sorted(inp.glob("*.jsonl.gz"))
    if not files:
        sys.exit(f"no *.jsonl.gz files in {inp}")
    work = args.work.resolve()
    dirs = {k: work / k for k in ("sigs", "buckets", "remove", "output", "tokens", "ids", "rss", "logs")}
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    cfg = minhash_config(args)
    language = Languages.english if args.word_tokenizer == "spacy" else WhitespaceTokenizer()
    bucket_tasks = args.bucket_tasks or args.buckets
    if bucket_tasks % args.buckets:
        sys.exit("--bucket-tasks must be a multiple of --buckets")

    def reader(folder) -> JsonlReader:
        return JsonlReader(
            str(folder),
            compression="gzip" if folder == inp or args.output_compression == "gzip" else None,
            text_key="text",
            id_key="id",
            glob_pattern="*.jsonl.gz" if folder == inp or args.output_compression == "gzip" else "*.jsonl",
        )

    rss_dir = str(dirs["rss"])
    out_comp = None if args.output_compression == "none" else "gzip"
    out_name = "${rank}.jsonl" + (".gz" if out_comp else "")
    pipelines = {
        "signatures": (
            [
                reader(inp),
                RecordIds(str(dirs["ids"])),
                MinhashDedupSignature(output_folder=str(dirs["sigs"]), config=cfg, language=language),
            ],
            args.tasks,
        ),
        "buckets": (
            [
                MinhashDedupBuckets(
                    input_folder=str(dirs["sigs"]), output_folder=str(dirs["buckets"]), config=cfg
                )
            ],
            bucket_tasks,
        ),
        "clusters": (
            [
                MinhashDedupCluster(
                    input_folder=str(dirs["buckets"]),
                    output_folder=str(dirs["remove"]),
                    config=cfg,
                    save_cluster_id=True,
                )
            ],
            1,
        ),
        "filter": (
            [
                reader(inp),
                MinhashDedupFilter(input_folder=str(dirs["remove"])),
                JsonlWriter(str(dirs["output"]), output_filename=out_name, compression=out_comp),
            ],
            args.tasks,
        ),
        "tokenize": (
            [
                reader(dirs["output"]),
                DocumentTokenizer(
                    output_folder=str(dirs["tokens"]),
                    tokenizer_name_or_path=args.tokenizer,
                    eos_token=args.eos_token,
                    shuffle_documents=args.shuffle,
                ),
            ],
            args.tasks,
        ),
    }

    sampler = Sampler(args.sample_interval)
    sampler.start()
    seconds: dict[str, float] = {}
    driver_cpu: dict[str, float] = {}
    t_all = time.perf_counter()
    for stage in STAGES:
        steps, tasks = pipelines[stage]
        ex = LocalPipelineExecutor(
            pipeline=[*steps, RssProbe(rss_dir, stage)],
            tasks=tasks,
            workers=min(args.workers, tasks),
            logging_dir=str(dirs["logs"] / stage),
            skip_completed=False,
        )
        sampler.stage = stage
        t, c = time.perf_counter(), _cpu_self()
        ex.run()
        seconds[stage] = time.perf_counter() - t
        driver_cpu[stage] = _cpu_self() - c
    total = time.perf_counter() - t_all
    sampler.stage = "end"
    sampler.stop.set()
    sampler.join()

    # ---- what came out (untimed)
    ids_by_rank: dict[int, list[str]] = {}
    docs_in = raw_bytes = 0
    for p in sorted(dirs["ids"].glob("*.ids")):
        rank = int(p.stem)
        ids_by_rank[rank] = p.read_text(encoding="utf-8").splitlines()
        c = json.loads((dirs["ids"] / f"{rank:05d}.json").read_text())
        docs_in += c["docs"]
        raw_bytes += c["raw_text_bytes"]
    removed: list[str] = []
    clusters: dict[int, list[str]] = {}
    for rank, ids in ids_by_rank.items():
        removed += [ids[i] for i in read_u32(dirs["remove"] / f"{rank:06d}.remove")]
        for i, c in read_u32_pairs(dirs["remove"] / f"{rank:06d}.clusters"):
            clusters.setdefault(c, []).append(ids[i])
    docs_out = 0
    for p in dirs["output"].iterdir():
        if p.is_file() and ".jsonl" in p.name:
            with gzip.open(p, "rb") if p.name.endswith(".gz") else p.open("rb") as f:
                docs_out += sum(1 for _ in f)
    tokens = 0
    for p in dirs["tokens"].glob("*.metadata"):
        lines = p.read_text().splitlines()
        tokens += int(lines[1]) if len(lines) > 1 else 0

    recall = None
    planted_path = args.planted or (inp / "planted.json")
    if planted_path.exists():
        pairs = json.loads(planted_path.read_text())["pairs"]
        cluster_of = {i: c for c, members in clusters.items() for i in members}
        removed_set = set(removed)
        same = sum(1 for a, b in pairs if a in cluster_of and cluster_of.get(a) == cluster_of.get(b))
        one_removed = sum(1 for a, b in pairs if a in removed_set or b in removed_set)
        planted_ids = {i for pair in pairs for i in pair}
        recall = {
            "planted_file": str(planted_path),
            "pairs": len(pairs),
            "recall": same / len(pairs) if pairs else None,
            "pair_member_removed": one_removed / len(pairs) if pairs else None,
            "missed": [
                [a, b] for a, b in pairs if not (a in cluster_of and cluster_of.get(a) == cluster_of.get(b))
            ],
            "removed_not_in_a_pair": len(removed_set - planted_ids),
        }

    # ---- memory
    procs = sampler.procs
    me = os.getpid()
    roles(procs, me)
    probes = [json.loads(p.read_text()) for p in sorted(dirs["rss"].glob("*.json"))]
    for pr in probes:
        r = procs.setdefault(
            pr["pid"],
            {
                "pid": pr["pid"],
                "ppid": pr["ppid"],
                "cmdline": "?",
                "max_rss_bytes": 0,
                "stages": [],
                "role": "?",
            },
        )
        r["ru_maxrss_bytes"] = max(r.get("ru_maxrss_bytes", 0), pr["ru_maxrss_bytes"])
        r["cpu_s"] = max(r.get("cpu_s", 0.0), pr["cpu_s"])
        r.setdefault("tasks", []).append(f"{pr['stage']}:{pr['rank']}")
        if r.get("role") in (None, "?"):
            r["role"] = "driver" if pr["pid"] == me else "worker"
    driver_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    children_maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    procs[me]["ru_maxrss_bytes"] = driver_maxrss
    by_role: dict[str, dict] = {}
    for r in procs.values():
        peak = max(r["max_rss_bytes"], r.get("ru_maxrss_bytes", 0))
        r["peak_rss_bytes"] = peak
        b = by_role.setdefault(r["role"], {"processes": 0, "max_peak_rss_bytes": 0})
        b["processes"] += 1
        b["max_peak_rss_bytes"] = max(b["max_peak_rss_bytes"], peak)

    # CPU seconds per stage: its pool workers' own (ru_utime + ru_stime when their last task ended;
    # a pool lives for one stage) plus the driver's during the stage (stage 3 runs in the driver;
    # the driver's share includes this script's sampler thread); the Manager servers' and the
    # forkserver's CPU (last sample) is reported apart, as overhead.
    cpu_by_stage = dict(driver_cpu)
    for r in procs.values():
        if r["role"] == "worker" and r.get("tasks"):
            st = r["tasks"][0].split(":")[0]
            cpu_by_stage[st] = cpu_by_stage.get(st, 0.0) + r.get("cpu_s", r.get("cpu_s_sampled", 0.0))
    overhead_cpu = sum(
        r.get("cpu_s_sampled", 0.0) for r in procs.values() if r["role"] in ("manager", "forkserver")
    )
    cpu_total = sum(cpu_by_stage.values())

    raw_mb = raw_bytes / 1e6
    result = {
        "tool": "datatrove",
        "datatrove": metadata.version("datatrove"),
        "spacy": _version("spacy"),
        "tokenizers": _version("tokenizers"),
        "python": sys.version.split()[0],
        "input_dir": str(inp),
        "input_files": len(files),
        "tasks": args.tasks,
        "bucket_tasks": bucket_tasks,
        "workers": args.workers,
        "cpu_count": os.cpu_count(),
        "word_tokenizer": args.word_tokenizer,
        "tokenizer": args.tokenizer,
        "output_compression": args.output_compression,
        "shuffle": args.shuffle,
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "unset (library default)"),
        "config": str(cfg),
        "seed": args.seed,
        "seconds": {**seconds, "total": total},
        "step_seconds_summed_over_tasks": {s: step_times(dirs["logs"] / s / "stats.json") for s in STAGES},
        "input_compressed_bytes": sum(p.stat().st_size for p in files),
        "raw_text_bytes": raw_bytes,
        "docs_in": docs_in,
        "docs_out": docs_out,
        "near_duplicates_removed": len(removed),
        "tokens": tokens,
        "throughput": {
            "raw_mb_per_s": raw_mb / total,
            "raw_mb_per_s_per_worker": raw_mb / total / args.workers,
            "by_stage_raw_mb_per_s": {s: raw_mb / t for s, t in seconds.items()},
            "by_stage_raw_mb_per_s_per_worker": {
                s: raw_mb / t / min(args.workers, pipelines[s][1]) for s, t in seconds.items()
            },
        },
        "cpu_seconds": {**cpu_by_stage, "total": cpu_total, "managers_and_forkserver": overhead_cpu},
        "raw_mb_per_cpu_second": {
            **{st: raw_mb / c for st, c in cpu_by_stage.items() if c > 0},
            "total": raw_mb / cpu_total if cpu_total else None,
        },
        "recall": recall,
        "memory": {
            "driver_ru_maxrss_bytes": driver_maxrss,
            "children_ru_maxrss_bytes": children_maxrss,  # largest reaped child of the driver
            "peak_rss_by_role": by_role,
            "peak_sum_rss_bytes_by_stage": sampler.peak_sum,
            "samples": sampler.samples,
            "sample_interval_s": args.sample_interval,
            "processes": sorted(procs.values(), key=lambda r: r["pid"]),
        },
        "removed_ids": removed,
        "clusters": [members for _, members in sorted(clusters.items())],
    }
    args.out.write_text(json.dumps(result))
    print(
        f"datatrove {result['datatrove']}: {docs_in:,} docs, {raw_mb:,.1f} MB of text in {total:.1f} s "
        f"({raw_mb / total:.2f} MB/s, {raw_mb / total / args.workers:.2f} MB/s per worker); "
        + ", ".join(f"{s} {t:.1f} s" for s, t in seconds.items())
        + f"; removed {len(removed):,}"
        + (f"; recall {recall['recall']:.4f} of {recall['pairs']:,} planted pairs" if recall else "")
    )


def _cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


if __name__ == "__main__":
    main()
