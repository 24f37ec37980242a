"""`LoraLinear`: one trainable low-rank update beside a frozen linear layer.

Follows Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models": for a frozen W
(d_out x d_in) the layer computes `W x + scaling * B A x` with A (r x d_in) Kaiming-uniform and
B (d_out x r) zero, so training starts exactly at the base model. Initialisation matches PEFT's
`reset_lora_parameters` (kaiming_uniform_ with a=sqrt(5)), so seeded runs start alike.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") adds a trained magnitude m
per output row: the layer computes `m / ||W + s B A||_row * (W + s B A) x + bias`, with the norm
treated as a constant in the backward pass (section 4.3 of the paper; PEFT does the same), and m
starting at ||W||_row so training again starts at the base. The parameter is named
`lora_magnitude_vector`, as PEFT names it on disk.

PiSSA (Meng et al. 2024) starts A and B from the top-r singular triplets of W and keeps the
residual W - s B A as the frozen base, so the initial model equals the base (`pissa_init`).

The base layer is held, not inherited from (`self.base`), and may be `nn.Linear` or transformers'
`Conv1D` (GPT-2), whose weight is stored transposed (d_in x d_out). Its weight may be a torchao
`NF4Tensor` (QLoRA, `lorakit.lora.quant`); `base_weight()` gives it in plain form for the
operations that need the full matrix (DoRA norms); merging into NF4 is refused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import MergeError
from lorakit.lora.fused import LoraLinearFunction


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
                 use_rslora: bool = False, dtype: torch.dtype | None = None, use_dora: bool = False):
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
        self.fused = True  # may use LoraLinearFunction (train.fused_lora)
        self.reset_lora_parameters()
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.use_dora = use_dora
        self.dora_factor: torch.Tensor | None = None  # m / ||W + s B A||, kept while merged
        if use_dora:
            # m = ||W||_row at B = 0, so the initial output is the base's.
            self.lora_magnitude_vector = nn.Parameter(self._weight_norm(), requires_grad=True)
        # (A0, B0) of a PiSSA start, kept to write the adapter against the original base.
        self.pissa_initial: tuple[torch.Tensor, torch.Tensor] | None = None

    def base_weight(self) -> torch.Tensor:
        """The base weight as a plain tensor in (d_out, d_in) layout (dequantized if NF4)."""
        weight = self.base.weight
        if hasattr(weight, "get_original_weight"):  # torchao NF4Tensor
            weight = weight.get_original_weight()
        return weight.T if self.fan_in_fan_out else weight

    @torch.no_grad()
    def _weight_norm(self) -> torch.Tensor:
        """||W + s B A|| over each output row, fp32, shape (d_out,); a constant for autograd."""
        w = self.base_weight().float() + self._delta()
        return torch.linalg.vector_norm(w, dim=1).to(self.lora_A.weight.dtype)

    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform (a = sqrt(5), as nn.Linear and PEFT), B zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def _fusable(self, x: torch.Tensor, dtype: torch.dtype) -> bool:
        """Plain LoRA over an ordinary frozen `nn.Linear`, all in one dtype: the fused function."""
        weight = self.base.weight
        return (self.fused and not self.use_dora and type(self.base) is nn.Linear and type(weight) is nn.Parameter
                and not weight.requires_grad and weight.dtype == dtype == x.dtype
                and (isinstance(self.lora_dropout, nn.Identity) or not self.training))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base(x)
        dtype = self.compute_dtype or self.lora_A.weight.dtype
        if self._fusable(x, dtype):
            return LoraLinearFunction.apply(x, self.base.weight, self.base.bias, self.lora_A.weight,
                                            self.lora_B.weight, self.scaling)
        result = self.base(x)
        # Compute in `compute_dtype` (None: the adapter's own dtype). Training over a bf16 base sets
        # it to bf16, as autocast would: the fp32 weights are cast (r x d, cheap) instead of every
        # activation, and their gradients still arrive in fp32.
        lora_x = self.lora_dropout(x).to(dtype)
        # scaling * B (A x), with the scaling applied on the rank-r side where it is cheapest.
        h = F.linear(lora_x, self.lora_A.weight.to(dtype)) * self.scaling  # (..., r)
        update = F.linear(h, self.lora_B.weight.to(dtype))  # (..., d_out)
        if not self.use_dora:
            return result + update.to(result.dtype)
        # DoRA: out = f * (W x' + s B A x') + bias with f = m / ||W + s B A|| (constant norm), written
        # as a correction of the base output. With dropout active x' differs from x, so W x' is
        # recomputed; otherwise the base output (minus its bias) is reused.
        f = (self.lora_magnitude_vector / self._weight_norm()).to(dtype)  # (d_out,)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_x = result if self.base.bias is None else result - self.base.bias
        else:
            base_x = F.linear(lora_x, self.base_weight().to(dtype))
        return result + ((f - 1) * base_x.to(dtype) + f * update).to(result.dtype)

    def _delta(self) -> torch.Tensor:
        """scaling * B A in fp32, (d_out, d_in), on the base weight's device."""
        delta = self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())
        return delta.to(self.base.weight.device)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A in fp32, in the base weight's layout ((d_in, d_out) for Conv1D)."""
        return self._delta().T if self.fan_in_fan_out else self._delta()

    def _set_base_weight(self, weight: torch.Tensor) -> None:
        """Replace the base weight from a (d_out, d_in) fp32 matrix, keeping its type and dtype."""
        old = self.base.weight
        if hasattr(old, "get_original_weight"):
            raise MergeError("the base weight is stored in NF4: merging into it would quantize the "
                             "merged weight again; dequantize the base first "
                             "(lorakit.lora.quant.dequantize_base) and merge into that")
        old.copy_((weight.T if self.fan_in_fan_out else weight).to(old.dtype))

    @torch.no_grad()
    def _merged(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(merged weight (d_out, d_in) fp32, DoRA factor f (d_out,) or None): W + s B A, or
        f (W + s B A) with f = m / ||W + s B A||."""
        w = self.base_weight().float() + self._delta()
        if not self.use_dora:
            return w, None
        f = self.lora_magnitude_vector.float() / torch.linalg.vector_norm(w, dim=1)
        return f.view(-1, 1) * w, f

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        """W <- W + s B A (DoRA: f (W + s B A)), computed in fp32. Idempotent; `safe` refuses
        non-finite results."""
        if self.merged:
            return
        merged, factor = self._merged()
        if safe and not torch.isfinite(merged.to(self.base.weight.dtype)).all():
            raise MergeError(f"merging this LoRA layer ({self.out_features}x{self.in_features}, "
                             f"r={self.r}) gives non-finite weights; the adapter or base holds NaN/inf "
                             "or overflows the base dtype")
        self.dora_factor = factor
        self._set_base_weight(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - s B A (DoRA: W / f - s B A, with the f of the merge), in fp32. Idempotent."""
        if not self.merged:
            return
        w = self.base_weight().float()
        if self.dora_factor is not None:
            w = w / self.dora_factor.view(-1, 1)
            self.dora_factor = None
        self._set_base_weight(w - self._delta())
        self.merged = False

    @torch.no_grad()
    def pissa_init(self, niter: int = 0) -> None:
        """A, B from the top-r singular triplets of W; the base keeps W - s B A (PiSSA).

        With W = U S V^T: B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T, so s B A = U_r S_r V_r^T.
        `niter` > 0 uses `torch.svd_lowrank` with that many subspace iterations (fast, randomised:
        seed torch first). Follows PEFT's `pissa_init` so seeded results compare.
        """
        w = self.base_weight().float()  # (d_out, d_in)
        if niter:
            u, s, v = torch.svd_lowrank(w, q=self.r, niter=niter)  # v: (d_in, r)
            vh = v.T
        else:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
        sr = torch.sqrt(s[: self.r] / self.scaling)
        a = sr.view(-1, 1) * vh[: self.r]  # (r, d_in)
        b = u[:, : self.r] * sr.view(1, -1)  # (d_out, r)
        self.lora_A.weight.copy_(a.to(self.lora_A.weight.dtype))
        self.lora_B.weight.copy_(b.to(self.lora_B.weight.dtype))
        self._set_base_weight(w - self.scaling * (b @ a))
        self.pissa_initial = (self.lora_A.weight.detach().clone(), self.lora_B.weight.detach().clone())

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, dora={self.use_dora}, merged={self.merged}")
