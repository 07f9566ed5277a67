import json
import random

import numpy as np

from trulyopen.data.clean import clean_text, duplicate_line_fraction, filter_reason, top_ngram_char_fraction
from trulyopen.data.decontam import Decontaminator, load_eval_ngrams
from trulyopen.data.dedup import MinHasher, exact_duplicates, lsh_clusters, near_duplicates
from trulyopen.recipe import CleanConfig, DedupConfig, FilterConfig, PIIConfig

from .conftest import make_doc, near_copy


def test_pii_is_replaced_and_counted():
    text = "mail guido@python.org or call +44 20 7946 0958, server 192.168.1.20, version 3.11.7"
    out, counts = clean_text(text, CleanConfig(), PIIConfig(enabled=True))
    assert out == "mail <EMAIL> or call <PHONE>, server <IP_ADDRESS>, version 3.11.7"
    assert counts == {"pii_email": 1, "pii_phone": 1, "pii_ip": 1}


def test_control_chars_and_normalisation():
    out, counts = clean_text("e\u0301\x07tab\tok\n", CleanConfig(), PIIConfig())
    assert out == "\u00e9tab\tok\n" and counts == {"unicode_normalized": 1, "control_chars": 1}


def test_repetition_filters():
    assert duplicate_line_fraction("a\nb\na\na\n") == 0.5
    spam = "buy now " * 50
    assert top_ngram_char_fraction(spam, 2) > 0.9
    assert filter_reason(spam * 2, FilterConfig(min_chars=1)) in ("duplicate_lines", "repeated_ngram")
    assert filter_reason("short", FilterConfig(min_chars=10)) == "too_short"
    assert filter_reason(make_doc(random.Random(1)), FilterConfig()) is None


def test_exact_duplicates_point_at_first():
    assert exact_duplicates(["a", "b", "a", "c", "b"]) == [None, None, 0, None, 1]


def test_near_duplicates_found_and_originals_kept():
    rng = random.Random(0)
    docs = [make_doc(rng) for _ in range(50)]
    docs.append(near_copy(docs[7], rng, changes=2))
    docs.append(near_copy(docs[20], rng, changes=3))
    rep = near_duplicates(docs, DedupConfig())
    removed = {i: int(r) for i, r in enumerate(rep) if r != i}
    assert removed == {50: 7, 51: 20}


def test_threshold_controls_what_counts_as_duplicate():
    rng = random.Random(3)
    base = make_doc(rng, lines=60)
    docs = [base, near_copy(base, rng, changes=15)]  # about 75% of lines in common
    sig = MinHasher(DedupConfig(bands=28)).signatures(docs)  # 4 rows per band: candidates down to ~0.5
    est = (sig[0] == sig[1]).mean()
    assert 0.4 < est < 0.9
    assert lsh_clusters(sig, 28, threshold=est - 0.05)[1] == 0
    assert lsh_clusters(sig, 28, threshold=min(est + 0.05, 1.0))[1] == 1


def test_documents_without_shingles_are_not_clustered():
    rep = near_duplicates(["a b", "a b", "c"], DedupConfig())
    assert list(rep) == [0, 1, 2]


def test_signatures_do_not_depend_on_batching():
    rng = random.Random(5)
    docs = [make_doc(rng, lines=rng.randrange(1, 80)) for _ in range(30)]
    mh = MinHasher(DedupConfig())
    whole = mh.signatures(docs)
    parts = np.concatenate([MinHasher(DedupConfig()).signatures(docs[i : i + 7]) for i in range(0, 30, 7)])
    assert (whole == parts).all()


def test_decontamination_matches_only_overlapping_sets(tmp_path):
    doc = make_doc(random.Random(2))
    hit = tmp_path / "hit.jsonl"
    hit.write_text(json.dumps({"text": " ".join(doc.split()[10:30])}) + "\n")
    miss = tmp_path / "miss.jsonl"
    miss.write_text(
        '{"text": "completely unrelated words that never appear in the training text at all ok"}\n'
    )
    d = Decontaminator(load_eval_ngrams([hit, miss], "text", 13), 13)
    assert d.matches(doc) == [str(hit)]
    assert d.matches(make_doc(random.Random(9))) == []


def test_signature_of_a_long_document_equals_the_direct_minimum():
    """A text with more shingles than one block is cut into pieces; the minimum must not change."""
    from trulyopen.data import dedup

    rng = random.Random(11)
    long_doc = make_doc(rng, lines=2000)  # ~16k words, several blocks
    short = make_doc(rng, lines=3)
    mh = MinHasher(DedupConfig())
    x = mh.shingles(long_doc)
    assert len(x) > 2 * dedup.BLOCK_ROWS
    with np.errstate(over="ignore"):
        direct = ((x[:, None] * mh.a + mh.b) >> np.uint64(32)).min(axis=0).astype(np.uint32)
    sig = mh.signatures([short, long_doc, short])
    assert (sig[1] == direct).all() and (sig[0] == sig[2]).all()


def test_a_third_document_in_the_bucket_does_not_hide_a_pair():
    a, b, c = [1, 1, 5, 6, 9, 9], [1, 1, 2, 2, 3, 3], [1, 1, 5, 7, 9, 8]  # b sorts between a and c
    sig = np.array([a, b, c], dtype=np.uint32)
    assert list(lsh_clusters(sig, bands=3, threshold=0.6)) == [0, 1, 0]


def test_words_are_letters_and_digits_and_numbers_collapse():
    import re

    from trulyopen.data.ngrams import word_hashes

    text = "Foo bar_baz, FOO! ünï 42 x42 x7 v3.11 😀 𝐀b\u00a0word"
    expected = ["foo", "bar", "baz", "foo", "ünï", "0", "x0", "x0", "v0", "0", "𝐀b", "word"]
    assert [re.sub(r"\d+", "0", w) for w in re.findall(r"[^\W_]+", text.lower())] == expected
    h = word_hashes(text)
    assert len(h) == len(expected)
    assert len(set(h.tolist())) == len(set(expected))
    assert h[0] == h[3] and h[6] == h[7] and h[5] == h[9] and h[1] != h[2]


def test_top_ngram_fractions_of_a_batch_equal_gophers_counter_definition():
    """The numpy form, many texts at once, against the direct definition on text.split() words."""
    from collections import Counter

    from trulyopen.data.clean import top_ngram_char_fractions

    def direct(text: str, n: int) -> float:
        words = text.split()
        if len(words) < n:
            return 0.0
        gram, count = Counter(zip(*(words[i:] for i in range(n)), strict=False)).most_common(1)[0]
        total = sum(map(len, words))
        return count * sum(map(len, gram)) / total if count >= 2 and total else 0.0

    rng = random.Random(4)
    texts = ["", "a", "a b a b a b", "x\u2028y x\u2028y x\u2028y", "é é é é 🙂 🙂 🙂", "a\x1cb a\x1cb a\x1cb"]
    texts += ["buy now " * 50, "a b c a b c d e f a b c", make_doc(rng, 30)]
    # short words from a small set: many ties between n-grams of different lengths
    texts += [
        " ".join(rng.choice(["aa", "b", "ccc", "a", "bb"]) for _ in range(rng.randrange(40)))
        for _ in range(500)
    ]
    for n in (1, 2, 3, 5):
        assert list(top_ngram_char_fractions(texts, n)) == [direct(t, n) for t in texts]
    # a batch in which every text is shorter than n words: n-grams exist only across texts
    short = ["hi 0", "hi 1", "hi 2"]
    assert list(top_ngram_char_fractions(short, 3)) == [direct(t, 3) for t in short] == [0.0] * 3
