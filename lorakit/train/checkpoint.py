"""Training checkpoints that a crash cannot half-write, and resume from the latest complete one.

A checkpoint is a directory `checkpoints/step-00000120/` holding the trained weights (the
adapter in PEFT format in `adapter/`, or for full/freeze runs the trainable parameters in
`trainable/trainable.safetensors`), the optimizer state and RNG states (safetensors: no pickle),
the trainer state (step, data position, best validation loss) as JSON, the resolved config, and
last a `manifest.json` with the SHA-256 of every file. It is built in a temporary sibling
directory, each file fsynced, then renamed into place (`lorakit.atomic.atomic_dir`); a directory
without a manifest, or whose files do not match it, is never resumed from.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import torch

from lorakit.atomic import atomic_dir, clean_temps
from lorakit.errors import LorakitError

MANIFEST = "manifest.json"
_PREFIX = "step-"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, json) capturing torch's CPU/CUDA generators and Python's `random`."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], js: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = js["python"]
    random.setstate((version, tuple(internal), gauss))


def optimizer_to_files(optimizer: torch.optim.Optimizer | dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state, or its `state_dict()` gathered in advance (FSDP), as files."""
    sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors = {f"{pid}.{name}": t.detach().cpu().contiguous()
               for pid, st in sd["state"].items() for name, t in st.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         js: dict) -> None:
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = t
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in js["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(ckpt_root: Path, step: int, write_weights, optimizer: torch.optim.Optimizer,
                    trainer_state: dict, config_yaml: str, keep: int,
                    weights_dir: str = "adapter") -> Path:
    """Write `ckpt_root/step-NNNNNNNN/` atomically and prune to the newest `keep` complete ones.

    `write_weights(dir)` saves the trained weights into `dir`, the checkpoint's `weights_dir`
    subfolder (the adapter in PEFT format, or the trainable parameters of a full/freeze run).
    """
    from safetensors.torch import save_file

    final = ckpt_root / f"{_PREFIX}{step:08d}"
    with atomic_dir(final) as tmp:
        write_weights(tmp / weights_dir)
        opt_tensors, opt_json = optimizer_to_files(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_json = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        state = {"step": step, **trainer_state, "optimizer": opt_json, "rng": rng_json}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        (tmp / "config.yaml").write_text(config_yaml)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): _sha256(p) for p in files}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": manifest}, indent=1))
    prune(ckpt_root, keep)
    return final


def is_complete(ckpt: Path) -> bool:
    """A manifest is present and every file it lists exists with the recorded hash."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return False
    return all((ckpt / name).is_file() and _sha256(ckpt / name) == digest
               for name, digest in files.items())


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary and broken ones skipped)."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir()
             if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit()]
    return [p for p in sorted(found, key=lambda p: int(p.name[len(_PREFIX):])) if is_complete(p)]


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = complete_checkpoints(ckpt_root)
    return found[-1] if found else None


def prune(ckpt_root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove older ones and stale temporaries."""
    complete = complete_checkpoints(ckpt_root)
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    clean_temps(ckpt_root)


def load_checkpoint(ckpt: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(trainer state json, optimizer tensors, rng tensors) of a complete checkpoint."""
    from safetensors.torch import load_file

    if not is_complete(ckpt):
        raise LorakitError(f"{ckpt}: incomplete checkpoint (manifest missing or files do not match)")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return state, load_file(str(ckpt / "optimizer.safetensors")), load_file(str(ckpt / "rng.safetensors"))
