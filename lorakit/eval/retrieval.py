"""BM25 retrieval over an SQLite FTS5 index: the embedded default of the retrieval baseline.

SQLite's FTS5 extension (built into Python's `sqlite3` on every platform lorakit supports) keeps a
full-text index in one file and ranks matches with its `bm25()` function: Okapi BM25 with
k1 = 1.2 and b = 0.75 (Robertson and Zaragoza, "The Probabilistic Relevance Framework: BM25 and
Beyond", 2009; https://sqlite.org/fts5.html#the_bm25_function). `bm25()` returns the score
negated, so the best match has the smallest value and `ORDER BY rank` lists the best first.

A query is the row's words, each quoted and joined with OR, so punctuation in user text can never
become FTS5 query syntax, and a document matching any word is a candidate. Ties are broken by the
document's position, so the result is a pure function of the documents and the query.

The index file is built once and kept (beside a run's evaluation report); it stores a SHA-256 of
the documents and is rebuilt only when the documents change.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from pathlib import Path

from lorakit.errors import LorakitError

_WORD = re.compile(r"\w+", re.UNICODE)
INDEX_FILE = "retrieval.sqlite"


def _fingerprint(documents: list[str]) -> str:
    h = hashlib.sha256()
    for doc in documents:
        h.update(doc.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def fts_query(text: str) -> str:
    """The FTS5 query for free text: each distinct word quoted, joined by OR ('' when none)."""
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(text)))
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in words)


class BM25Index:
    """Documents (strings) in an FTS5 table, searched by BM25; `path=None` keeps it in memory."""

    def __init__(self, documents: list[str], path: str | Path | None = None):
        if not documents:
            raise LorakitError("retrieval: no documents to index (expected at least one row)")
        self.documents = list(documents)
        self.path = Path(path) if path is not None else None
        fingerprint = _fingerprint(self.documents)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path) if self.path else ":memory:")
        self.rebuilt = self._stored_fingerprint() != fingerprint
        if self.rebuilt:
            self._build(fingerprint)

    def _stored_fingerprint(self) -> str | None:
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()
        except sqlite3.DatabaseError:  # no table yet, or not an index file: rebuild
            return None
        return row[0] if row else None

    def _build(self, fingerprint: str) -> None:
        db = self._db
        with db:
            db.execute("DROP TABLE IF EXISTS docs")
            db.execute("DROP TABLE IF EXISTS meta")
            # unicode61 folds case and strips diacritics; the document's list position is its rowid.
            db.execute("CREATE VIRTUAL TABLE docs USING fts5(body, tokenize = 'unicode61')")
            db.executemany("INSERT INTO docs(rowid, body) VALUES (?, ?)",
                           ((i, doc) for i, doc in enumerate(self.documents)))
            db.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT)")
            db.execute("INSERT INTO meta VALUES ('fingerprint', ?)", (fingerprint,))

    def search(self, text: str, k: int, exclude: set[int] | None = None) -> list[tuple[int, float]]:
        """The `k` best (document index, BM25 score) for `text`, best first (score: higher is better).

        Documents in `exclude` are skipped. When fewer than `k` documents share a word with the
        query, the list is topped up with the first unmatched documents (score 0.0), so the
        caller always gets `min(k, available)` rows.
        """
        if k < 0:
            raise LorakitError(f"retrieval: k is {k} (expected >= 0)")
        exclude = exclude or set()
        query = fts_query(text)
        hits: list[tuple[int, float]] = []
        if query and k:
            rows = self._db.execute(
                "SELECT rowid, bm25(docs) FROM docs WHERE docs MATCH ? ORDER BY bm25(docs), rowid "
                "LIMIT ?", (query, k + len(exclude))).fetchall()
            hits = [(int(i), -float(s)) for i, s in rows if int(i) not in exclude][:k]
        if len(hits) < k:
            taken = {i for i, _ in hits} | exclude
            hits += [(i, 0.0) for i in range(len(self.documents)) if i not in taken][:k - len(hits)]
        return hits

    def close(self) -> None:
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_corpus(path: str | Path) -> list[str]:
    """Passages of a corpus file: JSONL rows with a "text" field, or plain text, one per paragraph
    (blank-line separated) or per line when the file has no blank lines."""
    import json

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LorakitError(f"--corpus {p}: no such file (expected a .jsonl or text file of passages)") from None
    except UnicodeDecodeError as e:
        raise LorakitError(f"--corpus {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if p.suffix == ".jsonl":
        passages = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LorakitError(f"{p}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise LorakitError(f"{p}:{n}: expected an object with a string \"text\" field")
            passages.append(row["text"])
    else:
        blocks = [b.strip() for b in re.split(r"\n\s*\n", text)]
        passages = [b for b in blocks if b] if len(blocks) > 1 else \
            [line.strip() for line in text.splitlines() if line.strip()]
    if not passages:
        raise LorakitError(f"--corpus {p}: no passages (expected at least one)")
    return passages
