"""LoraLinear and injection: merge algebra, idempotence, freezing, targeting, errors."""

import math

import pytest
import torch

from lorakit.errors import MergeError, TargetModulesError
from lorakit.lora import (
    LoraConfig, LoraLinear, count_parameters, inject, lora_layers, merge, merge_and_unload,
    set_adapters_enabled, unmerge,
)
from tests import tiny


def randomize_b(model, seed=1, scale=0.5):
    """Give every B a non-zero value so the adapter changes the output (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            w = layer.lora_B.weight
            w.copy_(torch.randn(w.shape, generator=g) * scale)


def ids(n=12, vocab=400, seed=0):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make, targets", [
    (tiny.tiny_llama, ["q_proj", "v_proj", "down_proj"]),
    (tiny.tiny_gpt2, ["c_attn", "c_fc"]),
])
def test_merged_equals_unmerged_and_unmerge_restores_base(make, targets):
    model = make()
    x = ids()
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base_logits = model(x).logits
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize_b(model)
    with torch.no_grad():
        unmerged = model(x).logits
        merge(model)
        merge(model)  # merge twice == merge once
        merged = model(x).logits
        unmerge(model)
        unmerge(model)
        restored = model(x).logits
    assert not torch.allclose(unmerged, base_logits, atol=1e-3), "adapter must change the output"
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(restored, unmerged, atol=1e-5, rtol=0)
    for name, layer in lora_layers(model):
        torch.testing.assert_close(layer.base.weight, base_weights[name + ".weight"], atol=1e-6, rtol=0)


def test_merge_and_unload_returns_plain_modules_with_merged_weights(llama):
    x = ids()
    inject(llama, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
    randomize_b(llama)
    with torch.no_grad():
        expect = llama(x).logits
    merge_and_unload(llama)
    assert not any(isinstance(m, LoraLinear) for m in llama.modules())
    with torch.no_grad():
        torch.testing.assert_close(llama(x).logits, expect, atol=1e-5, rtol=0)


def test_training_starts_at_the_base_and_only_adapters_train(llama):
    x = ids()
    with torch.no_grad():
        base_logits = llama(x).logits
    total_before, _ = count_parameters(llama)
    names = inject(llama, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        torch.testing.assert_close(llama(x).logits, base_logits, atol=0, rtol=0)
    total, trainable = count_parameters(llama)
    # per layer: q (64->64) and v (64->32 with 2 kv heads of 16): r*(in+out)
    assert trainable == 2 * 8 * ((64 + 64) + (64 + 32))
    assert total == total_before + trainable
    assert len(names) == 4
    for n, p in llama.named_parameters():
        assert p.requires_grad == (".lora_" in n), n


def test_scaling_plain_and_rslora():
    base = torch.nn.Linear(16, 8)
    assert LoraLinear(base, r=4, lora_alpha=8).scaling == 2.0
    assert LoraLinear(torch.nn.Linear(16, 8), r=4, lora_alpha=8, use_rslora=True).scaling == 8 / math.sqrt(4)
    assert LoraConfig(r=16, lora_alpha=32, use_rslora=True).scaling == 8.0


def test_disabled_adapter_gives_base_output(llama):
    x = ids()
    with torch.no_grad():
        base_logits = llama(x).logits
    inject(llama, LoraConfig(r=4, target_modules="all-linear"))
    randomize_b(llama)
    set_adapters_enabled(llama, False)
    with torch.no_grad():
        torch.testing.assert_close(llama(x).logits, base_logits, atol=0, rtol=0)
    set_adapters_enabled(llama, True)
    with torch.no_grad():
        assert not torch.allclose(llama(x).logits, base_logits, atol=1e-3)


def test_all_linear_excludes_output_head_and_regex_targets(llama):
    names = inject(llama, LoraConfig(r=2, target_modules="all-linear"))
    assert "lm_head" not in names and len(names) == 2 * 7
    other = tiny.tiny_llama()
    names = inject(other, LoraConfig(r=2, target_modules=r".*\.1\.mlp\.(up|down)_proj"))
    assert names == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]


def test_targets_matching_nothing_list_linear_names(llama):
    with pytest.raises(TargetModulesError, match=r"matches no linear module.*q_proj.*v_proj"):
        inject(llama, LoraConfig(target_modules=["query", "value"]))


def test_safe_merge_refuses_non_finite(llama):
    inject(llama, LoraConfig(r=2, target_modules=["q_proj"]))
    layer = next(layer for _, layer in lora_layers(llama))
    with torch.no_grad():
        layer.lora_B.weight.fill_(float("nan"))
    before = layer.base.weight.clone()
    with pytest.raises(MergeError, match="non-finite"):
        merge(llama, safe=True)
    assert torch.equal(layer.base.weight, before)


def test_bf16_base_with_fp32_adapter_runs_and_merges():
    model = tiny.tiny_llama().to(torch.bfloat16)
    inject(model, LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_b(model, scale=0.05)
    layer = next(layer for _, layer in lora_layers(model))
    assert layer.lora_A.weight.dtype == torch.float32 and layer.base.weight.dtype == torch.bfloat16
    x = ids()
    with torch.no_grad():
        a = model(x).logits
        merge(model)
        b = model(x).logits
    assert a.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), b.float(), atol=0.1, rtol=0.05)


def test_config_problems_all_listed():
    problems = LoraConfig(r=0, lora_alpha=-1, lora_dropout=1.5, target_modules=[], bias="all").problems()
    assert [p.split(":")[0] for p in problems] == ["r", "lora_alpha", "lora_dropout", "target_modules", "bias"]
