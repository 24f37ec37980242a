"""The GGUF conversion cache: converted once, hashes remembered, never a half-written directory
used, and concurrent converters leaving one complete cache."""

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from lorakit.models import gguf_cache, load_base
from lorakit.models.gguf_cache import MANIFEST, convert_gguf, file_sha256, is_complete, models_dir
from tests import tiny
from tests.models.tiny_gguf import write_llama_gguf


@pytest.fixture
def gguf_file(tmp_path, llama, tokenizer) -> Path:
    return write_llama_gguf(tmp_path / "tiny-llama.gguf", llama, tokenizer)


@pytest.fixture
def conversions(monkeypatch) -> list[Path]:
    """Record every conversion transformers is asked to do."""
    calls: list[Path] = []
    real = gguf_cache._convert_into

    def counting(gguf_path, out, arch):
        calls.append(out)
        real(gguf_path, out, arch)

    monkeypatch.setattr(gguf_cache, "_convert_into", counting)
    return calls


def _leftovers() -> list[str]:
    return sorted(p.name for p in models_dir().iterdir() if ".tmp-" in p.name)


def test_converted_once_then_read_from_cache(gguf_file, conversions, llama):
    first, _ = load_base(gguf_file)
    second, _ = load_base(gguf_file)
    assert len(conversions) == 1
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)
        assert torch.equal(second(ids).logits, llama(ids).logits)
    sha = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    cache = models_dir() / f"tiny-llama-{sha[:16]}"
    assert is_complete(cache)
    manifest = json.loads((cache / MANIFEST).read_text())
    assert manifest["sha256"] == sha and manifest["architecture"] == "llama"
    assert manifest["source"] == str(gguf_file.resolve())
    assert _leftovers() == []


def test_file_hash_is_remembered_until_the_file_changes(gguf_file, monkeypatch):
    real = hashlib.sha256
    hashed: list[int] = []

    def counting(*args):
        hashed.append(1)
        return real(*args)

    monkeypatch.setattr(gguf_cache.hashlib, "sha256", counting)
    want = real(gguf_file.read_bytes()).hexdigest()
    assert file_sha256(gguf_file) == want
    assert file_sha256(gguf_file) == want
    assert len(hashed) == 1
    entry = json.loads((models_dir() / "gguf_sha256.json").read_text())[str(gguf_file.resolve())]
    st = gguf_file.stat()
    assert entry == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": want}

    # Same size, new mtime and content: hashed again, and a new cache key.
    data = bytearray(gguf_file.read_bytes())
    data[-1] ^= 0xFF
    gguf_file.write_bytes(bytes(data))
    st = gguf_file.stat()
    os.utime(gguf_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert file_sha256(gguf_file) == real(bytes(data)).hexdigest() != want
    assert len(hashed) == 2


def test_damaged_hash_file_is_rebuilt(gguf_file):
    models_dir().mkdir(parents=True)
    (models_dir() / "gguf_sha256.json").write_text("{half written")
    assert file_sha256(gguf_file) == hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    assert str(gguf_file.resolve()) in json.loads((models_dir() / "gguf_sha256.json").read_text())


def test_half_written_cache_is_never_used(gguf_file, conversions, llama):
    sha = file_sha256(gguf_file)
    final = models_dir() / f"tiny-llama-{sha[:16]}"
    # A crashed converter's temporary directory, and a final-named directory without manifest.
    stale = models_dir() / f".{final.name}.tmp-999-dead"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"garbage")
    final.mkdir()
    (final / "config.json").write_text("{}")
    (final / "model.safetensors").write_bytes(b"garbage")
    model, _ = load_base(gguf_file)
    assert len(conversions) == 1
    assert is_complete(final) and (final / "model.safetensors").stat().st_size > 1000
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, llama(ids).logits)
    assert _leftovers() == []


def test_interrupted_conversion_leaves_nothing_behind(gguf_file, monkeypatch):
    def dies_halfway(gguf_path, out, arch):
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_cache, "_convert_into", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(gguf_file)
    assert [p for p in models_dir().iterdir() if p.is_dir()] == []
    monkeypatch.undo()
    assert is_complete(convert_gguf(gguf_file))


# Converters race in separate processes: transformers' from_pretrained swaps class attributes
# (PreTrainedModel.tie_weights, torch.nn.init functions) in and out while loading, so two loads on
# threads of one process can leave them swapped, breaking every later test in the process.
_CHILD = """
import contextlib, os, sys, time
from pathlib import Path
from lorakit.models import gguf_cache

gguf_file, rendezvous, use_lock = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "lock"
if not use_lock:
    @contextlib.contextmanager
    def no_lock(path):
        yield False
    gguf_cache._exclusive = no_lock
    real = gguf_cache._convert_into
    def in_step(gguf_path, out, arch):
        # Both processes are mid-conversion at once before either writes anything.
        (rendezvous / str(os.getpid())).touch()
        deadline = time.monotonic() + 120
        while len(list(rendezvous.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        real(gguf_path, out, arch)
    gguf_cache._convert_into = in_step
print("RESULT", gguf_cache.convert_gguf(gguf_file))
"""


def _race(gguf_file: Path, tmp_path: Path, lock: bool, n: int = 2) -> tuple[list[Path], str]:
    rendezvous = tmp_path / "rendezvous"
    rendezvous.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(gguf_file), str(rendezvous),
                               "lock" if lock else "nolock"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(n)]
    results, stderr = [], ""
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        results += [Path(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("RESULT ")]
        stderr += err
    return results, stderr


def test_concurrent_converters_with_the_lock_convert_once(gguf_file, tmp_path):
    results, stderr = _race(gguf_file, tmp_path, lock=True)
    assert len(results) == 2 and len(set(results)) == 1 and is_complete(results[0])
    assert stderr.count("lorakit: converting") == 1
    assert _leftovers() == []


def test_concurrent_converters_without_a_lock_still_leave_one_complete_cache(gguf_file, tmp_path, llama):
    """Where flock is missing both convert; the rename lets exactly one copy in, whole."""
    results, stderr = _race(gguf_file, tmp_path, lock=False)
    assert stderr.count("lorakit: converting") == 2
    assert len(results) == 2 and len(set(results)) == 1 and is_complete(results[0])
    assert _leftovers() == []
    model, _ = load_base(gguf_file)
    ids = torch.tensor([[7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, llama(ids).logits)


def test_threads_in_one_process_convert_once(gguf_file, conversions):
    """Threads share lorakit's in-process lock, so transformers is never entered twice at once."""
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(convert_gguf(gguf_file))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 3 and len(set(results)) == 1 and is_complete(results[0])
    assert len(conversions) == 1
    tied = tiny.tiny_llama(tie=True)  # transformers' class-level patches were all undone
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_cache_files_are_not_private(gguf_file):
    cache = convert_gguf(gguf_file)
    mode = cache.stat().st_mode & 0o777
    assert mode & 0o044 == 0o777 & ~_umask() & 0o044
    for p in cache.iterdir():
        assert p.stat().st_mode & 0o666 == mode & 0o666, p.name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
