"""The adapter registry: adapter names mapped to directories and their metadata, in SQLite.

One file, `<lorakit_home()>/adapters.sqlite` (stdlib `sqlite3`), shared by the `lorakit adapters`
commands and the server. A row records what `lorakit.adapters.io.read_adapter` found when the
adapter was registered: base model name and weights hash, rank, alpha, target modules, file size,
the time it was added, and evaluation results when an evaluation has been recorded. Nothing is
registered that the one adapter checker (`lorakit.adapters.check`) refuses (missing files,
pickles, bad keys or shapes, NaN, a bad config).

A registry file that is not an SQLite database, or has another schema, or cannot be written, gives
one `RegistryError` naming the file and the fix (move it aside and register again), from every
command that opens it and from `lorakit serve` before it starts. A row that cannot be read back
(written by hand or by an older version) is listed with its `error` rather than breaking the list.

Names are API-facing (`model` field of a request), so they are restricted to
`[A-Za-z0-9._-]+`; paths given over HTTP are resolved under the configured adapters root and
refused when they escape it (`..`, absolute paths, symlinks pointing out), see `resolve_under`.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from lorakit.adapters.check import WEIGHTS_NAME, AdapterFiles, read_adapter
from lorakit.atomic import write_failure
from lorakit.errors import AdapterError, RegistryError
from lorakit.paths import lorakit_home

NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
MAX_NAME_LEN = 128
DB_NAME = "adapters.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    base_model TEXT,
    base_weights_sha256 TEXT,
    rank INTEGER NOT NULL,
    lora_alpha REAL NOT NULL,
    target_modules TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    created REAL NOT NULL,
    eval_results TEXT,
    pinned INTEGER NOT NULL DEFAULT 0
)
"""
COLUMNS = ("name", "path", "base_model", "base_weights_sha256", "rank", "lora_alpha",
           "target_modules", "size_bytes", "created", "eval_results", "pinned")


def check_name(name: object) -> str:
    """An adapter name as the API accepts it, or an `AdapterError` saying what is allowed."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or len(name) > MAX_NAME_LEN \
            or name in (".", ".."):
        raise AdapterError(f"adapter name {name!r} is not allowed (expected 1-{MAX_NAME_LEN} "
                           "characters from A-Z a-z 0-9 . _ -, not '.' or '..')")
    return name


def resolve_under(root: str | Path, relative: str) -> Path:
    """`root/relative`, refused unless it stays inside `root` after resolving symlinks."""
    if not isinstance(relative, str) or not relative:
        raise AdapterError(f"adapter path {relative!r}: expected a non-empty path relative to the "
                           "adapters root")
    rel = Path(relative)
    if rel.is_absolute() or relative.startswith(("/", "\\")) or "\\" in relative:
        raise AdapterError(f"adapter path {relative!r}: absolute paths are refused (expected a "
                           "path relative to the adapters root)")
    if any(part == ".." for part in rel.parts):
        raise AdapterError(f"adapter path {relative!r}: '..' is refused (expected a path inside "
                           "the adapters root)")
    if "\x00" in relative:  # the OS cannot take it (ValueError in every path call)
        raise AdapterError(f"adapter path {relative[:100]!r}: a NUL character is refused")
    root_resolved = Path(root).resolve()
    try:
        full = (root_resolved / rel).resolve()
        full.exists()  # a name the OS cannot take (too long) fails here, not in the caller
    except (OSError, RuntimeError) as e:  # a name too long, a symlink loop (RuntimeError on 3.11)
        raise AdapterError(f"adapter path {relative[:100]!r}: cannot be resolved "
                           f"({type(e).__name__}: {str(e)[:200]})") from None
    if full != root_resolved and root_resolved not in full.parents:
        raise AdapterError(f"adapter path {relative!r}: resolves outside the adapters root "
                           "(a symlink pointing out is refused)")
    return full


@dataclass
class AdapterRecord:
    name: str
    path: str
    base_model: str | None
    base_weights_sha256: str | None
    rank: int
    lora_alpha: float
    target_modules: list[str] | str
    size_bytes: int
    created: float
    eval_results: dict | None = None
    pinned: bool = False
    error: str | None = None  # why the row could not be read back, or why the adapter last failed

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _json_column(row: sqlite3.Row, column: str, problems: list[str]):
    try:
        return json.loads(row[column]) if row[column] else None
    except (TypeError, ValueError, RecursionError):
        problems.append(f"{column}: not valid JSON")
        return None


def _finite(value, column: str, problems: list[str], kind=(int, float)):
    if isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value):
        return value
    problems.append(f"{column}: {value!r}")
    return None


def _record(row: sqlite3.Row) -> AdapterRecord:
    """A row as a record; what cannot be read back is None (JSON-safe) and named in `error`."""
    problems: list[str] = []
    rec = AdapterRecord(
        name=str(row["name"]), path=str(row["path"]), base_model=row["base_model"],
        base_weights_sha256=row["base_weights_sha256"],
        rank=_finite(row["rank"], "rank", problems, int),
        lora_alpha=_finite(row["lora_alpha"], "lora_alpha", problems),
        target_modules=_json_column(row, "target_modules", problems),
        size_bytes=_finite(row["size_bytes"], "size_bytes", problems, int),
        created=_finite(row["created"], "created", problems),
        eval_results=_json_column(row, "eval_results", problems), pinned=bool(row["pinned"]))
    if not (rec.eval_results is None or isinstance(rec.eval_results, dict)) or \
            _non_finite_json(rec.eval_results):
        problems.append("eval_results: not a JSON object of finite values")
        rec.eval_results = None
    if problems:
        rec.error = "registry row cannot be read back (" + "; ".join(problems) + "); register " \
                    "the adapter again with replace"
    return rec


def _non_finite_json(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite_json(v) for v in value.values())
    if isinstance(value, list):
        return any(_non_finite_json(v) for v in value)
    return False


class AdapterRegistry:
    """Adapter names -> directories and metadata. Each call opens its own connection, so one
    registry object is safe to share between the HTTP threads and the engine thread."""

    def __init__(self, db_path: str | Path | None = None):
        self.db_path = Path(db_path) if db_path else lorakit_home() / DB_NAME
        try:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RegistryError(f"{self.db_path}: cannot create its folder "
                                f"({write_failure(e) or e.strerror or e}); "
                                "set LORAKIT_HOME to a writable folder") from None
        if self.db_path.exists() and not self.db_path.is_file():
            raise RegistryError(f"{self.db_path}: not a file (the adapter registry is an SQLite "
                                f"file); {self._fix()}")
        with self._db() as db, db:
            columns = {r["name"] for r in db.execute("PRAGMA table_info(adapters)")}
            if not columns:
                db.execute(_SCHEMA)
            elif missing := [c for c in COLUMNS if c not in columns]:
                raise RegistryError(f"{self.db_path}: not a lorakit adapter registry (its adapters "
                                    f"table lacks the columns {', '.join(missing)}); {self._fix()}")

    def _fix(self) -> str:
        return (f"move it aside (`mv {self.db_path} {self.db_path}.bad`) and register the adapters "
                "again with `lorakit adapters add NAME PATH`")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    @contextmanager
    def _db(self):
        """A connection, closed after; SQLite's errors become one `RegistryError` with the fix."""
        try:
            with closing(self._connect()) as db:
                yield db
        except sqlite3.IntegrityError:
            raise
        except sqlite3.DatabaseError as e:  # OperationalError included: locked, read-only, I/O
            text = str(e)
            if "locked" in text or "busy" in text:
                fix = "another process holds it; retry when it is done"
            elif "disk is full" in text:
                fix = "free space on that disk, or set LORAKIT_HOME elsewhere"
            elif "readonly" in text or "unable to open" in text:
                fix = "make the file and its folder writable, or set LORAKIT_HOME elsewhere"
            else:
                fix = self._fix()
            raise RegistryError(f"{self.db_path}: the adapter registry cannot be used ({text}); "
                                f"{fix}") from None

    def add(self, name: str, path: str | Path, files: AdapterFiles | None = None,
            eval_results: dict | None = None, replace: bool = False) -> AdapterRecord:
        """Check the adapter directory and record it under `name`.

        `files` is the already-read directory when the caller has checked it (the server also
        checks it against its base first); otherwise it is read and checked here.
        """
        check_name(name)
        path = Path(path).resolve()
        files = files if files is not None else read_adapter(path)
        rec = AdapterRecord(
            name=name, path=str(path), base_model=files.base_model,
            base_weights_sha256=files.base_weights_sha256, rank=files.config.r,
            lora_alpha=float(files.config.lora_alpha), target_modules=files.config.target_modules,
            size_bytes=(path / WEIGHTS_NAME).stat().st_size, created=time.time(),
            eval_results=eval_results, pinned=False)
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        try:
            with self._db() as db, db:
                db.execute(
                    f"{verb} INTO adapters (name, path, base_model, base_weights_sha256, rank, "
                    "lora_alpha, target_modules, size_bytes, created, eval_results, pinned) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
                    (rec.name, rec.path, rec.base_model, rec.base_weights_sha256, rec.rank,
                     rec.lora_alpha, json.dumps(rec.target_modules), rec.size_bytes, rec.created,
                     json.dumps(eval_results) if eval_results is not None else None))
        except sqlite3.IntegrityError:
            raise AdapterError(f"adapter {name!r} is already registered (remove it first, or "
                               "pass replace=True / --replace)") from None
        return rec

    def get(self, name: str) -> AdapterRecord | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM adapters WHERE name = ?", (name,)).fetchone()
        return _record(row) if row else None

    def list(self) -> list[AdapterRecord]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM adapters ORDER BY name").fetchall()
        return [_record(r) for r in rows]

    def remove(self, name: str) -> bool:
        """Forget `name` (its files stay where they are); True if it was registered."""
        with self._db() as db, db:
            return db.execute("DELETE FROM adapters WHERE name = ?", (name,)).rowcount > 0

    def set_eval_results(self, name: str, results: dict) -> None:
        self._update(name, "eval_results", json.dumps(results))

    def set_pinned(self, name: str, pinned: bool) -> None:
        self._update(name, "pinned", int(pinned))

    def _update(self, name: str, column: str, value) -> None:
        with self._db() as db, db:
            n = db.execute(f"UPDATE adapters SET {column} = ? WHERE name = ?", (value, name)).rowcount
        if n == 0:
            raise AdapterError(f"adapter {name!r} is not registered")
