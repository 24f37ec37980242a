"""Full and read-only disks for tests: a tiny tmpfs mounted for the test's length. Tests run as
root, which chmod cannot stop, but a full or read-only file system stops everyone. Mounting needs
CAP_SYS_ADMIN (our containers have it); the test is skipped where it is refused."""

import contextlib
import subprocess
from pathlib import Path

import pytest


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size_kib: int = 64, read_only: bool = False):
    """Mount a `size_kib` KiB tmpfs at `where` (made if missing), read-only if asked, and unmount
    it afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    options = f"size={size_kib}k" + (",ro" if read_only else "")
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                         capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({run.stderr.strip() or run.returncode})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)
