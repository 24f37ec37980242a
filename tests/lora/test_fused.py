"""The fused LoRA function: the same outputs and gradients as the module's unfused path."""

import pytest
import torch
from torch import nn

from lorakit.lora.fused import LoraLinearFunction
from lorakit.lora.layer import LoraLinear


def _run(layer, x, fused: bool, monkeypatch):
    monkeypatch.setattr(LoraLinear, "_fusable", lambda self, x, d: fused)
    y = layer(x)
    y.float().pow(2).sum().backward()
    grads = [x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad, layer.base.bias.grad]
    out = [y.detach()] + [g.clone() if g is not None else None for g in grads]
    x.grad = None
    layer.zero_grad()
    return out


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_fused_equals_unfused(dtype, tol, monkeypatch):
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(48, 80).to(dtype), r=8, lora_alpha=16)
    layer.base.bias.requires_grad_(True)  # a trained bias gets its gradient too
    nn.init.normal_(layer.lora_B.weight)
    layer.compute_dtype = dtype
    x = torch.randn(3, 5, 48, dtype=dtype, requires_grad=True)
    fused, plain = _run(layer, x, True, monkeypatch), _run(layer, x, False, monkeypatch)
    assert fused[2].dtype == fused[3].dtype == torch.float32  # fp32 adapter gradients
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=tol * b.abs().max().item(), rtol=tol)


def test_fused_path_is_taken_only_where_it_applies():
    torch.manual_seed(0)
    x = torch.randn(2, 48)
    plain = LoraLinear(nn.Linear(48, 80), r=4, lora_alpha=8)
    assert plain._fusable(x, torch.float32)
    assert not plain._fusable(x.bfloat16(), torch.float32)  # mixed dtypes: the cast path
    dropout = LoraLinear(nn.Linear(48, 80), r=4, lora_alpha=8, lora_dropout=0.1).train()
    assert not dropout._fusable(x, torch.float32)
    assert dropout.eval()._fusable(x, torch.float32)
    assert not LoraLinear(nn.Linear(48, 80), r=4, lora_alpha=8, use_dora=True)._fusable(x, torch.float32)
    trained_base = LoraLinear(nn.Linear(48, 80), r=4, lora_alpha=8)
    trained_base.base.weight.requires_grad_(True)  # the function gives the weight no gradient
    assert not trained_base._fusable(x, torch.float32)
    plain.fused = False  # train.fused_lora: false
    assert not plain._fusable(x, torch.float32)


def test_no_input_gradient_when_the_input_needs_none():
    torch.manual_seed(0)
    base = nn.Linear(16, 24, bias=False)
    a = torch.randn(4, 16, requires_grad=True)
    b = torch.randn(24, 4, requires_grad=True)
    x = torch.randn(5, 16)  # no grad: the first block's projections
    y = LoraLinearFunction.apply(x, base.weight, None, a, b, 2.0)
    y.sum().backward()
    torch.testing.assert_close(y, x @ base.weight.T + 2.0 * (x @ a.T) @ b.T)
    torch.testing.assert_close(b.grad, (torch.ones(5, 24).T @ (2.0 * x @ a.T)))
    assert x.grad is None
