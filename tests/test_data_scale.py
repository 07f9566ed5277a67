"""The data stage at corpus scale: compressed and columnar inputs, ids and metadata, logical tasks,
and the same bytes from local processes (1 and 2 workers), Ray and Slurm, after kill -9 too."""

import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard
from typer.testing import CliRunner

from trulyopen import pipeline
from trulyopen.cli import app
from trulyopen.data.sources import Document, Problem, input_files, read_source
from trulyopen.ledger import Ledger
from trulyopen.recipe import SourceConfig, load_recipe

from .conftest import make_doc, near_copy

DATA_STAGES = ("data", "tokenizer", "shards")


def _records(rng: random.Random, start: int, n: int) -> list[dict]:
    return [
        {"id": f"doc-{start + i}", "url": f"https://example.org/{start + i}", "text": make_doc(rng, 20)}
        for i in range(n)
    ]


def build_jsonl_corpus(root: Path) -> dict:
    """24 records in each of a gzip, a zstd and a plain JSONL file and a Parquet file of 4 row groups;
    doc-3 copied exactly into the zstd file, doc-5 nearly into the Parquet file, doc-7 quoted by
    an evaluation set."""
    rng = random.Random(0)
    jsonl = root / "jsonl"
    jsonl.mkdir(parents=True)
    a, b, c, d = (_records(rng, k * 24, 24) for k in range(4))
    b[10] = {**b[10], "text": a[3]["text"]}  # exact copy of doc-3 (as doc-34)
    d[5] = {**d[5], "text": near_copy(a[5]["text"], rng)}  # near copy of doc-5 (as doc-77)
    with gzip.open(jsonl / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in a)
    (jsonl / "b.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in b).encode())
    )
    (jsonl / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in c))
    pq.write_table(pa.Table.from_pylist(d), root / "d.parquet", row_group_size=6)
    evals = root / "evals.jsonl"
    evals.write_text(json.dumps({"text": " ".join(a[7]["text"].split()[20:50])}) + "\n")
    return {"jsonl": jsonl, "parquet": root / "d.parquet", "evals": evals, "records": a + b + c + d}


def write_scale_recipe(root: Path, corpus: dict, **data) -> Path:
    common = {"license": "CC-BY-4.0", "id_field": "id", "meta_fields": ["url"]}
    recipe = {
        "name": "scale",
        "data": {
            "sources": [
                {"name": "web", "type": "jsonl", "path": str(corpus["jsonl"]), **common},
                {"name": "tab", "type": "parquet", "path": str(corpus["parquet"]), **common},
            ],
            "filters": {"min_chars": 32},
            "decontamination": {"eval_files": [str(corpus["evals"])]},
            "split": {"val_fraction": 0.2},
            "task_bytes": 8000,  # many small tasks: plain JSONL cut in byte ranges, row groups grouped
            **data,
        },
        "tokenizer": {"vocab_size": 400},
        "shards": {"shard_tokens": 3000},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _hashes(run_dir: Path) -> dict[str, str]:
    outputs = [o for e in Ledger(run_dir).entries() if e["stage"] in DATA_STAGES for o in e["outputs"]]
    return {o["path"]: o["sha256"] for o in outputs}


def _data(recipe: Path, run_dir: Path, workers: int, overrides=()) -> Path:
    return pipeline.run(load_recipe(recipe, list(overrides)), run_dir, until="shards", workers=workers)


@pytest.fixture(scope="module")
def scale(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    corpus = build_jsonl_corpus(root)
    recipe = write_scale_recipe(root, corpus)
    run = _data(recipe, root / "one", workers=1)
    return {"root": root, "corpus": corpus, "recipe": recipe, "run": run}


@pytest.fixture(scope="session")
def ray_cluster():
    """One small local Ray cluster shared by the tests that use it."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, object_store_memory=80 * 2**20, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _corpus(run: Path) -> list[dict]:
    return [json.loads(x) for s in ("train", "val") for x in (run / f"data/corpus/{s}.jsonl").open()]


def test_gz_zst_parquet_read_with_ids_metadata_and_tasks(scale):
    run = scale["run"]
    docs = {d["id"]: d for d in _corpus(run)}
    # 96 records: the exact copy, the near copy and the contaminated one are gone
    assert len(docs) == 93
    assert "web/doc-3" in docs and "web/doc-34" not in docs and "tab/doc-77" not in docs
    assert "web/doc-7" not in docs
    d = docs["web/doc-40"]  # line 17 of the zstd file
    assert d["meta"] == {"path": "b.jsonl.zst", "line": 17, "url": "https://example.org/40"}
    assert docs["tab/doc-80"]["meta"] == {"path": "d.parquet", "row": 8, "url": "https://example.org/80"}
    assert docs["web/doc-60"]["meta"]["line"] == 13  # in a byte-range task of the plain file, not its first
    removed = {r["id"]: r for r in map(json.loads, (run / "data/removed.jsonl").open())}
    assert removed["web/doc-34"]["duplicate_of"] == "web/doc-3"
    assert removed["tab/doc-77"] == {
        "id": "tab/doc-77",
        "step": "near_dedup",
        "reason": "near_duplicate",
        "duplicate_of": "web/doc-5",
        "meta": {"url": "https://example.org/77"},
    }
    assert removed["web/doc-7"]["reason"] == "eval_overlap"
    m = json.loads((run / "data/manifest.json").read_text())
    layout = m["tasks"]["layout"]
    assert m["tasks"]["count"] == len(layout) > 6
    assert {t["kind"] for t in layout} == {"lines", "row_groups"}
    assert sum(1 for t in layout if t.get("file", "").endswith("c.jsonl")) > 1  # plain JSONL was cut
    assert m["sources"][0]["meta_fields"] == ["url"] and m["sources"][0]["id_field"] == "id"
    web, tab = m["sources"]
    assert (web["docs_read"], tab["docs_read"]) == (72, 24)  # per-source counts
    assert (web["docs_kept"], tab["docs_kept"]) == (70, 23) and web["problems"] == 0
    assert m["steps"][0]["bytes_in"] == sum(f["size"] for s in m["sources"] for f in s["files"])
    assert "logical tasks" in (run / "data/DATACARD.md").read_text()


def test_corpus_bytes_do_not_depend_on_the_task_layout(scale, tmp_path):
    whole = _data(scale["recipe"], tmp_path / "whole", 1, ["data.task_bytes=100000000"])
    assert json.loads((whole / "data/curation.json").read_text())["tasks"]["count"] == 4  # one per file
    for name in ("corpus/train.jsonl", "corpus/val.jsonl"):
        assert (whole / "data" / name).read_bytes() == (scale["run"] / "data" / name).read_bytes()


def test_two_workers_and_ray_give_the_same_bytes(scale, tmp_path, ray_cluster):
    two = _data(scale["recipe"], tmp_path / "two", workers=2)
    on_ray = _data(scale["recipe"], tmp_path / "ray", 2, ["data.executor=ray"])
    assert _hashes(two) == _hashes(scale["run"]) == _hashes(on_ray)
    fingerprint = {
        json.loads((r / "data/shards/shards.json").read_text())["fingerprint"] for r in (two, on_ray)
    }
    assert fingerprint == {json.loads((scale["run"] / "data/shards/shards.json").read_text())["fingerprint"]}
    assert not (tmp_path / "ray/data/work").exists()  # per-task files go once the stage is done


def test_corrupt_compressed_file_is_named_with_its_offset_and_skipped(tmp_path, capsys):
    rng = random.Random(1)
    good = "".join(json.dumps(r) + "\n" for r in _records(rng, 0, 30)).encode()
    blob = gzip.compress(good)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cut.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    src = SourceConfig(name="w", type="jsonl", path=tmp_path / "in", license="MIT", id_field="id")
    items = list(read_source(src, input_files(src), "skip"))
    docs = [i for i in items if isinstance(i, Document)]
    (problem,) = [i for i in items if isinstance(i, Problem)]
    assert 0 < len(docs) < 30 and docs[0].id == "w/doc-0"
    assert "cut.jsonl.gz" in problem.file and "truncated gzip data" in problem.reason
    assert f"at byte {len(blob) // 2}" in problem.reason
    garbled = bytearray(blob)
    garbled[len(blob) // 2 : len(blob) // 2 + 64] = bytes(64)  # zeros in the middle of the deflate stream
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "bad.jsonl.gz").write_bytes(bytes(garbled))
    bad = SourceConfig(name="w", type="jsonl", path=tmp_path / "bad", license="MIT")
    (p,) = [i for i in read_source(bad, input_files(bad), "skip") if isinstance(i, Problem)]
    assert "gzip data" in p.reason and "at byte" in p.reason and p.file.endswith("bad.jsonl.gz")
    # the run goes on, and says on the terminal what it skipped and where the list is
    corpus = {"jsonl": tmp_path / "in", "parquet": None}
    recipe = write_scale_recipe(tmp_path, {**corpus, "evals": tmp_path / "in" / "cut.jsonl.gz"})
    tree = yaml.safe_load(recipe.read_text())
    tree["data"]["sources"] = tree["data"]["sources"][:1]
    tree["data"]["decontamination"] = {}
    recipe.write_text(yaml.safe_dump(tree))
    run = pipeline.run(load_recipe(recipe), tmp_path / "run", until="data", workers=1)
    err = capsys.readouterr().err  # a warning: on stderr, one line
    assert "warning: data: 1 input records or files skipped" in err and "cut.jsonl.gz" in err
    assert "problems.jsonl" in err
    assert json.loads((run / "data/problems.jsonl").read_text())["reason"] == problem.reason
    result = CliRunner().invoke(
        app, ["data", str(recipe), "--run-dir", str(tmp_path / "strict"), "--set", "data.strict=true"]
    )
    assert result.exit_code == 2 and "cut.jsonl.gz" in result.output and "truncated gzip" in result.output


def test_missing_id_field_is_named_by_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"id": "a", "text": "one"}\n{"text": "two"}\n{"id": 7, "text": "three", "url": "u"}\n')
    src = SourceConfig(name="s", type="jsonl", path=f, license="MIT", id_field="id", meta_fields=["url"])
    items = list(read_source(src, input_files(src), "skip"))
    assert [i.id for i in items if isinstance(i, Document)] == ["s/a", "s/7"]
    assert items[2].meta == {"path": "d.jsonl", "line": 3, "url": "u"}
    assert str(items[1]) == f"{f}:2: id field 'id' missing"


def test_fsspec_url_takes_the_same_path_as_a_local_directory(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    rng = random.Random(2)
    records = _records(rng, 0, 5)
    with fs.open("/bucket/crawl/part-0.jsonl.gz", "wb") as f:
        f.write(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    (tmp_path / "crawl").mkdir()
    (tmp_path / "crawl" / "part-0.jsonl.gz").write_bytes(fs.cat("/bucket/crawl/part-0.jsonl.gz"))
    local = SourceConfig(name="c", type="jsonl", path=tmp_path / "crawl", license="MIT", id_field="id")
    remote = SourceConfig(name="c", type="jsonl", path="memory://bucket/crawl", license="MIT", id_field="id")
    assert isinstance(remote.path, str) and input_files(remote) == [
        fs.unstrip_protocol("/bucket/crawl/part-0.jsonl.gz")
    ]
    a = [(d.id, d.text, d.meta) for d in read_source(local, input_files(local), "skip")]
    b = [(d.id, d.text, d.meta) for d in read_source(remote, input_files(remote), "skip")]
    assert a == b and len(a) == 5 and a[0][2] == {"path": "part-0.jsonl.gz", "line": 1}


# ----------------------------------------------------------------------------- kill -9


def _cmd(recipe: Path, run_dir: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "trulyopen", "data", str(recipe), "--run-dir", str(run_dir)] + [
        "--workers",
        str(workers),
    ]


def _wait_for(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        if path.is_dir() and len(list(path.glob("*.json"))) >= n:
            return
        time.sleep(0.05)


def test_kill_9_of_a_worker_and_of_the_driver_then_the_same_bytes(scale, tmp_path):
    psutil = pytest.importorskip("psutil")
    env = {**os.environ, "TRULYOPEN_QUIET": "1"}
    run_dir = tmp_path / "killed"
    done = run_dir / "data/work/steps/analyse/done"
    # a worker killed part-way: the pool is made anew and its task runs again
    proc = subprocess.Popen(_cmd(scale["recipe"], run_dir, 2), env=env, stderr=subprocess.PIPE, text=True)
    _wait_for(done, 1, proc)
    workers = [
        c
        for c in psutil.Process(proc.pid).children(recursive=True)
        if "multiprocessing" in " ".join(c.cmdline())
    ]
    assert workers, "no worker process seen"
    workers[0].send_signal(signal.SIGKILL)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert _hashes(run_dir) == _hashes(scale["run"])
    # the driver killed (with its workers) after some tasks finished: the next run resumes from them
    shutil.rmtree(run_dir)
    proc = subprocess.Popen(_cmd(scale["recipe"], run_dir, 2), env=env, start_new_session=True)
    _wait_for(done, 3, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(done.glob("*.json")))
    assert finished >= 3 and not (run_dir / "data/corpus/train.jsonl").exists()
    out = subprocess.run(
        _cmd(scale["recipe"], run_dir, 1), env={**env, "TRULYOPEN_QUIET": "0"}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert f"({finished} done before, resumed)" in out.stderr.splitlines()[0]
    assert _hashes(run_dir) == _hashes(scale["run"])


# ----------------------------------------------------------------------------- executors' errors


def test_ray_missing_or_unreachable_is_exit_code_2(scale, tmp_path):
    env = {**os.environ, "TRULYOPEN_QUIET": "1"}
    unreachable = subprocess.run(
        _cmd(scale["recipe"], tmp_path / "r", 1)
        + ["--set", "data.executor=ray", "--set", "data.ray.address=127.0.0.1:9"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert unreachable.returncode == 2
    assert unreachable.stderr.startswith("error: data.ray.address: no Ray cluster answers at 127.0.0.1:9")
    # without Ray installed (hidden from this interpreter): what to install
    hide = "import sys; sys.modules['ray'] = None; from trulyopen.cli import app; app()"
    missing = subprocess.run(
        [sys.executable, "-c", hide, "data", str(scale["recipe"]), "--run-dir", str(tmp_path / "m")]
        + ["--set", "data.executor=ray"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "pip install -e '.[ray]'" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- Slurm


def fail_task(ctx: dict, task: dict) -> dict:
    """A task that fails, for the Slurm test (imported by the array job from this module)."""
    raise RuntimeError(f"task {task['n']} fails on purpose")


def test_slurm_job_script_runs_a_task_with_the_slurm_variables(tmp_path):
    """The generated array script, run by hand as Slurm would run element 1."""
    from trulyopen.data.executor import TaskStep
    from trulyopen.data.executor.slurm import job_script
    from trulyopen.files import write_json
    from trulyopen.recipe import SlurmConfig

    step = TaskStep("echo", "tests.test_data_scale:echo_task", {}, [{"n": 5}, {"n": 6}], str(tmp_path / "s"))
    write_json(tmp_path / "s/spec.json", step.__dict__)
    write_json(tmp_path / "s/todo.json", [0, 1])
    script = tmp_path / "s/job.sbatch"
    script.write_text(job_script(step, SlurmConfig(), 0, 2))
    text = script.read_text()
    assert "#SBATCH --array=0-1" in text and f"#SBATCH --output={tmp_path}/s/logs/%A_%a.out" in text
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_JOB_ID": "42", "SLURM_JOB_ID": "43"}
    subprocess.run(["bash", str(script)], env=env, check=True, cwd=Path(__file__).parent.parent)
    done = json.loads(step.done_file(1).read_text())
    assert done.pop("peak_rss_mb") > 0  # the worker's peak memory rides along, for the progress line
    assert done == {"n": 6, "echoed": True}
    assert not step.done_file(0).exists()


def echo_task(ctx: dict, task: dict) -> dict:
    return {**task, "echoed": True}


needs_slurm = pytest.mark.skipif(
    shutil.which("sbatch") is None or subprocess.run(["sinfo"], capture_output=True).returncode != 0,
    reason="needs a running Slurm (.ci/slurm-up.sh starts a one-node cluster)",
)


@needs_slurm
def test_slurm_job_arrays_give_the_same_bytes(scale, tmp_path):
    """Every step as a real job array (one task per input file, to keep the arrays short)."""
    whole = ["data.task_bytes=100000000"]
    local = _data(scale["recipe"], tmp_path / "local", 1, whole)
    run = _data(
        scale["recipe"], tmp_path / "slurm", 1, whole + ["data.executor=slurm", "data.slurm.poll_seconds=0.5"]
    )
    assert _hashes(run) == _hashes(local)
    logs = list((tmp_path / "slurm/data").rglob("*.out"))
    assert not logs  # the work folder, job scripts and logs included, goes once the stage is done


@needs_slurm
def test_a_failing_slurm_task_names_its_job_and_log(tmp_path):
    from trulyopen.data.executor import TaskFailed, TaskStep, run_step
    from trulyopen.data.executor.slurm import SlurmExecutor
    from trulyopen.recipe import SlurmConfig

    step = TaskStep("boom", "tests.test_data_scale:fail_task", {}, [{"n": 0}], str(tmp_path / "boom"))
    with pytest.raises(
        TaskFailed, match=r"Slurm job \d+ array task 0 \(task 0\) did not finish; log: .*boom/logs/\d+_0.out"
    ) as e:
        run_step(SlurmExecutor(SlurmConfig(poll_seconds=0.5)), step)
    log = Path(str(e.value).split("log: ")[1].split(";")[0])
    assert "task 0 fails on purpose" in log.read_text()


def test_a_task_that_keeps_failing_on_ray_is_named(tmp_path, ray_cluster):
    from trulyopen.data.executor import TaskFailed, TaskStep, run_step
    from trulyopen.data.executor.ray import RayExecutor
    from trulyopen.recipe import RayConfig

    step = TaskStep(
        "boom", "tests.test_data_scale:fail_task", {}, [{"n": 0}, {"n": 1}], str(tmp_path / "boom")
    )
    with pytest.raises(
        TaskFailed, match=r"data boom: task \d failed 2 times on Ray: RuntimeError: task \d fails"
    ):
        run_step(RayExecutor(RayConfig(max_retries=1), 2), step)


def test_a_saved_dataset_and_a_parquet_file_cut_into_row_tasks_read_as_a_whole(tmp_path):
    import datasets

    from trulyopen.data.sources import read_task
    from trulyopen.data.tasks import source_tasks

    rows = [{"text": make_doc(random.Random(i), 5), "key": f"k{i}"} for i in range(40)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet", row_group_size=7)
    for cfg in (
        SourceConfig(name="h", type="hf-disk", path=tmp_path / "ds", license="MIT", id_field="key"),
        SourceConfig(name="h", type="parquet", path=tmp_path / "t.parquet", license="MIT", id_field="key"),
    ):
        files = input_files(cfg)
        tasks = source_tasks(cfg, files, task_bytes=2000)
        assert len(tasks) >= 3
        parts = [d for t in tasks for d in read_task(cfg, t, "skip")]
        whole = list(read_source(cfg, files, "skip"))
        assert [(d.id, d.text, d.meta) for d in parts] == [(d.id, d.text, d.meta) for d in whole]
        assert [d.id for d in whole] == [f"h/k{i}" for i in range(40)]
        assert whole[39].meta["row"] == 39
