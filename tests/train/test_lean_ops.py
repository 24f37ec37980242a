"""Lean RMSNorm and SwiGLU: the modules' forward bit for bit, their gradients, less kept."""

import pytest
import torch
import torch.nn.functional as F

from lorakit.train.lean_ops import RMSNormFunction, SwiGLUFunction, lean_modules
from tests import tiny


def reference_rms_norm(x, weight, eps):  # transformers' LlamaRMSNorm.forward
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_functions_equal_the_module_code(dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 64, generator=g).to(dtype).requires_grad_()
    w = (torch.rand(64, generator=g) + 0.5).to(dtype).requires_grad_()
    gy = torch.randn(3, 7, 64, generator=g).to(dtype)
    y_ref, y = reference_rms_norm(x, w, 1e-6), RMSNormFunction.apply(x, w, 1e-6)
    assert torch.equal(y, y_ref)
    for a, b in zip(torch.autograd.grad(y, (x, w), gy), torch.autograd.grad(y_ref, (x, w), gy)):
        torch.testing.assert_close(a, b, atol=tol * b.abs().max().item(), rtol=tol)

    gate, up = (torch.randn(5, 32, generator=g).to(dtype).requires_grad_() for _ in range(2))
    gy = torch.randn(5, 32, generator=g).to(dtype)
    y_ref, y = F.silu(gate) * up, SwiGLUFunction.apply(gate, up)
    assert torch.equal(y, y_ref)
    for a, b in zip(torch.autograd.grad(y, (gate, up), gy), torch.autograd.grad(y_ref, (gate, up), gy)):
        torch.testing.assert_close(a, b, atol=tol * b.abs().max().item(), rtol=tol)


def test_they_keep_less_for_the_backward_pass():
    x = torch.randn(16, 64, 576, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(576, dtype=torch.bfloat16)
    lean = saved_bytes(lambda: RMSNormFunction.apply(x, w, 1e-6))
    plain = saved_bytes(lambda: reference_rms_norm(x, w, 1e-6))
    assert lean < 0.6 * plain, (lean, plain)  # the bf16 input and 1/rms, not fp32 copies
    gate, up = torch.randn(2, 16, 64, 1536, dtype=torch.bfloat16, requires_grad=True)
    lean = saved_bytes(lambda: SwiGLUFunction.apply(gate, up))
    plain = saved_bytes(lambda: F.silu(gate) * up)
    assert lean < 0.7 * plain, (lean, plain)


def test_lean_modules_on_a_model_give_the_same_loss_and_gradients_and_restore():
    model = tiny.tiny_llama()
    ids = torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(0))

    def loss_and_grads():
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]
    ref_loss, ref_grads = loss_and_grads()
    with lean_modules(model) as n:
        assert n == 2 * 3 + 1  # two norms and an MLP per block, the final norm
        loss, grads = loss_and_grads()
    assert torch.equal(loss, ref_loss)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert not any("forward" in m.__dict__ for m in model.modules())  # restored


def _saved_tiny_llama(path):
    tiny.tiny_llama().save_pretrained(path)
    tiny.tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("loader", ["lorakit", "transformers"])
def test_lean_modules_survive_mode_changes_of_a_model_loaded_from_a_folder(tmp_path, loader):
    """Models as users load them: transformers 5.25 enables hub kernels in `from_pretrained`
    and re-kernelizes on `train()`/`eval()`, which removed the lean forwards mid-run and crashed
    the restore. lorakit's loader keeps kernels off; a plain `from_pretrained` model must at
    least leave the block cleanly."""
    from transformers import AutoModelForCausalLM

    from lorakit.models import load_base

    path = _saved_tiny_llama(tmp_path / "base")
    model = load_base(path)[0] if loader == "lorakit" else AutoModelForCausalLM.from_pretrained(path)
    ids = torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    with lean_modules(model) as n:
        assert n == 2 * 3 + 1
        model.eval()
        model.train()
        model.eval()
        if loader == "lorakit":
            assert sum("forward" in m.__dict__ for m in model.modules()) == n
        assert torch.equal(model(ids).logits, ref)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.equal(model(ids).logits, ref)


def test_a_module_whose_forward_is_not_the_restated_one_keeps_its_own():
    """A class with a recognised name but another forward (a future transformers, or Gemma's
    `(1 + w)` norm under a Llama name) is left on its own forward, and the caller is told."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class OffsetNorm(LlamaRMSNorm):
        def forward(self, x):
            return super().forward(x) * 2
    OffsetNorm.__name__ = "LlamaRMSNorm"

    model = tiny.tiny_llama()
    for module in model.modules():
        if type(module) is LlamaRMSNorm:
            module.__class__ = OffsetNorm
    ids = torch.randint(0, 400, (1, 7), generator=torch.Generator().manual_seed(1))
    ref = model(ids).logits
    notes = []
    with lean_modules(model, note=notes.append) as n:
        assert n == 2  # the two MLPs only
        assert torch.equal(model(ids).logits, ref)
    assert len(notes) == 1 and "LlamaRMSNorm" in notes[0] and "plain path" in notes[0]
