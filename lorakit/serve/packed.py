"""Frozen bf16 linear weights prepacked for oneDNN's matmul on the CPU.

`F.linear` on a bf16 weight in PyTorch's plain (out, in) layout hands oneDNN a matrix it must
reorder into its blocked layout on every call; a server multiplies the same frozen weights at
every decode step. `torch.ops.mkldnn._reorder_linear_weight` does that reorder once, and
`torch.ops.mkldnn._linear_pointwise` multiplies by the packed weight (the pair PyTorch's own
compiler uses for frozen CPU weights). The result is bit-identical to `F.linear` in bf16, for any
number of rows. Measured here on 120 SmolLM2-sized 576 x 1536 weights (2 cores, AMX): 11.5 ms
against 17.0 ms for one row, 16.2 against 22.0 ms for 32 rows, 25.8 against 35.1 ms for 128
(fp32 `F.linear`: 19.3, 57.2 and 149.2 ms).

The packed copy replaces the layer's weight (no second copy), except where the weight is shared
(an output head tied to the embeddings keeps the embedding's dense copy). fp32 is left to MKL,
whose products the tests hold the engine to exactly; the gain there was 0-20%.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


@functools.cache
def _onednn_bf16_packing() -> bool:
    """Whether this PyTorch build and this CPU pack bf16 weights. oneDNN's bf16 reorder needs
    AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT and raises on a plain AVX2 CPU, so the answer comes
    from packing a small weight once and comparing the product with `F.linear`."""
    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise")):
        return False
    weight = torch.ones(8, 16, dtype=torch.bfloat16)
    x = torch.ones(2, 16, dtype=torch.bfloat16)
    try:
        packed = ops._reorder_linear_weight(weight, 2)
        return torch.equal(ops._linear_pointwise(x, packed, None, "none", [], ""),
                           torch.nn.functional.linear(x, weight))
    except RuntimeError:
        return False


def packing_available(weight: torch.Tensor) -> bool:
    """Whether `weight` can be prepacked: a plain bf16 tensor on the CPU, where this build and
    this CPU pack bf16 weights (`_onednn_bf16_packing`)."""
    return (type(weight) in (torch.Tensor, nn.Parameter) and weight.device.type == "cpu"
            and weight.dtype == torch.bfloat16 and _onednn_bf16_packing())


class PackedLinear(nn.Module):
    """An inference-only `nn.Linear` whose weight is held in oneDNN's packed layout. oneDNN's
    opaque tensors have no storage, so a packed model cannot be deep-copied: copy, then pack."""

    def __init__(self, linear: nn.Linear, rows_hint: int = 32):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint),
                             persistent=False)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out, in) weight, recomputed from the packed one (exact: each output of the
        identity's product is a single term). For the rare reader: DoRA norms at adapter load."""
        eye = torch.eye(self.in_features, dtype=self.packed.dtype)
        return torch.ops.mkldnn._linear_pointwise(eye, self.packed, None, "none", [], "").T.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, packed=onednn"


def pack_linear_weights(model: nn.Module) -> int:
    """Replace every plain bf16 `nn.Linear` in `model` (a frozen model on the CPU, for inference
    only) by a `PackedLinear`; the base layers inside `MultiLoraLinear` included. Returns how
    many were packed (0 where `packing_available` says no)."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and packing_available(child.weight):
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count
