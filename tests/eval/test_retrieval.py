"""BM25 over the SQLite FTS5 index: expected rows on a hand-built index, the index file kept."""

import math

import pytest

from lorakit.errors import LorakitError
from lorakit.eval.retrieval import BM25Index, fts_query, read_corpus

DOCS = [
    "is the red bike still available",          # 0
    "what condition is the sofa in",            # 1
    "would you take 50 for the bike",           # 2
    "any scratches on the oak table",           # 3
    "is the sofa still for sale",               # 4
    "the the the the the the",                  # 5: stop-word noise, no rare term
]


def _bm25(query: str, k1: float = 1.2, b: float = 0.75) -> list[float]:
    """Okapi BM25 written out (FTS5's definition: idf = ln((N - n + 0.5) / (n + 0.5)), floored)."""
    docs = [d.split() for d in DOCS]
    avg = sum(map(len, docs)) / len(docs)
    scores = []
    for d in docs:
        s = 0.0
        for term in dict.fromkeys(query.split()):
            n = sum(term in doc for doc in docs)
            if not n:
                continue
            idf = math.log((len(docs) - n + 0.5) / (n + 0.5))
            idf = max(idf, 1e-6)  # FTS5 floors a negative idf at a tiny positive number
            f = d.count(term)
            s += idf * f * (k1 + 1) / (f + k1 * (1 - b + b * len(d) / avg))
        scores.append(s)
    return scores


def test_bm25_returns_the_expected_rows():
    with BM25Index(DOCS) as index:
        assert [i for i, _ in index.search("is the sofa for sale?", 2)] == [4, 1]
        assert [i for i, _ in index.search("offer 50 for your bike", 1)] == [2]
        assert [i for i, _ in index.search("scratches", 3)][0] == 3


@pytest.mark.parametrize("query", ["sofa condition", "bike still available", "oak table scratches"])
def test_bm25_scores_equal_the_written_out_formula(query):
    want = _bm25(query)
    with BM25Index(DOCS) as index:
        hits = index.search(query, len(DOCS))
    for i, score in hits:
        if want[i] > 0:
            assert score == pytest.approx(want[i], rel=1e-6)
    matched = [i for i, s in hits if s > 0]
    assert matched == sorted(matched, key=lambda i: (-want[i], i))


def test_topped_up_when_few_documents_match_and_excluded_rows_skipped():
    with BM25Index(DOCS) as index:
        hits = index.search("sofa", 4, exclude={1})
    assert [i for i, _ in hits] == [4, 0, 2, 3]
    assert [s for _, s in hits][1:] == [0.0, 0.0, 0.0]


def test_query_text_cannot_become_fts_syntax():
    assert fts_query('NEAR("a" b) OR *') == '"near" OR "a" OR "b" OR "or"'
    with BM25Index(DOCS) as index:
        assert len(index.search('"unbalanced AND ( * -', 2)) == 2
        assert len(index.search("", 2)) == 2


def test_index_file_built_once_and_rebuilt_when_documents_change(tmp_path):
    path = tmp_path / "run" / "retrieval.sqlite"
    with BM25Index(DOCS, path) as index:
        assert index.rebuilt
        first = index.search("bike", 2)
    with BM25Index(DOCS, path) as index:
        assert not index.rebuilt and index.search("bike", 2) == first
    with BM25Index(DOCS[:3], path) as index:
        assert index.rebuilt and [i for i, _ in index.search("sofa", 1)] == [1]


def test_corpus_files(tmp_path):
    (tmp_path / "c.txt").write_text("first passage\nstill first\n\nsecond passage\n")
    assert read_corpus(tmp_path / "c.txt") == ["first passage\nstill first", "second passage"]
    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert read_corpus(tmp_path / "c.jsonl") == ["a", "b"]
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"body": 1}\n')
    with pytest.raises(LorakitError, match=r"bad.jsonl:2: expected an object"):
        read_corpus(tmp_path / "bad.jsonl")
    with pytest.raises(LorakitError, match="no such file"):
        read_corpus(tmp_path / "missing.txt")
    with pytest.raises(LorakitError, match="no documents"):
        BM25Index([])
