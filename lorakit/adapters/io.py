"""Adapter directories in PEFT's on-disk format: save, read, check and load.

A directory holds `adapter_config.json` (PEFT's `LoraConfig` fields) and
`adapter_model.safetensors` with keys `base_model.model.<module path>.lora_A.weight` and
`.lora_B.weight` (PEFT's `get_peft_model_state_dict` naming, adapter name removed), so PEFT's
`PeftModel.from_pretrained` and vLLM read what we write, and we read theirs.

The base model's identity goes with the adapter: its name in the config's
`base_model_name_or_path` (PEFT's own field) and a hash of its weights in the safetensors header
metadata (`lorakit.base_weights_sha256`), where PEFT and vLLM ignore it rather than warn.

Only safetensors are read: a pickled `adapter_model.bin` can run code when loaded. Reading and
checking a directory is the one adapter checker's job (`lorakit/adapters/check.py`); `load_adapter`
calls it against the model before changing anything.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

# The names, the record and the readers live with the one checker (check.py), imported from
# here too by older callers.
from lorakit.adapters.check import (  # noqa: F401
    CONFIG_NAME, HASH_KEY, NAME_KEY, PICKLE_NAME, WEIGHTS_NAME, AdapterFiles, BaseModules,
    open_adapter, read_adapter,
)
from lorakit.atomic import atomic_dir
from lorakit.errors import AdapterError
from lorakit.lora.config import ALL_LINEAR, LoraConfig
from lorakit.lora.inject import PEFT_PREFIX, inject, lora_layers, lora_state_dict
from lorakit.lora.layer import LoraLinear


def _pissa_as_lora_config(cfg: LoraConfig) -> LoraConfig:
    """The config of a PiSSA adapter written as a rank-2r LoRA: same scaling, plain init."""
    factor = math.sqrt(2) if cfg.use_rslora else 2  # alpha' / f(2r) == alpha / f(r)
    return replace(cfg, r=2 * cfg.r, lora_alpha=factor * cfg.lora_alpha,
                   rank_pattern={k: 2 * v for k, v in cfg.rank_pattern.items()},
                   alpha_pattern={k: factor * v for k, v in cfg.alpha_pattern.items()},
                   init_lora_weights=True)


def save_adapter(model: nn.Module, cfg: LoraConfig, out_dir: str | Path,
                 base_identity: dict | None = None, pissa_as_lora: bool = True) -> Path:
    """Write the model's LoRA layers as a PEFT adapter directory, atomically.

    `base_identity` ({name, weights_sha256}) defaults to `model.lorakit_identity` when the base
    came from `lorakit.models.load_base`. A PiSSA adapter is written as a plain LoRA against the
    original base (see `lora_state_dict`) unless `pissa_as_lora` is False (checkpoints).
    """
    out = Path(out_dir)
    tensors = {k: v.detach().to("cpu").contiguous()
               for k, v in lora_state_dict(model, pissa_as_lora).items()}
    if not tensors:
        raise AdapterError("the model has no LoRA layers to save (call lorakit.lora.inject first)")
    identity = base_identity if base_identity is not None else getattr(model, "lorakit_identity", None)
    identity = identity or {}
    layers = dict(lora_layers(model))
    leaves = sorted({name.rsplit(".", 1)[-1] for name in layers})
    conv1d = any(layer.fan_in_fan_out for layer in layers.values())
    saved_cfg = replace(cfg, fan_in_fan_out=conv1d)
    if pissa_as_lora and any(layer.pissa_initial is not None for layer in layers.values()):
        saved_cfg = _pissa_as_lora_config(saved_cfg)
    # Leaf names state plainly what is adapted (vLLM reads them to size its slots), but only when
    # they select the same modules: a regex or a dotted path (one layer's q_proj) is kept as given.
    tm = cfg.target_modules
    plain = tm == ALL_LINEAR or (isinstance(tm, list) and all("." not in t for t in tm))
    config = saved_cfg.to_peft_dict(leaves if plain else tm, identity.get("name"))
    metadata = {"format": "pt"}
    if identity.get("weights_sha256"):
        metadata[HASH_KEY] = identity["weights_sha256"]
    if identity.get("name"):
        metadata[NAME_KEY] = str(identity["name"])

    return write_adapter_files(tensors, config, metadata, out)


def write_adapter_files(tensors: dict[str, torch.Tensor], config: dict, metadata: dict[str, str],
                        out_dir: str | Path) -> Path:
    """Write an adapter directory from raw tensors and a config dict, atomically: a temp dir
    beside it, fsync, rename; an old directory is removed only after the new one is in place."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                  str(tmp / WEIGHTS_NAME), metadata={"format": "pt", **metadata})
        with open(tmp / CONFIG_NAME, "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
    return out


def load_adapter(model: nn.Module, adapter_dir: str | Path, force: bool = False,
                 dtype: torch.dtype | None = None) -> LoraConfig:
    """Inject the adapter's layers into `model` and load its weights; return its config.

    The adapter is checked against the base by `lorakit.adapters.check.open_adapter` before
    anything is changed: its modules exist and are linear, shapes fit, and every module the
    config targets has its A and B.
    """
    files = open_adapter(adapter_dir, BaseModules.of(model), force=force, allow_pissa=True)
    cfg = files.config
    modules = dict(model.named_modules())
    wrapped = [m for m in files.modules() if isinstance(modules.get(m), LoraLinear)]
    if wrapped:
        raise AdapterError(f"{files.path / WEIGHTS_NAME}: {PEFT_PREFIX}{wrapped[0]}: the model "
                           "already has a LoRA layer there")

    # A full-SVD PiSSA adapter (PEFT's unconverted form) is loaded as PEFT does: the SVD is
    # recomputed and the base replaced by its residual before the trained A and B go in.
    inject(model, cfg, dtype=dtype)
    with torch.no_grad():
        for name, layer in lora_layers(model):
            params = [(f"{PEFT_PREFIX}{name}.{p}.weight", getattr(layer, p).weight)
                      for p in ("lora_A", "lora_B")]
            if layer.use_dora:
                params.append((f"{PEFT_PREFIX}{name}.lora_magnitude_vector",
                               layer.lora_magnitude_vector))
            for key, dst in params:
                dst.copy_(files.tensors[key].to(dtype=dst.dtype, device=dst.device))
    return cfg


def adapter_size_bytes(adapter_dir: str | Path) -> int:
    return (Path(adapter_dir) / WEIGHTS_NAME).stat().st_size

