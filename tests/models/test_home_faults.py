"""A LORAKIT_HOME that cannot take the GGUF conversion cache or the adapter registry: a file, a
read-only or a full disk. Each is one error naming the path and what is wrong, and leaves nothing
half-written."""

import pytest

from lorakit.cli import main
from lorakit.errors import ModelLoadError, RegistryError, StorageError
from lorakit.models import load_base
from lorakit.serve.registry import AdapterRegistry
from tests.full_disk import tiny_tmpfs
from tests.models.tiny_gguf import write_llama_gguf


@pytest.fixture
def gguf_file(tmp_path, llama, tokenizer):
    return write_llama_gguf(tmp_path / "tiny-llama.gguf", llama, tokenizer)


def test_home_is_a_file(gguf_file, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.write_text("a file where the folder should be")
    monkeypatch.setenv("LORAKIT_HOME", str(home))
    with pytest.raises(ModelLoadError) as info:
        load_base(str(gguf_file))
    assert str(info.value) == (f"{home / 'models'}: cannot create the GGUF conversion cache (a "
                               "part of the path is a file, not a folder); expected a writable "
                               "folder (set LORAKIT_HOME)")


def test_home_on_a_read_only_disk(gguf_file, tmp_path, monkeypatch, capsys):
    with tiny_tmpfs(tmp_path / "ro", read_only=True) as home:
        monkeypatch.setenv("LORAKIT_HOME", str(home))
        with pytest.raises(ModelLoadError) as info:
            load_base(str(gguf_file))
        assert str(info.value) == (f"{home / 'models'}: cannot create the GGUF conversion cache "
                                   "(the file system is read-only); expected a writable folder "
                                   "(set LORAKIT_HOME)")
        # The command line says it in one line, exit 2.
        assert main(["generate", "--model", str(gguf_file), "--prompt", "hi"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"lorakit generate: error: {info.value}"]


def test_home_on_a_full_disk(gguf_file, tmp_path, monkeypatch):
    # 64 KiB take the hash file, not the converted model (~600 KB).
    with tiny_tmpfs(tmp_path / "full", size_kib=64) as home:
        monkeypatch.setenv("LORAKIT_HOME", str(home))
        with pytest.raises(StorageError) as info:
            load_base(str(gguf_file))
        msg = str(info.value)
        assert msg.startswith(f"{home / 'models' / 'tiny-llama-'}")
        assert msg.endswith(": cannot write (no space left on the device); expected a writable "
                            "folder with free space")
        # No half-written cache: only the hash file and the lock are left.
        left = sorted(p.name for p in (home / "models").iterdir())
        assert left[0].startswith(".tiny-llama-") and left[0].endswith(".lock")
        assert left[1:] == ["gguf_sha256.json"]


# The adapter registry lives in LORAKIT_HOME too: the same faults, each with its own fix.

def test_registry_in_a_home_that_is_a_file(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.write_text("a file where the folder should be")
    monkeypatch.setenv("LORAKIT_HOME", str(home))
    assert main(["adapters", "list"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"lorakit adapters: error: {home / 'adapters.sqlite'}: cannot create its folder (a file "
        "is in the way where a folder is expected); set LORAKIT_HOME to a writable folder"]


def test_registry_on_a_read_only_disk(tmp_path, monkeypatch):
    with tiny_tmpfs(tmp_path / "ro", read_only=True) as home:
        monkeypatch.setenv("LORAKIT_HOME", str(home))
        with pytest.raises(RegistryError) as info:
            AdapterRegistry()
        assert str(info.value) == (f"{home / 'adapters.sqlite'}: the adapter registry cannot be "
                                   "used (unable to open database file); make the file and its "
                                   "folder writable, or set LORAKIT_HOME elsewhere")


def test_registry_on_a_full_disk(tmp_path, monkeypatch):
    with tiny_tmpfs(tmp_path / "full", size_kib=16) as home:
        with pytest.raises(OSError), open(home / "filler", "wb") as f:
            f.write(b"x" * (64 << 10))  # fills the disk
        monkeypatch.setenv("LORAKIT_HOME", str(home))
        with pytest.raises(RegistryError) as info:
            AdapterRegistry()
        # Free space, not "move the registry aside": nothing is wrong with it.
        assert str(info.value) == (f"{home / 'adapters.sqlite'}: the adapter registry cannot be "
                                   "used (database or disk is full); free space on that disk, or "
                                   "set LORAKIT_HOME elsewhere")
