"""The loader: batch contents are a pure function of (seed, data, step), whatever the world size."""

import json

import numpy as np
import pytest

from trulyopen import pipeline
from trulyopen.recipe import load_recipe
from trulyopen.train.loader import BatchPlan, DataMismatchError, TokenStream

from .conftest import build_corpus, write_recipe


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loader")
    recipe = write_recipe(tmp, build_corpus(tmp))
    run = pipeline.run(load_recipe(recipe), tmp / "run", workers=1)
    return run / "data" / "shards"


def test_stream_crosses_shards_and_matches_the_files(shards):
    stream = TokenStream(shards, "train")
    assert len(stream.shards) > 1
    whole = np.concatenate([np.asarray(s.tokens, dtype=np.int64) for s in stream.shards])
    assert len(stream) == len(whole)
    edge = int(stream.starts[1])
    assert np.array_equal(stream.read(edge - 5, edge + 7), whole[edge - 5 : edge + 7])


def test_order_is_a_pure_function_of_seed_data_and_step(shards):
    stream = TokenStream(shards, "train")
    a, b = BatchPlan(stream, 32, 4, seed=1), BatchPlan(stream, 32, 4, seed=1)
    assert np.array_equal(a.batch_tokens(3), b.batch_tokens(3))
    assert not np.array_equal(a.sequences(0), BatchPlan(stream, 32, 4, seed=2).sequences(0))
    # every sequence appears once per epoch
    seen = np.concatenate([a.sequences(s) for s in range(a.steps_per_epoch)])
    assert len(np.unique(seen)) == len(seen) == a.steps_per_epoch * 4
    # the next epoch is another order of the same sequences
    assert not np.array_equal(a.sequences(0), a.sequences(a.steps_per_epoch))


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_share_the_global_batch(shards, world):
    """Each rank runs micro-batches rank::world of a step; together they are the step's rows, once
    each, and every rank makes as many passes (fillers weigh 0), as DDP and FSDP need."""
    from trulyopen.train.distributed import World
    from trulyopen.train.loop import mine
    from trulyopen.train.objectives.causal_lm import CausalLM

    plan = BatchPlan(TokenStream(shards, "train"), 32, 6, seed=0)
    sb = CausalLM(plan, micro_batch_size=1).batch(5, model=None)
    shares = [mine(sb.micros, World(rank=r, size=world)) for r in range(world)]
    assert len({len(s) for s in shares}) == 1
    rows = [plan.batch_tokens(*m.batch) for s in shares for m in s if m.weight]
    assert np.array_equal(
        np.concatenate(sorted(rows, key=lambda r: r.tobytes())),
        np.concatenate(sorted(np.split(plan.batch_tokens(5), 6), key=lambda r: r.tobytes())),
    )
    assert sum(m.weight == 0 for s in shares for m in s) == -6 % world


def test_batch_documents_name_what_the_rows_hold(shards):
    from tokenizers import Tokenizer

    stream = TokenStream(shards, "train")
    plan = BatchPlan(stream, 1000, 2, seed=0)  # rows longer than a document: several per row
    tok = Tokenizer.from_file(str(shards.parent.parent / "tokenizer" / "tokenizer.json"))
    corpus = {
        r["id"]: r["text"]
        for r in map(json.loads, (shards.parent / "corpus" / "train.jsonl").read_text().splitlines())
    }
    rows, docs = plan.batch_tokens(0), plan.batch_documents(0)
    checked = 0
    for row_tokens, row_docs in zip(rows, docs, strict=True):
        assert row_docs[0][1] == 0 and row_docs[-1][2] == 1001  # the documents cover the whole row
        for doc_id, start, end in row_docs[1:]:  # these begin inside the row: a prefix of their text
            text = tok.decode(row_tokens[start:end].tolist(), skip_special_tokens=True)
            assert len(text) > 10 and corpus[doc_id].startswith(text)
            checked += 1
    assert checked >= 2


def test_too_little_data_is_a_clear_error(shards):
    with pytest.raises(DataMismatchError, match="fewer than one global batch"):
        BatchPlan(TokenStream(shards, "val"), 4096, 64, seed=0)
