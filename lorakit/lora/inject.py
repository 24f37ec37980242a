"""Put LoRA layers into a loaded model, and take them out again.

`inject` wraps each targeted linear module of a transformers model in a `LoraLinear` after the
weights are loaded, so HF, GGUF-converted and quantized bases are treated alike. Module matching
follows PEFT's `check_target_module_exists`: a name in a list matches a module whose full name
equals it or ends with `.name`; a string is a regex matched with `re.fullmatch`; `"all-linear"`
means every linear layer but the output head (PEFT's `INCLUDE_LINEAR_LAYERS_SHORTHAND`).

Tensor names follow PEFT end to end: the wrapped module keeps its path, so its adapter weights
are `<path>.lora_A.weight`, saved as `base_model.model.<path>.lora_A.weight`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

from lorakit.errors import MergeError, TargetModulesError
from lorakit.lora.config import ALL_LINEAR, LoraConfig
from lorakit.lora.layer import LoraLinear, is_conv1d

PEFT_PREFIX = "base_model.model."


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of every plain linear module (not counting ones already wrapped)."""
    wrapped = {name for name, m in model.named_modules() if isinstance(m, LoraLinear)}
    return [name for name, m in model.named_modules()
            if is_linear(m) and not any(name == w + ".base" or name.startswith(w + ".lora_")
                                        for w in wrapped)]


def _output_head_names(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name for name, m in model.named_modules() if head is not None and m is head}
    return names | {"lm_head"}


def matches_target(name: str, target_modules: list[str] | str) -> bool:
    """PEFT's rule for one module name (the `all-linear` case is resolved by `target_names`)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def target_names(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Full names of the linear modules `cfg.target_modules` selects; an error if none."""
    linears = linear_module_names(model)
    if cfg.target_modules == ALL_LINEAR:
        heads = _output_head_names(model)
        chosen = [n for n in linears if n not in heads]
    else:
        chosen = [n for n in linears if matches_target(n, cfg.target_modules)]
        non_linear = [n for n, m in model.named_modules()
                      if n and not is_linear(m) and matches_target(n, cfg.target_modules)
                      and not isinstance(m, LoraLinear)]
        if non_linear and not chosen:
            raise TargetModulesError(
                f"target_modules {cfg.target_modules!r} matches {non_linear[:3]} which are not linear "
                "layers; LoRA adapts nn.Linear and Conv1D modules")
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise TargetModulesError(
            f"target_modules {cfg.target_modules!r} matches no linear module of this model; "
            f"its linear modules are named: {', '.join(leaves)} (or use 'all-linear')")
    return chosen


def inject(model: nn.Module, cfg: LoraConfig, dtype: torch.dtype | None = None) -> list[str]:
    """Wrap the targeted linear modules in `LoraLinear`; freeze everything else.

    Returns the full names of the wrapped modules. Adapter weights are created in `dtype`
    (default fp32) on each base layer's device; base parameters end with requires_grad False.
    Each module gets its own rank and alpha from `rank_pattern` / `alpha_pattern`. With PiSSA
    (`init_lora_weights: pissa...`) the base weights are replaced by their residuals here.
    """
    cfg.validate()
    names = target_names(model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    niter = cfg.pissa_niter
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoraLinear(getattr(parent, leaf), cfg.r_for(name), cfg.alpha_for(name),
                           cfg.lora_dropout, cfg.use_rslora, dtype=dtype, use_dora=cfg.use_dora)
        if niter is not None:
            layer.pissa_init(niter)
        setattr(parent, leaf, layer)
    return names


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """(full module name, layer) for every LoRA layer in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, layer in lora_layers(model)
            for p in (layer.lora_A.weight, layer.lora_B.weight)
            + ((layer.lora_magnitude_vector,) if layer.use_dora else ())]


def lora_state_dict(model: nn.Module, pissa_as_lora: bool = True) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's on-disk names.

    A PiSSA layer trains on a residual base; with `pissa_as_lora` its update against the
    original base, s B A - s B0 A0, is written as a plain LoRA of rank 2r: A' = [A; A0],
    B' = [B, -B0] (PEFT's `path_initial_model_for_weight_conversion`). Without it the raw A, B
    are written (checkpoints, resumed on the same residual base).
    """
    out = {}
    for name, layer in lora_layers(model):
        a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
        if pissa_as_lora and layer.pissa_initial is not None:
            a0, b0 = layer.pissa_initial
            a, b = torch.cat([a, a0], dim=0), torch.cat([b, -b0], dim=1)  # (2r, d_in), (d_out, 2r)
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
        if layer.use_dora:
            out[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach()
    return out


def merge(model: nn.Module, safe: bool = True) -> None:
    """Merge every LoRA layer into its base weight (idempotent)."""
    for name, layer in lora_layers(model):
        try:
            layer.merge(safe=safe)
        except MergeError as e:
            raise MergeError(f"{name}: {e}") from None


def unmerge(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer's update on or off (off = the base model, for comparisons)."""
    for _, layer in lora_layers(model):
        layer.disabled = not enabled


def merge_and_unload(model: nn.Module, safe: bool = True) -> nn.Module:
    """Merge every adapter into the base and put the plain base modules back in place."""
    merge(model, safe=safe)
    for name, layer in list(lora_layers(model)):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, layer.base)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts, counting tied tensors once."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable
