"""What a run trains (`train.method`): LoRA adapters, every weight, or the last few blocks.

- `lora`: adapters on a frozen base (`lorakit.lora.inject`); the output is a PEFT adapter.
- `full`: full fine-tuning, every floating-point parameter trainable in the base's dtype (the
  user picks fp32 or bf16 with `model.dtype`; AdamW keeps its states in the parameters' dtype).
- `freeze`: the classic partial fine-tuning baseline (LLaMA-Factory's "freeze" method): only the
  last `train.layers_to_train` transformer blocks are trainable; embeddings, the final norm and
  the output head stay frozen.

full and freeze write a whole transformers model directory (`save_pretrained`, safetensors, plus
the tokenizer) instead of an adapter. Their checkpoints hold the trainable parameters by their
`named_parameters()` names in `trainable/trainable.safetensors`, so a resumed run reloads exactly
what was being trained onto a freshly loaded base.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lorakit.atomic import atomic_dir
from lorakit.errors import ConfigError, LorakitError

TRAINABLE_DIR = "trainable"  # inside a checkpoint of a full or freeze run
TRAINABLE_FILE = "trainable.safetensors"


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of the model's transformer blocks, found without knowing the architecture.

    The blocks are the longest `nn.ModuleList` whose items are all of one class:
    `model.layers` in Llama-style models, `transformer.h` in GPT-2. On a tie the outermost wins.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(b) for b in module}) == 1:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise LorakitError(f"{type(model).__name__}: no list of transformer blocks found "
                           "(expected an nn.ModuleList such as model.layers or transformer.h)")
    return best


def make_trainable(model: nn.Module, cfg) -> list[tuple[str, nn.Parameter]]:
    """Set up `model` for `cfg.train.method` and return its trainable (name, parameter) pairs.

    For lora this injects the adapters (`cfg.lora`); full and freeze inject nothing.
    """
    method = cfg.train.method
    if method == "lora":
        from lorakit.lora import inject

        if cfg.model.quantize_base == "nf4":
            from lorakit.lora.quant import quantize_base_nf4

            model.lorakit_quant = quantize_base_nf4(model)
        inject(model, cfg.lora)
    elif method == "full":
        for p in model.parameters():
            p.requires_grad_(p.is_floating_point())
    elif method == "freeze":
        n = cfg.train.layers_to_train
        name, blocks = decoder_blocks(model)
        if n > len(blocks):
            raise ConfigError(f"train.layers_to_train: got {n} but the model has {len(blocks)} "
                              f"transformer blocks ({name})")
        for p in model.parameters():
            p.requires_grad_(False)
        for block in blocks[len(blocks) - n:]:
            block.requires_grad_(True)
    else:
        raise ConfigError(f"train.method: got {method!r} (expected lora, full or freeze)")
    return trainable_parameters(model)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) for every parameter that requires grad, tied tensors once, in model order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in trainable_parameters(model)}


def save_trainable(model: nn.Module, out_dir: Path) -> None:
    """The trainable parameters of a full or freeze run as one safetensors file (checkpoints)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state_dict(model), str(out_dir / TRAINABLE_FILE), metadata={"format": "pt"})


@torch.no_grad()
def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Copy saved tensors into the model's trainable parameters, matched by name.

    A saved tensor is named `prefix + <named_parameters() name>` (PEFT's `base_model.model.` for
    LoRA adapters, nothing for full/freeze). Every trainable parameter must be present, and
    nothing else: a mismatch means the checkpoint is from a different method or model.
    """
    wanted = {prefix + n: p for n, p in trainable_parameters(model)}
    missing, extra = sorted(wanted.keys() - tensors.keys()), sorted(tensors.keys() - wanted.keys())
    if missing or extra:
        raise LorakitError(f"checkpoint does not match the trainable parameters: missing "
                           f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                           f"{extra[:3]}{'...' if len(extra) > 3 else ''}")
    for key, p in wanted.items():
        if tensors[key].shape != p.shape:
            raise LorakitError(f"checkpoint tensor {key} has shape {tuple(tensors[key].shape)}, "
                               f"the model's has {tuple(p.shape)}")
        p.copy_(tensors[key])


def save_model_dir(model: nn.Module, tokenizer, out_dir: str | Path,
                   state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a loadable transformers directory (safetensors weights + tokenizer), atomically.
    `state_dict` replaces the model's own (FSDP's shards gathered by `lorakit.train.distributed`)."""
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out
