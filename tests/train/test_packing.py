"""Padding-free micro-batches: the same loss and gradients as the padded batch, examples apart."""

import pytest
import torch

from lorakit.data.collate import pad_batch
from lorakit.data.render import IGNORE, Encoded
from lorakit.errors import LorakitError
from lorakit.lora import LoraConfig, inject
from lorakit.train.loss import causal_lm_loss_sum, packed_loss_sum
from lorakit.train.packing import (
    PACKED_ATTENTION, pack_batch, packed_attention_mode, packing_supported,
)
from tests import tiny


def examples(lengths=(5, 11, 3, 17, 8), vocab=400, seed=1):
    """Rows of different lengths, the first ~half of each unsupervised (a prompt)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        out.append(Encoded(ids, [IGNORE] * (n // 2) + ids[n // 2:]))
    return out


def test_pack_batch_shifts_targets_per_example_and_restarts_positions():
    rows = [Encoded([1, 2, 3], [IGNORE, 2, 3]), Encoded([4, 5], [IGNORE, 5])]
    b = pack_batch(rows)
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    # Position 2 (the last of example one) must not learn to predict example two's first token.
    assert b.targets.tolist() == [2, 3, IGNORE, 5, IGNORE]
    assert b.info.index.tolist() == [0, 1, 2, 3, 4]  # rows of 3: example two starts at 3
    assert pack_batch(rows[::-1]).info.index.tolist() == [0, 1, 3, 4, 5]  # longest 3 after a 2


def _loss_and_grads(model, fn):
    model.zero_grad()
    loss, n = fn()
    loss.backward()
    return float(loss.detach()), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("inner", ["eager", "sdpa"])
@pytest.mark.parametrize("supervised_only", [True, False])
def test_packed_loss_and_gradients_equal_the_padded_batch(inner, supervised_only):
    model = tiny.tiny_llama()
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # a non-zero B so the adapter gradients depend on the whole path
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    model.set_attn_implementation(inner)
    rows = examples()
    padded = pad_batch(rows, pad_id=0)
    ref = _loss_and_grads(model, lambda: causal_lm_loss_sum(
        model, padded["input_ids"], padded["labels"], padded["attention_mask"], supervised_only))
    with packed_attention_mode(model):
        assert model.config._attn_implementation == PACKED_ATTENTION
        got = _loss_and_grads(model, lambda: packed_loss_sum(model, pack_batch(rows, inner),
                                                             supervised_only))
    assert model.config._attn_implementation == inner  # restored
    assert got[1] == ref[1] == sum(sum(t != IGNORE for t in r.labels[1:]) for r in rows)
    assert got[0] == pytest.approx(ref[0], rel=1e-5)
    assert got[2].keys() == ref[2].keys() and len(ref[2]) == 2 * 7 * 2  # every A and B
    for k in ref[2]:
        torch.testing.assert_close(got[2][k], ref[2][k], atol=1e-5, rtol=1e-4, msg=k)


def test_examples_do_not_see_each_other():
    """Changing one example's tokens leaves every other example's per-position outputs alone."""
    model = tiny.tiny_llama()
    model.set_attn_implementation("eager")
    rows = examples()
    changed = list(rows)
    changed[1] = Encoded([7] * len(rows[1].input_ids), rows[1].labels)

    def hidden(rs):
        b = pack_batch(rs)
        with torch.no_grad(), packed_attention_mode(model):
            return model.model(input_ids=b.input_ids, position_ids=b.position_ids,
                               lorakit_packing=b.info).last_hidden_state[0]
    a, c = hidden(rows), hidden(changed)
    start = [0]
    for r in rows:
        start.append(start[-1] + len(r.input_ids))
    for i in range(len(rows)):
        same = torch.equal(a[start[i]:start[i + 1]], c[start[i]:start[i + 1]])
        assert same == (i != 1), i
    # ... and each equals that example run alone.
    with torch.no_grad():
        alone = model.model(input_ids=torch.tensor([rows[3].input_ids])).last_hidden_state[0]
    torch.testing.assert_close(a[start[3]:start[4]], alone, atol=1e-5, rtol=1e-5)


def test_support_and_errors():
    assert packing_supported(tiny.tiny_llama()) is None
    assert "gpt2" in packing_supported(tiny.tiny_gpt2())
    model = tiny.tiny_llama()
    with packed_attention_mode(model), pytest.raises(LorakitError, match="needs the packing"):
        model(input_ids=torch.tensor([[1, 2, 3]]))
