"""`train.gradient_checkpointing`: the same loss and gradients as the plain run, less kept."""

import copy

import pytest
import torch

from lorakit.data.render import Encoded
from lorakit.lora import inject
from lorakit.lora.config import LoraConfig
from lorakit.train.lean_ops import lean_modules
from lorakit.train.loop import _gradient_checkpointing, micro_batch_loss, train
from lorakit.train.packing import packed_attention_mode
from tests import tiny
from tests.train.test_loop import config


def _examples() -> list[Encoded]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (9, 17, 12):
        ids = torch.randint(3, 400, (n,), generator=g).tolist()
        out.append(Encoded(ids, [-100] * (n // 2) + ids[n // 2:]))
    return out


def _loss_and_grads(model, packed: bool):
    """(loss, grads, bytes autograd kept) of one micro-batch through the loop's own path."""
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t

    model.train()
    # The backward stays inside the modes, as in the loop: the recomputation runs the forward
    # installed at backward time (lean ops, packed attention), which must be the same one.
    with packed_attention_mode(model) if packed else torch.enable_grad(), lean_modules(model):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, n, _ = micro_batch_loss(model, _examples(), 0, torch.device("cpu"), True,
                                          "eager" if packed else None)
        loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(kept)


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("packed", [True, False])
def test_checkpointed_blocks_give_the_same_loss_and_gradients(method, packed):
    model = tiny.tiny_llama()
    if method == "lora":
        inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        with torch.no_grad():  # B != 0, so the adapters matter
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    else:
        model.requires_grad_(True)
    checkpointed = copy.deepcopy(model)
    _gradient_checkpointing(checkpointed)
    loss, grads, kept = _loss_and_grads(model, packed)
    loss_c, grads_c, kept_c = _loss_and_grads(checkpointed, packed)
    assert torch.equal(loss, loss_c)
    assert grads.keys() == grads_c.keys() and len(grads) > 0
    for k in grads:
        torch.testing.assert_close(grads_c[k], grads[k], rtol=1e-6, atol=1e-7, msg=k)
    assert kept_c < 0.6 * kept, (kept_c, kept)  # the blocks' activations were not kept


def test_a_checkpointed_run_trains_the_same_adapter(tmp_path):
    from safetensors.torch import load_file

    runs = {}
    for flag in (False, True):
        (tmp_path / str(flag)).mkdir()
        # test_loop's config: LoRA dropout 0.1 (replayed by the recomputation), packed rows, lean ops.
        cfg = config(tmp_path / str(flag), max_steps=3, gradient_checkpointing=flag)
        result = train(cfg, model=tiny.tiny_llama(), tokenizer=tiny.tiny_tokenizer(), progress=False)
        runs[flag] = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    for k in runs[False]:
        torch.testing.assert_close(runs[True][k], runs[False][k], rtol=1e-5, atol=1e-7, msg=k)
