"""RMSNorm and SwiGLU as autograd functions that keep less for the backward pass.

Autograd over transformers' module code keeps every intermediate an operation needs: Llama's
RMSNorm keeps an fp32 copy of its input (twice the bytes of the bf16 input), and the SwiGLU MLP
keeps gate, up and silu(gate) besides the product the down projection keeps. Over SmolLM2's 30
blocks these are about 40% of a training step's saved activations. The functions here keep only
the inputs (bf16) and the per-row 1/rms, and recompute the rest in the backward pass, which costs
one extra elementwise pass each (the idea behind Liger's and Unsloth's fused kernels, written in
plain PyTorch).

Forward results are bit-for-bit those of the module code (the same operations in the same
order); gradients equal it up to rounding order. `lean_modules(model)` installs them on the
modules it recognises for the duration of a `with` block; `train.lean_activations` switches it off.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.models.families import lean_classes

# transformers classes whose forward is exactly `weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)`
# (Gemma's adds 1 to the weight and is not here), and whose MLP is `down(act(gate(x)) * up(x))`:
# the family table's `lean_rms_norm` / `lean_gated_mlp` columns.
RMS_NORMS, GATED_MLPS = lean_classes()


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.to(torch.float32) * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        # y = w * n with n = xhat rounded to x.dtype; d n / d x of the rms normalisation:
        g = (grad_out * weight).to(torch.float32)
        grad_x = (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        grad_up = grad_out * F.silu(gate)
        grad_gate = torch.ops.aten.silu_backward(grad_out * up, gate)
        return grad_gate, grad_up


def _rms_norm_forward(module: nn.Module):
    def forward(x):
        return RMSNormFunction.apply(x, module.weight, module.variance_epsilon)
    return forward


def _mlp_forward(module: nn.Module):
    def forward(x):
        return module.down_proj(SwiGLUFunction.apply(module.gate_proj(x), module.up_proj(x)))
    return forward


def _forward_matches(module: nn.Module, forward) -> bool:
    """Whether `forward` gives bit-for-bit what the module's own class forward gives on a small
    random input: the check that the transformers code in hand is the code these functions
    restate (tested with transformers 4.51-5.25). Dropout inside (LoRA's) draws the same numbers
    on both paths: the generator is reseeded before each and restored afterwards."""
    weight = next(module.parameters(), None)
    hidden = getattr(module, "hidden_size", None) or (weight.shape[-1] if weight is not None else None)
    if weight is None or not hidden:
        return False
    with torch.no_grad(), torch.random.fork_rng(devices=[] if weight.device.type == "cpu"
                                                 else [weight.device]):
        x = torch.randn(2, 3, hidden, dtype=weight.dtype if weight.is_floating_point()
                        else torch.float32, device=weight.device)
        try:
            torch.manual_seed(0)
            want = type(module).forward(module, x)
            torch.manual_seed(0)
            got = forward(x)
        except (RuntimeError, TypeError, AttributeError, ValueError):
            return False
    return isinstance(want, torch.Tensor) and want.shape == got.shape and torch.equal(want, got)


def lean_targets(model: nn.Module) -> tuple[list[tuple[nn.Module, object]], list[str]]:
    """(module, replacement forward) for every recognised RMSNorm and SiLU-gated MLP whose class
    forward the replacement reproduces, and the class names recognised but left alone."""
    act = getattr(getattr(model, "config", None), "hidden_act", None)
    out, verdict = [], {}
    for module in model.modules():
        name = type(module).__name__
        if name in RMS_NORMS:
            forward = _rms_norm_forward(module)
        elif name in GATED_MLPS and act == "silu":
            forward = _mlp_forward(module)
        else:
            continue
        if name not in verdict:
            verdict[name] = _forward_matches(module, forward)
        if verdict[name]:
            out.append((module, forward))
    return out, sorted(name for name, ok in verdict.items() if not ok)


@contextlib.contextmanager
def lean_modules(model: nn.Module, note=None):
    """Run the recognised modules through the lean functions inside the block. A class whose
    forward no longer matches (another transformers version) keeps its own forward, and
    `note` (a callable taking one line) says so."""
    targets, skipped = lean_targets(model)
    if skipped and note is not None:
        note(f"lean activations off for {', '.join(skipped)}: its forward is not the one lorakit "
             "restates (plain path used)")
    # A forward already set on the instance (a hook library's wrapper) is put back afterwards.
    previous = [module.__dict__.get("forward") for module, _ in targets]
    for module, forward in targets:
        module.forward = forward
    try:
        yield len(targets)
    finally:
        for (module, _), old in zip(targets, previous):
            # pop, not del: something inside the block may already have removed it.
            module.__dict__.pop("forward", None)
            if old is not None:
                module.forward = old
