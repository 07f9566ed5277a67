import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trulyopen.data.sources import DataError, Document, Problem, input_files, read_source, stdlib_dir
from trulyopen.recipe import DataConfig, SourceConfig


def _read(cfg: SourceConfig, policy: str = "skip"):
    items = list(read_source(cfg, input_files(cfg), policy))
    return [i for i in items if isinstance(i, Document)], [i for i in items if isinstance(i, Problem)]


def test_directory_globs_and_stable_ids(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.py").write_text("print(1)\n")
    (tmp_path / "two.py").write_text("print(2)\n")
    (tmp_path / "skip.py").write_text("print(3)\n")
    (tmp_path / "readme.md").write_text("hello\n")
    cfg = SourceConfig(
        name="s", type="directory", path=tmp_path, license="MIT", include=["**/*.py"], exclude=["skip.py"]
    )
    docs, problems = _read(cfg)
    assert [d.id for d in docs] == ["s/a/one.py", "s/two.py"] and not problems
    assert docs[0].meta["path"] == "a/one.py"


def test_binary_and_invalid_utf8_are_named_and_counted(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "good.txt").write_text("fine\n")
    cfg = SourceConfig(name="t", type="text", path=tmp_path, license="MIT")
    docs, problems = _read(cfg)
    assert [d.id for d in docs] == ["t/good.txt"]
    reasons = {p.file.split("/")[-1]: p.reason for p in problems}
    assert reasons["bin.txt"].startswith("binary file")
    assert reasons["latin.txt"] == "invalid UTF-8 at byte 3"
    docs, problems = _read(cfg, policy="replace")
    assert "caf\ufffd au lait" in [d.text for d in docs] and len(problems) == 1


def test_jsonl_problems_name_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "first"}\n\n{"text": 3}\n{broken\n{"other": "x"}\n{"text": "last"}\n')
    docs, problems = _read(SourceConfig(name="j", type="jsonl", path=f, license="MIT"))
    assert [d.id for d in docs] == ["j/d.jsonl:1", "j/d.jsonl:6"]
    assert [(p.line, p.reason) for p in problems] == [
        (2, "empty line"),
        (3, "field 'text' not a string"),
        (4, "invalid JSON: Expecting property name enclosed in double quotes"),
        (5, "field 'text' missing"),
    ]
    assert str(problems[0]) == f"{f}:2: empty line"


def test_parquet_rows_and_missing_column(tmp_path):
    pq.write_table(pa.table({"text": ["a doc", None, "another"]}), tmp_path / "good.parquet")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    docs, problems = _read(SourceConfig(name="p", type="parquet", path=tmp_path, license="MIT"))
    assert [d.id for d in docs] == ["p/good.parquet#0", "p/good.parquet#2"]
    assert any("bad.parquet" in p.file and "no column 'text' (columns: body)" in p.reason for p in problems)
    assert any(p.row == 1 for p in problems)


def test_dataset_saved_to_disk(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"content": ["one", "two"]}).save_to_disk(str(tmp_path / "ds"))
    cfg = SourceConfig(
        name="h", type="hf-disk", path=tmp_path / "ds", license="CC0-1.0", text_field="content"
    )
    docs, problems = _read(cfg)
    assert [(d.id, d.text) for d in docs] == [("h/train#0", "one"), ("h/train#1", "two")] and not problems


def test_python_stdlib_source_excludes_site_packages():
    cfg = SourceConfig(name="stdlib", type="python-stdlib", license="PSF-2.0")
    files = input_files(cfg)
    assert len(files) > 500
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    assert stdlib_dir() / "os.py" in files


def test_strict_mode_stops_at_first_problem(tmp_path):
    from trulyopen.data.curate import curate
    from trulyopen.data.executor.local import LocalExecutor

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad.txt").write_bytes(b"\xff\xfe")
    src = SourceConfig(name="t", type="text", path=tmp_path / "in", license="MIT")
    cfg = DataConfig(sources=[src], strict=True)
    with pytest.raises(DataError, match=r"bad.txt: invalid UTF-8 at byte 0 \(data.strict"):
        curate(cfg, tmp_path / "out", {"t": input_files(src)}, LocalExecutor(1), key={})


def test_hub_source_takes_the_dataset_path(monkeypatch):
    """A hub name goes through the same reader as a saved dataset (load_dataset is faked: no network)."""
    import datasets

    seen = {}

    def fake_load(name, split):
        seen["args"] = (name, split)
        return datasets.Dataset.from_dict({"text": ["from the hub"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = SourceConfig(name="hub", type="hf-hub", dataset="org/corpus", license="CC-BY-4.0")
    docs, _ = _read(cfg)
    assert (
        seen["args"] == ("org/corpus", "train")
        and docs[0].text == "from the hub"
        and docs[0].id == "hub/train#0"
    )
    assert json.dumps(docs[0].meta)
