"""Adapter directories in PEFT's on-disk format: save, read, check and load.

A directory holds `adapter_config.json` (PEFT's `LoraConfig` fields) and
`adapter_model.safetensors` with keys `base_model.model.<module path>.lora_A.weight` and
`.lora_B.weight` (PEFT's `get_peft_model_state_dict` naming, adapter name removed), so PEFT's
`PeftModel.from_pretrained` and vLLM read what we write, and we read theirs.

The base model's identity goes with the adapter: its name in the config's
`base_model_name_or_path` (PEFT's own field) and a hash of its weights in the safetensors header
metadata (`lorakit.base_weights_sha256`), where PEFT and vLLM ignore it rather than warn.

Only safetensors are read: a pickled `adapter_model.bin` can run code when loaded.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from lorakit.atomic import atomic_dir
from lorakit.errors import AdapterError
from lorakit.lora.config import ALL_LINEAR, LoraConfig
from lorakit.lora.inject import PEFT_PREFIX, inject, is_linear, lora_layers, lora_state_dict
from lorakit.lora.layer import LoraLinear, linear_shape

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
HASH_KEY = "lorakit.base_weights_sha256"
NAME_KEY = "lorakit.base_model"
_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\."
                     r"(?:(?P<part>lora_A|lora_B)\.weight|(?P<magnitude>lora_magnitude_vector))$")


@dataclass
class AdapterFiles:
    """What an adapter directory holds, read and checked on its own (without a base)."""

    path: Path
    config: LoraConfig
    tensors: dict[str, torch.Tensor]  # PEFT key -> tensor
    base_model: str | None
    base_weights_sha256: str | None

    def modules(self) -> list[str]:
        """Module paths that carry an A and a B, sorted."""
        return sorted({_KEY_RE.match(k)["module"] for k in self.tensors})

    def lora_pair(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, d_in), B (d_out, r)) of one module."""
        return (self.tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"],
                self.tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"])


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


def read_adapter_json(adapter_dir: str | Path) -> tuple[dict, Path, Path]:
    """(adapter_config.json as a dict, its path, the weights path) of an adapter directory, after
    the checks every reader needs: the folder and both files exist, no pickled weights, the config
    is a JSON object. What the config and tensors hold is left to the caller."""
    path = Path(adapter_dir)
    if not path.exists():
        raise AdapterError(f"{path}: no such adapter directory")
    if not path.is_dir():
        raise AdapterError(f"{path}: not a directory (expected a folder with {CONFIG_NAME} "
                           f"and {WEIGHTS_NAME})")
    cfg_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not weights_path.exists() and (path / PICKLE_NAME).exists():
        raise AdapterError(
            f"{path / PICKLE_NAME}: pickled adapter weights are refused (loading a pickle can run "
            "code). Convert it once, in an environment you trust: "
            "`python -c \"import torch, safetensors.torch as s; "
            f"s.save_file(torch.load('{path / PICKLE_NAME}', weights_only=True), "
            f"'{weights_path}')\"`")
    for p in (cfg_path, weights_path):
        if not p.exists():
            raise AdapterError(f"{p}: missing (an adapter directory needs {CONFIG_NAME} "
                               f"and {WEIGHTS_NAME})")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object")
    return raw, cfg_path, weights_path


def read_adapter(adapter_dir: str | Path) -> AdapterFiles:
    """Read and check an adapter directory on its own: files, config, key names, values."""
    from safetensors import safe_open

    path = Path(adapter_dir)
    raw, cfg_path, weights_path = read_adapter_json(path)
    cfg = LoraConfig.from_peft_dict(raw, str(cfg_path))

    try:
        with safe_open(str(weights_path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header or size
        raise AdapterError(f"{weights_path}: not a readable safetensors file ({e})") from None

    problems = []
    seen: dict[str, set[str]] = {}
    for key, t in tensors.items():
        m = _KEY_RE.match(key)
        if m is None or (m["magnitude"] and not cfg.use_dora):
            problems.append(f"{key}: unexpected key (expected "
                            "base_model.model.<module>.lora_A.weight or .lora_B.weight"
                            f"{', and .lora_magnitude_vector with use_dora' if m is None else ''})")
            continue
        part = m["part"] or m["magnitude"]
        seen.setdefault(m["module"], set()).add(part)
        r = cfg.r_for(m["module"])
        if not t.is_floating_point():
            problems.append(f"{key}: dtype {t.dtype} (expected a floating-point tensor)")
        elif not torch.isfinite(t).all():
            problems.append(f"{key}: holds NaN or inf values")
        if part == "lora_magnitude_vector":
            if t.dim() != 1:
                problems.append(f"{key}: {t.dim()}-d tensor (expected 1-d, (d_out,))")
        elif t.dim() != 2:
            problems.append(f"{key}: {t.dim()}-d tensor (expected 2-d)")
        elif part == "lora_A" and t.shape[0] != r:
            problems.append(f"{key}: shape {tuple(t.shape)} (expected ({r}, d_in) for r={r})")
        elif part == "lora_B" and t.shape[1] != r:
            problems.append(f"{key}: shape {tuple(t.shape)} (expected (d_out, {r}) for r={r})")
    wanted = {"lora_A", "lora_B"} | ({"lora_magnitude_vector"} if cfg.use_dora else set())
    for module, parts in sorted(seen.items()):
        for part in sorted(wanted - parts):
            suffix = part if part == "lora_magnitude_vector" else f"{part}.weight"
            problems.append(f"{PEFT_PREFIX}{module}.{suffix}: missing (the file has the module's "
                            "other tensors)")
    if not tensors:
        problems.append("no tensors")
    if problems:
        raise AdapterError(f"{weights_path}: bad adapter tensors:\n  " + "\n  ".join(problems))
    return AdapterFiles(path=path, config=cfg, tensors=tensors,
                        base_model=metadata.get(NAME_KEY) or raw.get("base_model_name_or_path"),
                        base_weights_sha256=metadata.get(HASH_KEY))


def _check_base(files: AdapterFiles, model: nn.Module, force: bool) -> None:
    identity = getattr(model, "lorakit_identity", None)
    if force or not identity or not files.base_weights_sha256:
        return
    if identity.get("weights_sha256") != files.base_weights_sha256:
        raise AdapterError(
            f"{files.path}: trained on base {files.base_model!r} (weights "
            f"{files.base_weights_sha256[:12]}), but this base is {identity.get('name')!r} (weights "
            f"{str(identity.get('weights_sha256'))[:12]}); pass force=True (--force) to load anyway")


def load_adapter(model: nn.Module, adapter_dir: str | Path, force: bool = False,
                 dtype: torch.dtype | None = None) -> LoraConfig:
    """Inject the adapter's layers into `model` and load its weights; return its config.

    Every tensor is checked against the base before anything is changed: its module exists and
    is linear, its shape fits, and every module the config targets has its A and B.
    """
    files = read_adapter(adapter_dir)
    _check_base(files, model, force)
    cfg = files.config
    weights_path = files.path / WEIGHTS_NAME
    modules = dict(model.named_modules())
    problems = []
    for module_name in files.modules():
        module = modules.get(module_name)
        if isinstance(module, LoraLinear):
            problems.append(f"{PEFT_PREFIX}{module_name}: the model already has a LoRA layer there")
            continue
        if module is None or not is_linear(module):
            what = "no such module" if module is None else f"a {type(module).__name__}, not a linear layer"
            problems.append(f"{PEFT_PREFIX}{module_name}.lora_A.weight: {what} in this base model")
            continue
        d_in, d_out = linear_shape(module)
        r = cfg.r_for(module_name)
        a, b = files.lora_pair(module_name)
        if tuple(a.shape) != (r, d_in):
            problems.append(f"{PEFT_PREFIX}{module_name}.lora_A.weight: shape {tuple(a.shape)} "
                            f"(expected ({r}, {d_in}) for this base)")
        if tuple(b.shape) != (d_out, r):
            problems.append(f"{PEFT_PREFIX}{module_name}.lora_B.weight: shape {tuple(b.shape)} "
                            f"(expected ({d_out}, {r}) for this base)")
        m = files.tensors.get(f"{PEFT_PREFIX}{module_name}.lora_magnitude_vector")
        if m is not None and tuple(m.shape) != (d_out,):
            problems.append(f"{PEFT_PREFIX}{module_name}.lora_magnitude_vector: shape "
                            f"{tuple(m.shape)} (expected ({d_out},) for this base)")
    if problems:
        raise AdapterError(f"{weights_path}: does not fit this base model:\n  " + "\n  ".join(problems))

    from lorakit.lora.inject import target_names

    targeted = set(target_names(model, cfg))
    missing = sorted(targeted - set(files.modules()))
    if missing:
        raise AdapterError(
            f"{weights_path}: missing tensors for {len(missing)} module(s) its config targets, "
            f"e.g. {PEFT_PREFIX}{missing[0]}.lora_A.weight")
    extra = sorted(set(files.modules()) - targeted)
    if extra:
        raise AdapterError(f"{weights_path}: tensors for modules its config does not target "
                           f"(target_modules={cfg.target_modules!r}), e.g. {PEFT_PREFIX}{extra[0]}")

    if cfg.pissa_niter:
        raise AdapterError(
            f"{files.path / CONFIG_NAME}: init_lora_weights is {cfg.init_lora_weights!r}: the adapter "
            "was trained on a residual base from a randomised SVD that cannot be recomputed. "
            "Write it as a plain LoRA where it was trained (PEFT: save_pretrained with "
            "path_initial_model_for_weight_conversion; lorakit writes that form itself)")

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

