"""`LoraLinear`: one trainable low-rank update beside a frozen linear layer.

Follows Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models": for a frozen W
(d_out x d_in) the layer computes `W x + scaling * B A x` with A (r x d_in) Kaiming-uniform and
B (d_out x r) zero, so training starts exactly at the base model. Initialisation matches PEFT's
`reset_lora_parameters` (kaiming_uniform_ with a=sqrt(5)), so seeded runs start alike.

The base layer is held, not inherited from (`self.base`), and may be `nn.Linear` or transformers'
`Conv1D` (GPT-2), whose weight is stored transposed (d_in x d_out).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import MergeError


def is_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D` (GPT-2 family): a linear layer with weight stored (d_in, d_out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an `nn.Linear` or a `Conv1D`."""
    if is_conv1d(module):
        d_in, d_out = module.weight.shape
        return d_in, d_out
    return module.in_features, module.out_features


class LoraLinear(nn.Module):
    """A frozen linear layer plus `scaling * lora_B(lora_A(dropout(x)))`."""

    def __init__(self, base: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, dtype: torch.dtype | None = None):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = linear_shape(base)
        self.fan_in_fan_out = is_conv1d(base)
        self.r = r
        self.lora_alpha = lora_alpha
        # The one place scaling is computed (LoRA: alpha/r; rsLoRA: alpha/sqrt(r)).
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        # Adapter weights default to fp32 even over a bf16 base: small, and they carry the updates.
        dtype = dtype or torch.float32
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, dtype=dtype, device=device)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        self.compute_dtype: torch.dtype | None = None  # see forward
        self.reset_lora_parameters()
        for p in self.base.parameters():
            p.requires_grad_(False)

    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform (a = sqrt(5), as nn.Linear and PEFT), B zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged or self.disabled:
            return result
        # Compute in `compute_dtype` (None: the adapter's own dtype). Training over a bf16 base sets
        # it to bf16, as autocast would: the fp32 weights are cast (r x d, cheap) instead of every
        # activation, and their gradients still arrive in fp32.
        dtype = self.compute_dtype or self.lora_A.weight.dtype
        lora_x = self.lora_dropout(x).to(dtype)
        # scaling * B (A x), with the scaling applied on the rank-r side where it is cheapest.
        h = F.linear(lora_x, self.lora_A.weight.to(dtype)) * self.scaling  # (..., r)
        update = F.linear(h, self.lora_B.weight.to(dtype))  # (..., d_out)
        return result + update.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A in fp32, in the base weight's layout ((d_in, d_out) for Conv1D)."""
        delta = self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())  # (d_out, d_in)
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        """W <- W + scaling B A, computed in fp32. Idempotent; `safe` refuses non-finite results."""
        if self.merged:
            return
        weight = self.base.weight
        merged = (weight.float() + self.delta_weight().to(weight.device)).to(weight.dtype)
        if safe and not torch.isfinite(merged).all():
            raise MergeError(f"merging this LoRA layer ({self.out_features}x{self.in_features}, "
                             f"r={self.r}) gives non-finite weights; the adapter or base holds NaN/inf "
                             "or overflows the base dtype")
        weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - scaling B A, in fp32. Idempotent."""
        if not self.merged:
            return
        weight = self.base.weight
        weight.copy_((weight.float() - self.delta_weight().to(weight.device)).to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, merged={self.merged}")
