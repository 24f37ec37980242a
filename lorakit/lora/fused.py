"""One autograd function for a LoRA layer over a frozen linear: `x W^T + bias + s (x A^T) B^T`.

Autograd over the plain module code runs the base product, the two adapter products, a scaling
and an addition as separate nodes, each with its own output tensor, and in the backward pass adds
the base and adapter input-gradients in another pass over an (N, d_in) tensor. Here:
- the adapter product is accumulated into the base output in place (`addmm_`), so the (N, d_out)
  update is never materialised and no separate addition runs;
- the backward pass computes the input gradient as `g W` plus `(g B) s A` accumulated the same
  way, and skips it when the input needs none (the first block's projections);
- only x (already kept by the caller), h = s x A^T (N x r) and the r x d casts of A and B are
  saved, and the frozen weight gets no gradient work at all.

The adapter weights are cast to the computation dtype once per call (r x d, cheap) and their
gradients are returned in the parameters' own dtype (fp32 adapters over a bf16 base). The
arithmetic is that of the unfused path up to rounding order; `LoraLinear` uses it only for plain
LoRA (no DoRA, no dropout in training) over an `nn.Linear` whose weight is an ordinary tensor.
"""

from __future__ import annotations

import torch


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        h = torch.mm(x2, a.t()).mul_(scaling)  # (N, r)
        out = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
        out.addmm_(h, b.t())
        ctx.save_for_backward(x2, weight, a, b, h)
        ctx.scaling = scaling
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype)
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, a, b, h = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_a = grad_b = grad_bias = None
        gh = torch.mm(g, b).mul_(ctx.scaling)  # (N, r): gradient of x A^T
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, weight).addmm_(gh, a).view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            grad_a = torch.mm(gh.t(), x2).to(ctx.param_dtypes[0])
        if ctx.needs_input_grad[4]:
            grad_b = torch.mm(g.t(), h).to(ctx.param_dtypes[1])
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        return grad_x, None, grad_bias, grad_a, grad_b, None
