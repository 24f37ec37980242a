"""A real full disk for tests: a tiny tmpfs mounted for the test's length (needs root with
CAP_SYS_ADMIN, as in our containers; the test is skipped where mounting is refused)."""

import contextlib
import subprocess
from pathlib import Path

import pytest


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size_kib: int = 64):
    """Mount a `size_kib` KiB tmpfs at `where` (made if missing) and unmount it afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(where)],
                         capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({run.stderr.strip() or run.returncode})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)
