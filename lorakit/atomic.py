"""Writing files and folders so that a reader sees the old content or the whole new one, never a
part of it, and what a failed write means in words.

The usual recipe (git's object store, pip's wheel cache; POSIX rename(2) replaces a name in one
step within a file system): write into a temporary sibling `.<name>.tmp-<pid>-<random>`, fsync
every file in it, rename it over the final name, then fsync the parent folder so the rename
itself reaches the disk (Linux `fsync(2)`: "calling fsync() on the file does not necessarily
ensure that the entry in the directory containing the file has also reached disk"). A kill at
any moment leaves the old content and at most a temporary sibling, which `clean_temps` removes
the next time the same folder is written.

`storage_error` turns the OSError of a write (read-only file system, full disk, permission
denied, a file where a folder is expected) into a one-line `StorageError` naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from lorakit.errors import StorageError

TMP_MARK = ".tmp-"

# errno -> what it means for a write, in the words a person acts on.
_WRITE_ERRORS = {
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is larger than the system allows",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "a file is in the way where a folder is expected",
    errno.EISDIR: "a folder is in the way where a file is expected",
    errno.ENAMETOOLONG: "the name is too long",
}
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) reports an I/O error


def temp_sibling(out: Path) -> Path:
    """A fresh name beside `out` that `clean_temps` recognises: `.<name>.tmp-<pid>-<hex>`."""
    return out.with_name(f".{out.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be
    opened (Windows)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every folder, deepest first, then `root` itself."""
    paths = sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    for p in paths:
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for p in [*(p for p in paths if p.is_dir()), root]:
        fsync_dir(p)


def _errno_of(e: BaseException) -> int | None:
    if isinstance(e, OSError):
        return e.errno
    m = _RUST_OS_ERROR.search(str(e))
    return int(m.group(1)) if m else None


def storage_error(path: str | Path, e: BaseException,
                  doing: str = "cannot write") -> StorageError | None:
    """A StorageError naming `path` and what is wrong, if `e` is a failed write we can explain
    (read-only, full disk, permission, a file in a folder's place); otherwise None."""
    reason = write_failure(e)
    if reason is None:
        return None
    return StorageError(f"{path}: {doing} ({reason}); expected a writable folder with free space")


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Raise a failed write inside the block (an OSError we can explain) as StorageError naming
    `path`; for writes that cannot go through a temporary (appending to a log)."""
    try:
        yield
    except OSError as e:
        err = storage_error(path, e)
        if err is None:
            raise
        raise err from e


def write_failure(e: BaseException) -> str | None:
    """What a failed write means in words ("the file system is read-only"), or None when `e` is
    not a write failure we know."""
    return _WRITE_ERRORS.get(_errno_of(e))


def make_folder(path: Path, what: str = "") -> Path:
    """`mkdir -p path`, raising StorageError naming `path` (and `what` it is, e.g. "train.output_dir")
    when it cannot."""
    path = Path(path)
    label = f" ({what})" if what else ""
    if path.exists() and not path.is_dir():
        raise StorageError(f"{path}{label}: is a file; expected a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        err = storage_error(f"{path}{label}", e, "cannot create the folder")
        if err is None:
            raise
        raise err from e
    return path


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out`; when the block ends without an error, fsync
    everything in it and rename it to `out`. An existing `out` is moved aside first and removed
    only once the new one is in place. On an error the temporary folder is removed, `out` is left
    as it was, and a write failure is raised as StorageError naming `out`.

    The folder is made with mkdir's mode (0o777 less the umask), not mkdtemp's private 0o700, so
    what is written is readable as the user's other files are.
    """
    out = Path(out)
    make_folder(out.parent)
    tmp, old = temp_sibling(out), None
    try:
        tmp.mkdir()
        yield tmp
        fsync_tree(tmp)
        if out.exists() or out.is_symlink():
            old = temp_sibling(out)
            os.replace(out, old)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():  # moved aside, but the new one never came
            os.replace(old, out)
        err = storage_error(out, e)
        if err is None:
            raise
        raise err from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(out: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `out` (not yet created); the block writes it, and when it ends
    without an error the file is fsynced and renamed over `out`. On an error the temporary file
    is removed, `out` is left as it was, and a write failure is raised as StorageError."""
    out = Path(out)
    if out.is_dir():
        raise StorageError(f"{out}: is a folder; expected a file path")
    make_folder(out.parent)
    tmp = temp_sibling(out)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        err = storage_error(out, e)
        if err is None:
            raise
        raise err from e


def write_text(out: str | Path, text: str) -> Path:
    """Write a UTF-8 text file atomically (old file or the whole new one, never a part)."""
    out = Path(out)
    with atomic_file(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out


def clean_temps(folder: Path, name: str | None = None) -> list[Path]:
    """Remove temporaries of atomic writes into `folder` (only those of `name` when given) left by
    a process that died mid-write; those of a process still running are kept. Returns what was
    removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    prefix = f".{name}{TMP_MARK}" if name else "."
    removed = []
    for p in folder.iterdir():
        if not p.name.startswith(prefix) or TMP_MARK not in p.name:
            continue
        if _writer_alive(p.name.rsplit(TMP_MARK, 1)[1]):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p)
    return sorted(removed)


def _writer_alive(tail: str) -> bool:
    """Whether the pid in a temporary's `<pid>-<hex>` tail is a running process other than this
    one (this process is not writing while it cleans). Older names without a pid count as dead."""
    pid = tail.split("-", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True
