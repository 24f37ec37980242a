"""Base identity: a name plus a hash of the base weights, stored with every adapter.

An adapter only means something on the base it was trained on, so `save_adapter` records
`{"name", "weights_sha256"}` and loaders compare it (the same idea as vLLM and PEFT recording
`base_model_name_or_path`, made checkable by hashing the weights instead of trusting a name).

The hash has to be the same whichever dtype the base was loaded in, and whether or not LoRA
layers have been injected yet:
- every tensor is cast to bfloat16 before hashing, so an fp32 load and a bf16 load of the same
  checkpoint agree (transformers' bf16 load rounds fp32 the same way `.to(bfloat16)` does). An
  fp16 load can differ: fp32 -> fp16 -> bf16 rounds twice;
- adapter parameters (any path component starting with `lora_`) are skipped, and the original
  weight a LoRA wrapper holds (`<path>.base.weight` in lorakit, `<path>.base_layer.weight` in
  PEFT) is hashed under its original name `<path>.weight`;
- tied parameters (lm_head sharing the embedding) are hashed once, under the first name.
To stay fast on big models each tensor contributes an evenly strided sample of at most 65,536
elements, together with its full name and shape: 64 evenly spaced runs of 1,024 consecutive
elements, which read a few memory pages where single elements strided across a large matrix would
touch a new cache line each. The whole bundled model hashes in about 0.1 s.

Merging an adapter into the weights changes them, so the identity must be taken before any merge
(`load_base` does it right after loading).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch import nn

MAX_SAMPLE = 65_536
RUN = 1_024  # consecutive elements per sampled run
_WRAPPED_CHILD = ("base", "base_layer")  # lorakit's LoraLinear, PEFT's LoraLayer
_PEFT_PREFIX = "base_model.model."


def _wrapper_paths(model: nn.Module) -> set[str]:
    """Names of LoRA wrapper modules: they have `lora_A` and hold the original as base/base_layer."""
    return {name for name, m in model.named_modules()
            if hasattr(m, "lora_A")
            and any(isinstance(getattr(m, child, None), nn.Module) for child in _WRAPPED_CHILD)}


def original_name(name: str, wrappers: set[str], peft_model: bool = False) -> str | None:
    """The parameter's name in the plain base model, or None for adapter parameters."""
    parts = name.split(".")
    if any(p.startswith("lora_") for p in parts):
        return None
    kept: list[str] = []
    for i, part in enumerate(parts):
        # Drop `base` only directly under a wrapper, so a model with its own module called
        # `base` keeps its names.
        if part in _WRAPPED_CHILD and ".".join(parts[:i]) in wrappers:
            continue
        kept.append(part)
    out = ".".join(kept)
    if peft_model and out.startswith(_PEFT_PREFIX):
        out = out[len(_PEFT_PREFIX):]
    return out


def sample_runs(t: torch.Tensor, max_elements: int = MAX_SAMPLE) -> Iterator[torch.Tensor]:
    """At most `max_elements` values of `t` (flattened) as bfloat16 CPU chunks of <= RUN elements:
    the whole tensor when small, else `max_elements // RUN` runs of RUN consecutive elements,
    evenly spaced from start to end.

    Each cast is kept below ATen's parallel grain size (32,768 elements): on a loaded machine
    entering an OpenMP region costs ~10 ms, which one 65,536-element cast per tensor would pay
    272 times on the bundled model.
    """
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n <= max_elements:
        runs = flat.split(RUN)
    else:
        count = max_elements // RUN
        step = (n - RUN) // (count - 1)  # first run at 0, the last ends within RUN of the end
        runs = flat.unfold(0, RUN, step)[:count]  # (count, RUN), a view
    for run in runs:
        yield run.to(device="cpu", dtype=torch.bfloat16)


def weights_sha256(model: nn.Module) -> str:
    """sha256 over (name, shape, bf16 sample) of every base parameter, in name order."""
    wrappers = _wrapper_paths(model)
    peft_model = type(model).__name__.startswith("Peft")
    seen_storage: set[int] = set()
    entries: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        base_name = original_name(name, wrappers, peft_model)
        if base_name is None:
            continue
        if p.numel() > 0:
            ptr = p.data_ptr()
            if ptr in seen_storage:
                continue
            seen_storage.add(ptr)
        entries[base_name] = p
    h = hashlib.sha256()
    for name in sorted(entries):
        p = entries[name]
        h.update(name.encode())
        h.update(b"\0" + ",".join(str(d) for d in p.shape).encode() + b"\0")
        for run in sample_runs(p):
            # int16 view: the raw bf16 bits (numpy has no bfloat16).
            h.update(run.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def base_identity(model: nn.Module, name: str) -> dict:
    """`{"name": name, "weights_sha256": ...}` for a base model (LoRA layers, if any, ignored)."""
    return {"name": name, "weights_sha256": weights_sha256(model)}
