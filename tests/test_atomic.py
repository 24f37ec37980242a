"""The one atomic writer: old content or the whole new one, never a part, and no temporary left
behind; write failures as one-line StorageErrors naming the path."""

import errno
import os
import subprocess
import sys

import pytest

from lorakit.atomic import (
    atomic_dir, atomic_file, clean_temps, make_folder, storage_error, temp_sibling, write_text,
    writing,
)
from lorakit.errors import LorakitError, StorageError
from tests.full_disk import tiny_tmpfs


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_dir_writes_and_replaces_an_existing_dir(tmp_path):
    out = tmp_path / "adapter"
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".adapter.tmp-")
        (tmp / "a.txt").write_text("one")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("two")
        assert not out.exists()  # nothing under the final name until the block ends
    assert (out / "a.txt").read_text() == "one" and (out / "sub" / "b.txt").read_text() == "two"

    with atomic_dir(out) as tmp:
        (tmp / "c.txt").write_text("three")
    assert _names(out) == ["c.txt"]  # replaced whole, not merged
    assert _names(tmp_path) == ["adapter"]  # no temporary, no old copy left


def test_a_failure_inside_atomic_dir_leaves_the_old_content(tmp_path):
    out = tmp_path / "adapter"
    write_text(out / "a.txt", "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("new, half")
            raise KeyboardInterrupt
    assert (out / "a.txt").read_text() == "old"
    assert _names(tmp_path) == ["adapter"]


def test_a_failure_inside_atomic_file_leaves_the_old_content(tmp_path):
    out = tmp_path / "report.json"
    write_text(out, "old")
    with pytest.raises(ValueError, match="boom"):
        with atomic_file(out) as tmp:
            tmp.write_text("new, half")
            raise ValueError("boom")
    assert out.read_text() == "old"
    assert _names(tmp_path) == ["report.json"]
    with atomic_file(out) as tmp:
        tmp.write_text("new")
    assert out.read_text() == "new" and _names(tmp_path) == ["report.json"]


def test_parent_folders_are_made(tmp_path):
    assert write_text(tmp_path / "a" / "b" / "c.txt", "x").read_text() == "x"
    with atomic_dir(tmp_path / "d" / "e") as tmp:
        (tmp / "f").write_text("y")
    assert (tmp_path / "d" / "e" / "f").read_text() == "y"


def test_a_file_in_place_of_a_folder_is_a_storage_error(tmp_path):
    # Tests run as root, which ignores chmod 0555; a path under a file fails for everyone.
    blocker = tmp_path / "somefile"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError) as info:
        with atomic_dir(blocker / "sub" / "adapter"):
            pass
    msg = str(info.value)
    assert str(blocker) in msg and "\n" not in msg
    assert "a file" in msg
    assert msg == (f"{blocker / 'sub'}: cannot create the folder (a part of the path is a file, "
                   "not a folder); expected a writable folder with free space")
    with pytest.raises(StorageError) as info:
        make_folder(blocker, "train.output_dir")
    assert str(info.value) == f"{blocker} (train.output_dir): is a file; expected a folder"
    with pytest.raises(StorageError, match="somefile: is a file; expected a folder"):
        write_text(blocker / "x.json", "{}")
    assert blocker.read_text() == "not a folder"
    assert isinstance(StorageError("x"), LorakitError)


@pytest.mark.parametrize("code, words", [
    (errno.EROFS, "the file system is read-only"),
    (errno.ENOSPC, "no space left on the device"),
    (errno.EACCES, "permission denied"),
    (errno.ENOTDIR, "a part of the path is a file, not a folder"),
])
def test_write_errors_in_words(tmp_path, code, words):
    err = storage_error(tmp_path / "out", OSError(code, os.strerror(code)))
    assert str(err) == (f"{tmp_path / 'out'}: cannot write ({words}); expected a writable folder "
                        "with free space")
    # safetensors reports I/O errors from Rust as text
    rust = Exception(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")
    assert str(storage_error(tmp_path / "out", rust)) == str(err)
    assert storage_error(tmp_path, ValueError("unrelated")) is None
    assert storage_error(tmp_path, OSError(errno.ENOENT, "gone")) is None


_FULL_DISK_CHILD = """
import resource, signal, sys, torch
from safetensors.torch import save_file
from lorakit.atomic import atomic_dir
from lorakit.errors import StorageError
# Every write past 64 KiB fails with EFBIG, as a full disk fails one with ENOSPC; root is bound too.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
try:
    with atomic_dir(sys.argv[1]) as tmp:
        save_file({"w": torch.zeros(1 << 16)}, str(tmp / "big.safetensors"))
except StorageError as e:
    print("StorageError:", e)
"""


def test_a_write_that_runs_out_of_room_is_a_storage_error(tmp_path):
    out = tmp_path / "adapter"
    write_text(out / "a.txt", "old")
    run = subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD, str(out)], capture_output=True,
                         text=True, timeout=120)
    assert run.stdout.strip() == (f"StorageError: {out}: cannot write (the file is larger than "
                                  "the system allows); expected a writable folder with free space")
    assert (out / "a.txt").read_text() == "old" and _names(tmp_path) == ["adapter"]


def test_a_full_disk_is_a_storage_error_and_keeps_the_old_content(tmp_path):
    with tiny_tmpfs(tmp_path / "disk", size_kib=64) as disk:
        out = disk / "adapter"
        write_text(out / "a.txt", "old")
        with pytest.raises(StorageError) as info:
            with atomic_dir(out) as tmp:
                (tmp / "big.bin").write_bytes(b"x" * (256 << 10))
        assert str(info.value) == (f"{out}: cannot write (no space left on the device); expected "
                                   "a writable folder with free space")
        assert (out / "a.txt").read_text() == "old" and _names(disk) == ["adapter"]


def test_clean_temps_removes_dead_writers_only(tmp_path):
    out = tmp_path / "adapter"
    dead = tmp_path / ".adapter.tmp-abc123"  # mkdtemp-style name of an older lorakit: no pid
    dead.mkdir()
    (dead / "adapter_model.safetensors").write_bytes(b"partial")
    live = out.with_name(f".adapter.tmp-{os.getppid()}-0a0a")  # a running process: kept
    live.mkdir()
    (tmp_path / ".report.json.tmp-999999999-ffff").write_text("partial")  # pid beyond pid_max
    mine = temp_sibling(tmp_path / "other")
    mine.write_text("left by this very process: it is not writing now")
    (tmp_path / "keep.txt").write_text("kept")
    assert clean_temps(tmp_path, "adapter") == [dead]
    assert clean_temps(tmp_path) == sorted([tmp_path / ".report.json.tmp-999999999-ffff", mine])
    assert _names(tmp_path) == sorted([live.name, "keep.txt"])
    assert clean_temps(tmp_path / "missing") == []


def test_writing_names_the_path_of_a_failed_append(tmp_path):
    log = tmp_path / "somefile" / "metrics.jsonl"
    (tmp_path / "somefile").write_text("not a folder")
    with pytest.raises(StorageError) as info:
        with writing(log), open(log, "a") as f:
            f.write("{}\n")
    assert str(info.value) == (f"{log}: cannot write (a part of the path is a file, not a "
                               "folder); expected a writable folder with free space")
    with pytest.raises(FileNotFoundError):  # not a write failure: left as it is
        with writing(log):
            open(tmp_path / "missing.txt").read()


def test_old_dir_is_put_back_when_the_final_rename_fails(tmp_path, monkeypatch):
    import lorakit.atomic as atomic

    out = tmp_path / "adapter"
    write_text(out / "a.txt", "old")
    real_replace, failed = os.replace, []

    def fail_on_the_new_one(src, dst):  # the first rename onto `out`: the new folder's
        if str(dst) == str(out) and not failed:
            failed.append(src)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", fail_on_the_new_one)
    with pytest.raises(StorageError, match="no space left on the device"):
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("new")
    assert (out / "a.txt").read_text() == "old" and _names(tmp_path) == ["adapter"]
