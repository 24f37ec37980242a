"""MultiLoraLinear: the grouped batched forward equals the plain per-row loop, and each slot equals
its adapter's LoraLinear."""

import pytest
import torch
from torch import nn

from lorakit.errors import AdapterError
from lorakit.lora.layer import LoraLinear
from lorakit.serve.layer import MultiLoraLinear, SlotBatch, reference_forward, wrap_for_serving


def _layer(d_in=24, d_out=40, max_loras=3, max_rank=8, seed=0):
    torch.manual_seed(seed)
    batch = SlotBatch(max_loras, max_rank)
    layer = MultiLoraLinear(nn.Linear(d_in, d_out), batch, max_loras, max_rank)
    adapters = []
    for slot, r in enumerate([2, 8, 5][:max_loras]):
        a, b, scaling = torch.randn(r, d_in), torch.randn(d_out, r), 16.0 / r
        layer.set_lora(slot, a, b, scaling)
        adapters.append((a, b, scaling))
    return layer, batch, adapters


@pytest.mark.parametrize("slots", [[-1, 0, 2, 1, 0, -1],  # three adapters: slot-major
                                   [0, 2, 1, 0, 1, 1],  # slot-major, no base row: fillers unread
                                   [0, 1, 2, 2, 1, 0],  # slot-major, every slot full, no base
                                   [0, 1, 2, -1, -1, -1],  # every slot full: base rows need a filler
                                   [-1, 2, 2, 0, 0, -1],  # two: grouped by slot
                                   [1, -1, -1, 1, 1, -1]])  # one among base rows: grouped
def test_mixed_rows_equal_plain_loop(slots):
    layer, batch, _ = _layer()
    x = torch.randn(6, 5, 24)
    batch.set(slots)
    assert (batch.slot_rows is not None) == (len({s for s in slots if s >= 0}) > 2)
    got = layer(x)
    want = reference_forward(layer, x, slots)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    base = layer.base(x)
    for row, slot in enumerate(slots):
        if slot < 0:
            torch.testing.assert_close(got[row], base[row], rtol=0, atol=1e-6)
        else:
            assert (got[row] - base[row]).abs().max() > 1.0  # the adapters matter


@pytest.mark.parametrize("slots", [[-1, 0, 2, 1, 0, -1], [0, 2, 1, 0, 1, 1], [-1, 2, 2, 0, 0, -1],
                                   [1, -1, -1, 1], [2, 2, 2], [-1, -1]])
def test_decode_step_equals_plain_loop(slots):
    """One token per row (a decode step) through each batched form (slot-major, grouped, one
    slot, base only), and again after slots change."""
    layer, batch, _ = _layer()
    x = torch.randn(len(slots), 1, 24)
    batch.set(slots)
    got = layer(x)
    torch.testing.assert_close(got, reference_forward(layer, x, slots), rtol=1e-5, atol=1e-5)
    base = layer.base(x)
    for row, slot in enumerate(slots):
        if slot < 0:
            torch.testing.assert_close(got[row], base[row], rtol=0, atol=1e-6)
        else:
            assert (got[row] - base[row]).abs().max() > 1.0
    layer.reset_lora(2)  # the stacks follow a slot change
    layer.set_lora(0, torch.randn(3, 24), torch.randn(40, 3), 2.0)
    torch.testing.assert_close(layer(x), reference_forward(layer, x, slots), rtol=1e-5, atol=1e-5)


def test_layer_no_adapter_targets_runs_the_base():
    """Rows on slots whose adapters leave this layer out (rank 0 here) get the base output."""
    layer, batch, _ = _layer()
    for slot in range(3):
        layer.reset_lora(slot)
    for t in (1, 4):
        x = torch.randn(3, t, 24)
        batch.set([0, 1, 2])
        assert torch.equal(layer(x), layer.base(x))


@pytest.mark.parametrize("slots", [[-1, 0, 2, 1, 0, -1], [-1, 2, 2, 0, 0, -1], [1, 1, 1, 1, 1, 1]])
def test_bf16_base_with_fp32_stacks_follows_the_fp32_layer(slots):
    """On the CPU a bf16 base gets fp32 stacks; every path gives the fp32 layer's output to
    bf16 rounding, and bf16 out."""
    layer, batch, adapters = _layer()
    base16 = nn.Linear(24, 40).to(torch.bfloat16)
    base16.load_state_dict(layer.base.state_dict())
    layer16 = MultiLoraLinear(base16, batch, 3, 8)
    assert layer16.lora_a.dtype == torch.float32
    for slot, (a, b, scaling) in enumerate(adapters):
        layer16.set_lora(slot, a, b, scaling)
    x = torch.randn(6, 5, 24)
    batch.set(slots)
    got = layer16(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    want = layer(x)
    scale = want.abs().max().item()  # bf16 keeps 8 bits: errors scale with the outputs
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=1e-2 * scale)


def test_slot_equals_its_lora_linear():
    layer, batch, adapters = _layer()
    x = torch.randn(4, 3, 24)
    for slot, (a, b, scaling) in enumerate(adapters):
        r = a.shape[0]
        ref = LoraLinear(layer.base, r, lora_alpha=scaling * r)
        with torch.no_grad():
            ref.lora_A.weight.copy_(a)
            ref.lora_B.weight.copy_(b)
        batch.set([slot] * 4)  # the uniform path (no gather)
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)
        batch.set([slot, -1, slot, -1])  # the grouped path
        got = layer(x)
        torch.testing.assert_close(got[0], ref(x)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], layer.base(x)[1], rtol=0, atol=0)  # base rows untouched


def test_reset_and_refill_slot():
    layer, batch, _ = _layer()
    x = torch.randn(2, 3, 24)
    batch.set([1, 1])
    layer.reset_lora(1)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)
    assert float(layer.lora_a[1].abs().sum()) == 0.0
    a, b = torch.randn(3, 24), torch.randn(40, 3)
    layer.set_lora(1, a, b, 2.0)
    torch.testing.assert_close(layer(x), layer.base(x) + 2.0 * (x @ a.T) @ b.T, rtol=1e-5, atol=1e-5)
    # a smaller rank in a slot that held a larger one leaves no stale columns behind
    assert float(layer.lora_b[1, 3:].abs().sum()) == 0.0


def test_bad_shapes_refused():
    layer, _, _ = _layer()
    with pytest.raises(AdapterError, match="exceeds max_lora_rank=8"):
        layer.set_lora(0, torch.randn(9, 24), torch.randn(40, 9), 1.0)
    with pytest.raises(AdapterError, match=r"expected A \(r, 24\)"):
        layer.set_lora(0, torch.randn(4, 23), torch.randn(40, 4), 1.0)
    with pytest.raises(AdapterError, match="slot 3 out of range"):
        layer.set_lora(3, torch.randn(4, 24), torch.randn(40, 4), 1.0)


def test_gpt2_conv1d_layers(gpt2):
    batch, layers = wrap_for_serving(gpt2, ["c_attn", "c_fc"], max_loras=2, max_lora_rank=4)
    assert sorted(layers) == ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc",
                              "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    layer = layers["transformer.h.0.attn.c_attn"]
    assert (layer.in_features, layer.out_features) == (64, 192)
    torch.manual_seed(1)
    layer.set_lora(1, torch.randn(4, 64), torch.randn(192, 4), 0.5)
    x = torch.randn(3, 2, 64)
    batch.set([1, -1, 1])
    torch.testing.assert_close(layer(x), reference_forward(layer, x, [1, -1, 1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slots", [[-1, 0, 2, 1, 0, -1], [-1, 2, 2, 0, 0, -1], [1, 1, 1, 1, 1, 1]])
def test_dora_slots_equal_their_dora_lora_linear(slots):
    """Slot 1 holds a DoRA adapter: its rows equal a DoRA LoraLinear, in every batched form."""
    layer, batch, adapters = _layer()
    a, b, scaling = adapters[1]
    r = a.shape[0]
    ref = LoraLinear(layer.base, r, lora_alpha=scaling * r, use_dora=True)
    with torch.no_grad():
        ref.lora_A.weight.copy_(a)
        ref.lora_B.weight.copy_(b)
        ref.lora_magnitude_vector.mul_(1 + torch.rand(40))
    layer.set_lora(1, a, b, scaling, magnitude=ref.lora_magnitude_vector.detach())
    x = torch.randn(6, 5, 24)
    batch.set(slots)
    got = layer(x)
    torch.testing.assert_close(got, reference_forward(layer, x, slots), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        want = ref(x)
    for row, slot in enumerate(slots):
        if slot == 1:
            torch.testing.assert_close(got[row], want[row], rtol=1e-5, atol=1e-5)
        elif slot < 0:
            torch.testing.assert_close(got[row], layer.base(x)[row], rtol=0, atol=1e-6)
    layer.reset_lora(1)
    assert not layer.slot_dora[1] and float((layer.dora_scale[1] - 1).abs().max()) == 0.0


def test_slot_views_follow_a_dtype_change():
    """The per-slot views of the stacks are rebuilt when the module's tensors are replaced."""
    layer, batch, _ = _layer()
    x = torch.randn(2, 3, 24)
    batch.set([1, 1])
    want = layer(x)
    layer.double()
    assert layer.slot_factors[1][0].dtype == torch.float64
    torch.testing.assert_close(layer(x.double()), want.double(), rtol=1e-5, atol=1e-5)
