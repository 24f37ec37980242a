"""GGUF files: checking them, hashing them, and converting them once into a safetensors cache.

transformers can build a model straight from a GGUF file (`from_pretrained(dir, gguf_file=...)`,
`GgufConfig(dequantize=True)`), but it dequantizes every tensor on every load (~20 s for the
bundled 135M model on 2 CPU cores). We do it once and keep the result as a plain Hugging Face
directory under `lorakit_home()/models/<file stem>-<first 16 hex of the file's sha256>/`, which
loads in about a second.

The cache follows the usual write-then-rename recipe (`lorakit.atomic.atomic_dir`, as git
objects and pip's wheel cache do): each converter writes into its own temporary sibling
directory, writes a manifest last, fsyncs every file and folder, and renames it into place. A
directory under the final name is therefore always complete; a crash leaves only a `.tmp-`
sibling, which is never read and is removed by the next converter. An advisory lock (POSIX
`flock`) keeps concurrent converters from doing the work twice; without it the rename alone still
keeps the cache whole.

File hashes are remembered in `models/gguf_sha256.json`, keyed by (absolute path, size, mtime),
so a 100 MB file is hashed again only when it changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from lorakit.atomic import atomic_dir, atomic_file, write_failure
from lorakit.errors import ModelLoadError, StorageError
from lorakit.paths import lorakit_home

# transformers' from_pretrained swaps class attributes (PreTrainedModel.tie_weights,
# torch.nn.init functions) in and out while it loads; two loads on threads of one process can
# restore each other's replacements and leave models untied and uninitialised afterwards. Every
# from_pretrained of a model in lorakit.models holds this lock.
FROM_PRETRAINED_LOCK = threading.Lock()

GGUF_MAGIC = b"GGUF"
MANIFEST = "lorakit_conversion.json"
HASHES_FILE = "gguf_sha256.json"


def models_dir() -> Path:
    """Where converted GGUF models live: `lorakit_home()/models`."""
    return lorakit_home() / "models"


# ---------------------------------------------------------------------------------------------
# Checking a GGUF file before transformers sees it
# ---------------------------------------------------------------------------------------------

def check_magic(path: Path) -> None:
    """Raise ModelLoadError unless the file starts with the 4 bytes `GGUF`."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read the file ({e.strerror}); "
                             f"expected a readable .gguf file") from e
    if head != GGUF_MAGIC:
        raise ModelLoadError(
            f"{path}: not a GGUF file (starts with {head!r}, expected the magic bytes b'GGUF'); "
            f"pass a .gguf file, a Hugging Face model directory or a bundled model name")


def gguf_architecture(path: Path) -> str:
    """Parse the whole file with gguf.GGUFReader and return `general.architecture`.

    The reader maps every tensor against the file size, so a truncated download fails here with
    a clear message instead of deep inside transformers' dequantizer.
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader raises IndexError/ValueError/struct errors on bad files
        raise ModelLoadError(
            f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e}); "
            f"expected a complete GGUF file (re-download or re-export it)") from e
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ModelLoadError(f"{path}: GGUF file has no 'general.architecture' key; "
                             f"expected a model file written by llama.cpp's converter or gguf.GGUFWriter")
    arch = field.contents()
    if not reader.tensors:
        raise ModelLoadError(f"{path}: GGUF file (architecture {arch!r}) holds no tensors; "
                             f"expected model weights")
    return str(arch)


# ---------------------------------------------------------------------------------------------
# Hashing, with the result remembered by (path, size, mtime)
# ---------------------------------------------------------------------------------------------

def _read_hashes(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}  # a missing or damaged hash cache only costs a rehash
    return data if isinstance(data, dict) else {}


def _write_json_atomic(file: Path, data: dict) -> None:
    with atomic_file(file) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)


def file_sha256(path: Path) -> str:
    """sha256 of a file, reusing the remembered value while its size and mtime are unchanged."""
    path = path.resolve()
    st = path.stat()
    key = str(path)
    hashes_file = models_dir() / HASHES_FILE
    known = _read_hashes(hashes_file).get(key)
    if (isinstance(known, dict) and known.get("size") == st.st_size
            and known.get("mtime_ns") == st.st_mtime_ns and isinstance(known.get("sha256"), str)):
        return known["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    # Re-read just before writing so entries added meanwhile by other processes are kept.
    hashes = _read_hashes(hashes_file)
    hashes[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    # A read-only or full home still loads, it just rehashes next time.
    with contextlib.suppress(OSError, StorageError):
        _write_json_atomic(hashes_file, hashes)
    return digest


# ---------------------------------------------------------------------------------------------
# The conversion cache
# ---------------------------------------------------------------------------------------------

def cache_dir_for(path: Path, sha256: str) -> Path:
    """`models/<file stem>-<first 16 hex of sha256>`."""
    return models_dir() / f"{path.stem}-{sha256[:16]}"


def is_complete(cache: Path) -> bool:
    """A cache directory is usable once its manifest (written last, before the rename) exists."""
    return (cache / MANIFEST).is_file() and (cache / "config.json").is_file()


@contextlib.contextmanager
def _exclusive(lock_file: Path):
    """Hold an exclusive advisory lock on `lock_file` (a no-op where flock does not exist)."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(lock_file, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _umask_modes(root: Path) -> None:
    """Make every file readable as the umask allows."""
    # safetensors writes private 0o600 files; give them the folder's permissions (made by mkdir,
    # so the umask's), read-write without execute. Reading the umask itself would change it.
    mode = root.stat().st_mode & 0o666
    for p in root.rglob("*"):
        if p.is_file():
            with contextlib.suppress(OSError):
                os.chmod(p, mode)


def _convert_into(gguf_path: Path, out: Path, arch: str) -> None:
    """Dequantize the GGUF with transformers and save model + tokenizer as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    from lorakit.lora.quant import quiet_torchao

    try:
        with FROM_PRETRAINED_LOCK, quiet_torchao():
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch.float32,
                # dequantize=True gives plain nn.Linear weights and drops the quantizer, which is
                # what lets save_pretrained write an ordinary checkpoint.
                quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, NotImplementedError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelLoadError(
            f"{gguf_path}: transformers cannot build GGUF architecture {arch!r} ({msg}); "
            f"expected an architecture transformers supports for GGUF (e.g. llama, qwen2, mistral)") from e
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def convert_gguf(gguf_path: Path) -> Path:
    """The cached safetensors directory for a GGUF file, converting it on first use.

    `gguf_path` must exist; it is checked (magic, full parse) before conversion. Returns the
    final cache directory, which is complete whenever it exists.
    """
    gguf_path = gguf_path.resolve()
    check_magic(gguf_path)
    sha = file_sha256(gguf_path)
    final = cache_dir_for(gguf_path, sha)
    if is_complete(final):
        return final
    arch = gguf_architecture(gguf_path)

    root = models_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(f"{root}: cannot create the GGUF conversion cache "
                             f"({write_failure(e) or e.strerror}); expected a writable folder "
                             "(set LORAKIT_HOME)") from e
    with _exclusive(root / f".{final.name}.lock") as locked:
        if is_complete(final):  # another process converted it while we waited for the lock
            return final
        if locked:
            # Holding the lock, any temporary sibling belongs to a converter that died.
            for stale in root.glob(f".{final.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        print(f"lorakit: converting {gguf_path.name} ({arch}) to safetensors once, into {final} "
              f"(dequantizing every tensor; later loads read this cache)", file=sys.stderr, flush=True)
        start = time.perf_counter()
        # An incomplete directory under the final name (left by hand or an older tool) is replaced.
        with atomic_dir(final) as tmp:
            _convert_into(gguf_path, tmp, arch)
            manifest = {"source": str(gguf_path), "sha256": sha, "architecture": arch,
                        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "transformers_version": _version("transformers"), "gguf_version": _version("gguf")}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            _umask_modes(tmp)
        print(f"lorakit: converted in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return final


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
