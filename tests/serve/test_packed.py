"""Prepacked bf16 weights (`lorakit/serve/packed.py`): bit-identical to `F.linear`, and an engine
over a packed model answers exactly as over the unpacked one."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.serve.engine import Request
from lorakit.serve.packed import PackedLinear, pack_linear_weights, packing_available
from tests.serve.builders import PROMPTS, greedy, make_adapter, make_dora_adapter, run_all, served

pytestmark = pytest.mark.skipif(not packing_available(torch.zeros(1, dtype=torch.bfloat16)),
                                reason="this PyTorch build or this CPU cannot pack bf16 weights for oneDNN")


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_is_bit_identical(bias):
    torch.manual_seed(0)
    lin = nn.Linear(48, 80, bias=bias).to(torch.bfloat16).requires_grad_(False)
    packed = PackedLinear(lin)
    for x in (torch.randn(5, 48), torch.randn(3, 7, 48), torch.randn(4, 9, 48)[:, -1:, :]):
        x = x.to(torch.bfloat16)
        assert torch.equal(packed(x), F.linear(x, lin.weight, lin.bias))
    assert torch.equal(packed.weight, lin.weight)


def test_only_bf16_linears_are_packed(llama):
    assert pack_linear_weights(copy.deepcopy(llama)) == 0  # fp32: left to MKL
    model = copy.deepcopy(llama).to(torch.bfloat16)
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert pack_linear_weights(model) == linears > 0
    assert not any(type(m) is nn.Linear for m in model.modules())


def test_engine_over_packed_weights_answers_as_unpacked(llama, tokenizer, tmp_path):
    """A mixed batch of the base and three adapters (one DoRA, whose norms read the packed
    weight back) on a bf16 base, packed after wrapping as the server does."""
    dirs = {f"a{i}": make_adapter(llama, tmp_path / f"a{i}", seed=10 + i, r=2 + 2 * i)
            for i in range(2)}
    dirs["a2"] = make_dora_adapter(llama, tmp_path / "dora")
    engines = []
    for pack in (False, True):
        engine, cache, registry = served(llama, tokenizer, tmp_path / str(pack),
                                         prepare=lambda m: m.to(torch.bfloat16))
        if pack:
            assert pack_linear_weights(engine.model) > 0
        for name, d in dirs.items():
            registry.add(name, d)
        engines.append(engine)
    jobs = [(tokenizer(p)["input_ids"], a) for p in PROMPTS for a in [None, "a0", "a1", "a2"]]
    answers = [[r.output_ids for r in run_all(e, [e.submit(Request(ids, a, greedy(8)))
                                                  for ids, a in jobs])] for e in engines]
    assert answers[0] == answers[1]
    assert len({tuple(t) for t in answers[1][:4]}) == 4  # the adapters change the answers
