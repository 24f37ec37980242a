"""Merge an adapter into its base for deployment: `W' = W + scaling * B A`, computed in fp32.

`merged_state_dict` is the pure form (base state dict + adapter files -> merged state dict) that
export uses; `merge_to_directory` writes a plain transformers model directory (safetensors,
config, tokenizer) that `AutoModelForCausalLM.from_pretrained` loads with no lorakit code.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from lorakit.adapters.io import AdapterFiles, _fsync_dir, _replace_dir
from lorakit.errors import MergeError


def merged_state_dict(base: dict[str, torch.Tensor], adapter: AdapterFiles,
                      conv1d_modules: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """A copy of `base` with every adapted weight replaced by W + scaling * B A (fp32 math).

    `conv1d_modules` names modules whose weight is stored (d_in, d_out) (transformers' Conv1D).
    Non-finite merged weights are refused.
    """
    cfg = adapter.config
    out = dict(base)
    for module in adapter.modules():
        key = f"{module}.weight"
        if key not in base:
            raise MergeError(f"{adapter.path}: module {module} has no weight {key} in the base")
        a = adapter.tensors[f"base_model.model.{module}.lora_A.weight"].float()  # (r, d_in)
        b = adapter.tensors[f"base_model.model.{module}.lora_B.weight"].float()  # (d_out, r)
        delta = cfg.scaling * (b @ a)  # (d_out, d_in)
        if module in conv1d_modules:
            delta = delta.T
        w = base[key]
        merged = (w.float() + delta).to(w.dtype)
        if not torch.isfinite(merged).all():
            raise MergeError(f"{adapter.path}: merging into {key} gives non-finite weights")
        out[key] = merged
    return out


def merge_to_directory(model_spec: str, adapter_dir: str | Path, out_dir: str | Path,
                       dtype: str = "fp32", force: bool = False) -> Path:
    """Load base + adapter, merge, and save a standalone model directory atomically."""
    from lorakit.adapters.io import load_adapter
    from lorakit.device import dtype_of
    from lorakit.lora import merge_and_unload
    from lorakit.models import load_base

    # Merge in fp32 whatever the output dtype, then cast once.
    model, tokenizer = load_base(model_spec, dtype=torch.float32, device="cpu")
    load_adapter(model, adapter_dir, force=force)
    merge_and_unload(model, safe=True)
    model = model.to(dtype_of(dtype))
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        for p in tmp.iterdir():
            if p.is_file():
                with open(p, "rb+") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
