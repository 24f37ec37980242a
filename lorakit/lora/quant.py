"""QLoRA's frozen 4-bit base: NF4 weights with double quantization, via torchao's `NF4Tensor`.

Dettmers et al. 2023, "QLoRA": each block of 64 weights is stored as 4-bit indices into the 16
NormalFloat levels (quantiles of N(0, 1), scaled to [-1, 1]) times the block's absmax; the absmax
scales are themselves quantized to int8 in blocks of 256 ("double quantization") around their
mean. torchao implements exactly this (`NF4Tensor`, the tensor torchtune's QLoRA uses); `nn.Linear`
runs with an `NF4Tensor` weight as is (torchao dispatches `F.linear`, dequantizing on the fly), so
the base model's modules stay the ones transformers built and LoRA wraps them unchanged.

Storage per weight: 4 bits + 8 bits per 64 + 16 bits per 64 x 256, about 4.13 bits (0.26x bf16).
torchao requires the number of blocks to be a multiple of the second-level block; for weights
where 256 does not divide it (SmolLM2's 576 x 576 has 5,184 blocks: 216 is used) we use the
largest divisor of the block count that is <= 256 and report it: a few more 16-bit factors.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.errors import LorakitError

BLOCK_SIZE = 64
SCALER_BLOCK_SIZE = 256
# The 16 NF4 levels (QLoRA appendix E); their largest gap bounds the rounding error.
NF4_LEVELS = (-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609,
              0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0)


@contextmanager
def quiet_torchao():
    """Import torchao (directly, or through PEFT or transformers) without its log lines: on a
    CPU build it warns about every CUDA-only kernel it cannot load, and torch about its enums."""
    logs = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


def _torchao_nf4():
    """torchao's NF4 module, imported quietly."""
    with quiet_torchao():
        try:
            from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
        except ImportError as e:
            raise LorakitError(f"quantize_base: nf4 needs torchao (pip install torchao): {e}") from None
    return nf4_tensor


def is_nf4(t: torch.Tensor) -> bool:
    return hasattr(t, "get_original_weight") and hasattr(t, "quantized_data")


def scaler_block_for(numel: int, block_size: int = BLOCK_SIZE,
                     scaler_block_size: int = SCALER_BLOCK_SIZE) -> int:
    """The second-level block for a weight: `scaler_block_size`, or the largest divisor of the
    block count below it when it does not divide (see the module docstring)."""
    if numel % block_size:
        raise LorakitError(f"a weight of {numel} elements cannot be stored in NF4 blocks of "
                           f"{block_size}")
    n_blocks = numel // block_size
    return max(d for d in range(1, min(scaler_block_size, n_blocks) + 1) if n_blocks % d == 0)


def to_nf4(weight: torch.Tensor, block_size: int = BLOCK_SIZE,
           scaler_block_size: int = SCALER_BLOCK_SIZE) -> torch.Tensor:
    """A 2-D weight as an `NF4Tensor` (its dtype is the dtype it dequantizes to)."""
    nf4 = _torchao_nf4()
    weight = weight.contiguous()
    return nf4.to_nf4(weight, block_size, scaler_block_for(weight.numel(), block_size,
                                                           scaler_block_size))


def nf4_nbytes(t: torch.Tensor) -> int:
    """Bytes an NF4 tensor holds: 4-bit codes, int8 scales, their factors, the mean and levels."""
    return sum(x.numel() * x.element_size() for x in (t.quantized_data, t.quantized_scalers,
                                                      t.quantization_factor, t.scaler_mean, t.nf4))


@dataclass
class QuantReport:
    """What `quantize_base_nf4` did: modules quantized and the weight bytes before and after."""

    modules: list[str] = field(default_factory=list)
    bytes_before: int = 0  # the quantized weights at their original dtype
    bytes_after: int = 0
    bf16_bytes: int = 0  # the same weights in bf16, the QLoRA paper's reference point
    scaler_blocks: dict[int, int] = field(default_factory=dict)  # second-level block -> modules

    @property
    def ratio_to_bf16(self) -> float:
        return self.bytes_after / max(self.bf16_bytes, 1)


def _output_heads(model: nn.Module) -> set[int]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {id(head)} if head is not None else set()


@torch.no_grad()
def quantize_base_nf4(model: nn.Module, block_size: int = BLOCK_SIZE,
                      scaler_block_size: int = SCALER_BLOCK_SIZE) -> QuantReport:
    """Store every `nn.Linear` weight but the output head's in NF4, in place (QLoRA's base).

    Embeddings, norms and the head (tied to the embeddings in many small models) stay in their
    dtype, as in QLoRA. Call before `lorakit.lora.inject`; the weights are frozen.
    """
    report = QuantReport()
    heads = _output_heads(model)
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or id(module) in heads or is_nf4(module.weight):
            continue
        w = module.weight
        q = to_nf4(w.detach(), block_size, scaler_block_size)
        report.modules.append(name)
        report.bytes_before += w.numel() * w.element_size()
        report.bf16_bytes += w.numel() * 2
        report.bytes_after += nf4_nbytes(q)
        report.scaler_blocks[q.scaler_block_size] = report.scaler_blocks.get(q.scaler_block_size, 0) + 1
        module.weight = nn.Parameter(q, requires_grad=False)
    if not report.modules:
        raise LorakitError(f"{type(model).__name__}: no nn.Linear layers to quantize (NF4 covers "
                           "nn.Linear bases such as Llama; GPT-2's Conv1D layers are not supported)")
    return report


@torch.no_grad()
def dequantize_base(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace every NF4 weight by its dequantized values (in `dtype`, default its own); count."""
    n = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and is_nf4(w):
            dense = w.get_original_weight()
            module.weight = nn.Parameter(dense.to(dtype or dense.dtype), requires_grad=False)
            n += 1
    return n
