"""`contiguous_head_input`: the output head receives a contiguous input when only the last
position's logits are kept, with the same logits, and `load_base` installs it once."""

import pytest
import torch

from lorakit.models import contiguous_head_input, load_base
from tests import tiny


def _head_inputs(model):
    """Record the input the head actually multiplies (after any pre-hook)."""
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0]))
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_last_position_head_input_is_contiguous_with_the_same_logits(dtype):
    model = tiny.tiny_llama().to(dtype)
    ids = torch.randint(0, 400, (3, 7), generator=torch.Generator().manual_seed(0))
    seen = _head_inputs(model)
    with torch.no_grad():
        full = model(ids).logits[:, -1:]
        plain = model(ids, logits_to_keep=1).logits
        assert not seen[-1].is_contiguous()  # the case this is about: a (B, 1, D) slice
        contiguous_head_input(model)
        fixed = model(ids, logits_to_keep=1).logits
    assert seen[-1].is_contiguous() and seen[-1].shape == (3, 1, 64)
    torch.testing.assert_close(fixed, full)
    torch.testing.assert_close(fixed, plain)


def test_installed_once_and_a_model_without_head_is_left_alone():
    model = tiny.tiny_llama()
    contiguous_head_input(model)
    contiguous_head_input(model)
    assert len(model.get_output_embeddings()._forward_pre_hooks) == 1
    contiguous_head_input(torch.nn.Linear(4, 4))  # no get_output_embeddings: nothing to do


def test_load_base_installs_it(tmp_path, tokenizer):
    model = tiny.tiny_llama()
    model.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    loaded, _ = load_base(str(tmp_path))
    seen = _head_inputs(loaded)
    with torch.no_grad():
        loaded(torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]), logits_to_keep=1)
    assert seen[-1].is_contiguous()
