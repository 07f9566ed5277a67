"""Tracing: the index stage, OLMoTrace's spans and n-grams, checked against a direct search of the shards."""

import hashlib
import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trulyopen import api, pipeline
from trulyopen.recipe import load_recipe
from trulyopen.trace import index as index_mod
from trulyopen.trace.index import check_index
from trulyopen.trace.spans import MAX_TOKENS, TraceOptions, Tracer, find_index

from .conftest import build_corpus, make_doc, write_recipe

PLANTED = "the quick zebra juggles seventeen lanterns beneath the violet aqueduct at midnight"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """A toy corpus with one sentence planted in two files, run to pretraining with an index made of
    several folders (small groups of shards)."""
    tmp = tmp_path_factory.mktemp("trace")
    corpus = build_corpus(tmp)
    for i, name in enumerate(("planted_a.py", "planted_b.py", "planted_c.py", "planted_d.py")):
        body = make_doc(random.Random(100 + i), lines=12)  # each its own, so no dedup step merges them
        (corpus["root"] / name).write_text(f'"""{PLANTED}."""\n' + body)
    recipe = write_recipe(tmp, corpus, index={"group_tokens": 3000})
    run_dir = pipeline.run(load_recipe(recipe), tmp / "run", workers=1)
    return {"tmp": tmp, "recipe": recipe, "run": run_dir, "tracer": Tracer(*find_index(run_dir))}


def train_docs(run_dir: Path) -> list[tuple[str, np.ndarray]]:
    """Every training document's id and tokens (end-of-text dropped), read from the shards."""
    shards = run_dir / "data" / "shards"
    meta = json.loads((shards / "shards.json").read_text())
    out = []
    for s in meta["splits"]["train"]["shards"]:
        tokens = np.fromfile(shards / f"{s['name']}.bin", dtype=np.dtype(meta["dtype"]).newbyteorder("<"))
        offsets = np.fromfile(shards / f"{s['name']}.idx", dtype="<i8")
        for k, doc_id in enumerate((shards / f"{s['name']}.ids").read_text().splitlines()):
            out.append((doc_id, tokens[offsets[k] : offsets[k + 1] - 1]))
    return out


def occurrences(docs: list[tuple[str, np.ndarray]], ids: list[int]) -> list[str]:
    """The document id of every place `ids` occurs, by brute force."""
    n, found = len(ids), []
    for doc_id, toks in docs:
        for i in range(len(toks) - n + 1):
            if toks[i] == ids[0] and list(toks[i : i + n]) == ids:
                found.append(doc_id)
    return found


def test_planted_sentence_is_found_with_its_documents_and_count(built):
    text = f"Before it: nothing special. {PLANTED}. And then words nobody wrote: plimsoll vortex quandary."
    result = built["tracer"].trace(text, TraceOptions(docs_per_span=5))
    hits = [s for s in result["spans"] if "zebra juggles seventeen" in s["text"]]
    assert len(hits) == 1, result["spans"]
    span = hits[0]
    ids = (
        built["tracer"]
        .tok.encode(text, add_special_tokens=False)
        .ids[span["token_start"] : span["token_end"]]
    )
    where = occurrences(train_docs(built["run"]), ids)
    assert span["count"] == len(where) >= 2  # the planted files the split left in training
    assert sorted(d["id"] for d in span["docs"]) == sorted(where)
    assert all(w.startswith("code/planted_") for w in where)
    for d in span["docs"]:
        assert d["license"] == "MIT" and d["source"] == "code"
        assert d["context"][d["match_start"] : d["match_end"]].strip() == span["text"].strip()
    assert text[span["start"] : span["end"]] == span["text"]


def test_text_not_in_the_corpus_has_no_span(built):
    text = "qwertyuiop zxcvbnm plokijuh mnbvcxz lkjhgfdsa poiuytrewq asdfghjkl " * 3
    assert built["tracer"].trace(text)["spans"] == []


def test_spans_follow_olmotraces_rules(built):
    tracer, docs = built["tracer"], train_docs(built["run"])
    # a corpus document's lines, glued to letters at both ends: the glued words are not whole words
    body = (built["run"] / "data" / "corpus" / "train.jsonl").read_text().splitlines()[0]
    source = json.loads(body)["text"][:600]
    text = "zq" + source + "zq"
    result = tracer.trace(text, TraceOptions(min_len=6, keep=0.2))
    spans = result["spans"]
    assert spans, "a corpus document's own text must trace"
    assert len(spans) <= math.ceil(0.2 * result["tokens"])

    enc = tracer.tok.encode(text, add_special_tokens=False)

    def inside_a_word(i: int) -> bool:
        """Tokens i-1 and i are parts of one word (a word character on each side of the cut)."""
        if i == 0 or i == len(enc.ids):
            return False
        left, right = tracer.tok.decode([enc.ids[i - 1]]), tracer.tok.decode([enc.ids[i]])
        return any(c.isalnum() or c == "_" for c in left[-1:]) and any(
            c.isalnum() or c == "_" for c in right[:1]
        )

    assert inside_a_word(1)  # "zq" glued to the document's first word
    for s in spans:
        a, b = s["token_start"], s["token_end"]
        assert s["length"] >= 6 and not inside_a_word(a) and not inside_a_word(b), s
        assert occurrences(docs, enc.ids[a:b]), "every span really occurs"
    for s in spans:  # none inside another
        inside = [
            o for o in spans if o["token_start"] <= s["token_start"] and s["token_end"] <= o["token_end"]
        ]
        assert inside == [s]
    # the least likely spans are the ones kept
    fewer = tracer.trace(text, TraceOptions(min_len=6, keep=1 / result["tokens"]))["spans"]
    assert len(fewer) == 1 and fewer[0]["unigram_logprob"] == min(s["unigram_logprob"] for s in spans)


def test_ngram_counts_and_next_tokens_match_the_shards(built):
    tracer = built["tracer"]
    prefix = "the quick zebra juggles"
    got = tracer.ngram(prefix, top=3)
    ids = tracer.tok.encode(prefix, add_special_tokens=False).ids
    docs = train_docs(built["run"])
    count = len(occurrences(docs, ids))
    assert got["count"] == count >= 2
    following = tracer.tok.encode(" seventeen", add_special_tokens=False).ids[0]
    assert [got["next"][0][k] for k in ("id", "count", "prob")] == [following, count, 1.0]


def test_index_is_identical_across_rebuilds_workers_and_parts(built, tmp_path, monkeypatch):
    def digests(run: Path) -> dict:
        out = run / "data" / "index"
        return {
            p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*.0"))
        }

    first = digests(built["run"])
    assert len({k.split("/")[0] for k in first}) > 1  # several index folders, queried together
    other = tmp_path / "run"
    shutil.copytree(built["run"], other, ignore=shutil.ignore_patterns("checkpoints", "pretrain"))
    recipe = load_recipe(built["recipe"])
    pipeline.run(recipe, other, force=["index"], until="index", workers=2)  # two worker processes
    assert digests(other) == first
    monkeypatch.setattr(index_mod, "OVERLAP", 600)  # sorted in parts of a few hundred bytes, then merged
    ctx = json.loads((built["run"] / "data" / "index" / "index.json").read_text())
    for shard in ctx["shards"]:
        folder = other / "data" / "index" / shard["name"]
        table = folder / "parts_table.0"
        index_mod._suffix_array(folder / "tokenized.0", table, ctx["token_width"], part_bytes=1500, threads=2)
        assert table.read_bytes() == (folder / "table.0").read_bytes(), shard["name"]
        table.unlink()
    assert check_index(other / "data" / "index", other / "data" / "shards") == []


def test_a_corrupt_index_is_caught(built, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(built["run"] / "data" / "index", index)
    shards = built["run"] / "data" / "shards"
    assert check_index(index, shards) == []
    folder = sorted(p for p in index.iterdir() if p.is_dir())[0]
    table = bytearray((folder / "table.0").read_bytes())
    meta = json.loads((index / "index.json").read_text())
    ratio = len(table) // (next(s for s in meta["shards"] if s["name"] == folder.name)["tokens"])
    mid = len(table) // ratio // 2 * ratio
    a, b = table[mid : mid + ratio], table[mid + ratio : mid + 2 * ratio]
    table[mid : mid + 2 * ratio] = b + a
    (folder / "table.0").write_bytes(bytes(table))
    problems = check_index(index, shards)
    assert any("changed since it was built" in p for p in problems)
    # even with its recorded hash made to match, the swapped pointers are out of order
    for s in meta["shards"]:
        if s["name"] == folder.name:
            s["files"]["table"]["sha256"] = hashlib.sha256(bytes(table)).hexdigest()
    (index / "index.json").write_text(json.dumps(meta))
    assert check_index(index, shards, samples=10**9) == [
        f"{folder / 'table.0'}: not sorted at rank {mid // ratio}"
    ]


def test_trace_generate_returns_spans_that_occur_in_the_shards(built):
    answer = api.generate(built["run"], "def ", max_tokens=48, temperature=0.0, echo=False)
    result = api.trace(built["run"], answer, min_len=3, keep=1.0)
    docs = train_docs(built["run"])
    tok = built["tracer"].tok
    enc = tok.encode(answer, add_special_tokens=False)
    assert result["spans"], answer  # a model trained on the corpus repeats some of it
    for s in result["spans"]:
        assert len(occurrences(docs, enc.ids[s["token_start"] : s["token_end"]])) == s["count"] > 0


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trulyopen", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_cli_trace_and_ngram_and_their_errors(built, tmp_path):
    run = str(built["run"])
    done = cli("trace", run, f"so {PLANTED} too", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert any("zebra" in s["text"] for s in json.loads(done.stdout)["spans"])
    done = cli(
        "trace",
        run,
        "--generate",
        "def ",
        "--max-tokens",
        "24",
        "--min-len",
        "3",
        "--keep",
        "1",
        "--json",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    generated = json.loads(done.stdout)
    ids = built["tracer"].tok.encode(generated["text"], add_special_tokens=False).ids
    for s in generated["spans"]:  # the model's own answer, traced: each span checked by direct search
        assert (
            len(occurrences(train_docs(built["run"]), ids[s["token_start"] : s["token_end"]])) == s["count"]
        )
    done = cli("ngram", run, "the quick zebra", cwd=tmp_path)
    assert done.returncode == 0 and " occurrences of 'the quick zebra'" in done.stdout, (
        done.stdout + done.stderr
    )
    too_long = "word " * (MAX_TOKENS + 10)
    done = cli("trace", run, too_long, cwd=tmp_path)
    assert (
        done.returncode == 2 and f"at most {MAX_TOKENS:,}" in done.stderr and "Traceback" not in done.stderr
    )
    bare = tmp_path / "bare"
    shutil.copytree(built["run"], bare, ignore=shutil.ignore_patterns("index", "checkpoints"))
    done = cli("trace", str(bare), "text", cwd=tmp_path)
    assert done.returncode == 2 and "index: {}" in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def served(built):
    with api.start_server(str(built["run"])) as server:
        yield server


def test_v1_trace_on_the_server_and_its_errors(built, served):
    import httpx

    assert httpx.get(served.url + "/health").json()["trace"] is True
    r = httpx.post(
        served.url + "/v1/trace", json={"text": f"so {PLANTED} too", "docs_per_span": 5}, timeout=60
    )
    assert r.status_code == 200, r.text
    spans = [s for s in r.json()["spans"] if "zebra juggles" in s["text"]]
    assert spans and all(d["id"].startswith("code/planted_") for d in spans[0]["docs"])
    assert r.json() == built["tracer"].trace(f"so {PLANTED} too", TraceOptions(docs_per_span=5))
    r = httpx.post(served.url + "/v1/trace", json={"text": "word " * (MAX_TOKENS + 10)}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "text"
    r = httpx.post(served.url + "/v1/trace", json={"text": "x", "min_len": 0}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_len"


def test_v1_trace_without_an_index_says_why(built, tmp_path):
    import httpx

    bare = tmp_path / "bare"
    shutil.copytree(built["run"], bare, ignore=shutil.ignore_patterns("index"))
    with api.start_server(str(bare)) as server:
        assert httpx.get(server.url + "/health").json()["trace"] is False
        r = httpx.post(server.url + "/v1/trace", json={"text": "anything"}, timeout=60)
    assert r.status_code == 404 and "index: {}" in r.json()["error"]["message"]


def test_the_chat_page_marks_traced_spans_and_lists_their_documents(built, served, chromium):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium
    driver.get(served.url + "/")
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: d.find_element(By.ID, "trace").is_enabled(), "the trace toggle stayed off")
    driver.find_element(By.ID, "trace").click()
    length = driver.find_element(By.ID, "minlen")
    length.clear()
    length.send_keys("1")  # a 4-step model's answer: single words of the corpus are what it repeats
    for _ in range(5):  # a 4-step model samples: an answer may be empty, or hold no corpus word
        driver.execute_script("document.getElementById('stats').textContent = ''")  # the last answer's
        driver.find_element(By.ID, "input").send_keys("def")
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: "traced" in d.find_element(By.ID, "stats").text, "no trace")
        answer = driver.find_elements(By.CSS_SELECTOR, ".assistant")[-1]
        marks = answer.find_elements(By.CSS_SELECTOR, "mark.traced")
        if marks:
            break
    assert marks, driver.find_element(By.ID, "stats").text
    text = driver.execute_script("return messages[messages.length - 1].content")  # the answer, exactly
    expected = api.trace(built["run"], text, min_len=1)
    assert [m.text.strip() for m in marks] == [s["text"].strip() for s in expected["spans"]]
    marks[0].click()
    docs = driver.find_elements(By.CSS_SELECTOR, "#docs .doc")
    assert len(docs) == len(expected["spans"][0]["docs"])
    first = expected["spans"][0]["docs"][0]
    assert docs[0].find_element(By.CSS_SELECTOR, ".doc-id").text.startswith(first["id"])
    assert docs[0].find_element(By.CSS_SELECTOR, ".match").text.strip() == marks[0].text.strip()


def test_memorisation_in_the_card_and_the_index_in_the_release(built, tmp_path):
    from trulyopen.release.audit import audit

    run = tmp_path / "run"
    shutil.copytree(built["run"], run)
    overrides = [
        "eval.builtin=false",
        "eval.models=[pretrain]",
        "eval.memorisation_prompts=12",
        "release.producer=the test suite",
    ]
    pipeline.run(load_recipe(built["recipe"], overrides), run, workers=1)
    m = json.loads((run / "eval" / "pretrain" / "memorisation.json").read_text())
    assert m["prompts"] == 12 and m["generated_tokens"] > 0 and 0 <= m["share"] <= 1
    docs = train_docs(run)
    for e in m["examples"]:  # each example span really occurs in training, at least 32 tokens long
        ids = built["tracer"].tok.encode(e["span"], add_special_tokens=False).ids
        assert e["tokens"] >= 32 and occurrences(docs, ids)
    card = (run / "release" / "README.md").read_text()
    assert (
        "## Memorisation" in card
        and f"{m['share']:.2%} of {m['generated_tokens']:,} generated tokens" in card
    )
    assert "trulyopen trace" in card
    release = run / "release"
    assert (release / "data" / "index" / "index.json").is_file()
    assert api.verify(release).problems == []
    result = api.trace(release, f"so {PLANTED} too")  # a release traces on its own
    assert any("zebra" in s["text"] for s in result["spans"])
    data_card = next(c for c in audit(release).to_json()["components"] if c["name"] == "Data card")
    assert "data/index/index.json" in data_card["supporting"]
    # a corrupted table in the release: verify names it
    folder = sorted(p for p in (release / "data" / "index").iterdir() if p.is_dir())[0]
    table = bytearray((folder / "table.0").read_bytes())
    table[:4] = table[4:8]
    (folder / "table.0").write_bytes(bytes(table))
    problems = api.verify(release).problems
    assert any(f"data/index/{folder.name}/table.0" in p for p in problems), problems
