"""QLoRA's NF4 base: round-trip error, memory, LoRA over it, and merging from it (tiny, CPU)."""

import json

import pytest
import torch

from lorakit.adapters import load_adapter, save_adapter
from lorakit.errors import MergeError
from lorakit.lora import LoraConfig, inject, lora_layers, merge
from lorakit.lora.quant import (
    NF4_LEVELS,
    dequantize_base,
    is_nf4,
    nf4_nbytes,
    quantize_base_nf4,
    scaler_block_for,
    to_nf4,
)
from tests import tiny
from tests.lora.test_layer import ids, randomize_b

pytest.importorskip("torchao")

HALF_GAP = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:])) / 2  # 0.1385


@pytest.mark.parametrize("shape", [(256, 1024), (576, 576), (192, 576)])
def test_nf4_round_trip_within_the_nf4_bound(shape):
    """Every weight comes back within half the widest NF4 gap of its block's absmax, plus the
    int8 error of the double-quantized scale (QLoRA's scheme): |w - q| <= 0.1385 s + |s - s'|."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    q = to_nf4(w)
    back = q.get_original_weight().float()
    blocks = w.float().reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)  # (n_blocks, 1)
    scales = q.dequantize_scalers(q.quantized_scalers, q.quantization_factor,
                                  q.scaler_block_size).float().view(-1, 1)
    bound = HALF_GAP * absmax + (absmax - scales).abs() + 2 ** -7 * absmax  # + bf16 rounding
    err = (back.reshape(-1, 64) - blocks).abs()
    assert (err <= bound).all(), float((err - bound).max())
    # Relative RMS error of NF4 on normal weights is about 0.1 (4 bits); int4 absmax is worse.
    rel = float((back - w.float()).norm() / w.float().norm())
    assert 0.05 < rel < 0.12
    if shape == (576, 576):  # 5,184 blocks: 256 does not divide them, the largest divisor does
        assert q.scaler_block_size == scaler_block_for(576 * 576) == 216


def test_base_memory_under_0_3x_bf16_and_lora_on_nf4_equals_lora_on_dequantized(tmp_path):
    x = ids()
    model = tiny.tiny_llama(tie=True).to(torch.bfloat16)
    report = quantize_base_nf4(model)
    assert len(report.modules) == 2 * 7  # q k v o gate up down per block; the head stays
    assert all(is_nf4(model.get_submodule(m).weight) for m in report.modules)
    assert report.bytes_after == sum(nf4_nbytes(model.get_submodule(m).weight) for m in report.modules)
    assert report.ratio_to_bf16 <= 0.3, report.ratio_to_bf16
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    inject(model, cfg)
    randomize_b(model, scale=0.05)
    with torch.no_grad():
        quantized = model(x).logits.float()
    # The same adapter on the dequantized weights gives the same outputs.
    dense = tiny.tiny_llama(tie=True).to(torch.bfloat16)
    quantize_base_nf4(dense)
    dequantize_base(dense)
    assert not any(is_nf4(p) for p in dense.parameters())
    save_adapter(model, cfg, tmp_path / "a")
    load_adapter(dense, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(dense(x).logits.float(), quantized, atol=1e-2, rtol=0)


def test_qlora_training_step_updates_only_adapters():
    model = tiny.tiny_llama().to(torch.bfloat16)
    quantize_base_nf4(model)
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(not is_nf4(p) for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = ids()
    before = [p.detach().clone() for p in params]
    loss = model(x, labels=x).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, params))


def test_merge_into_nf4_refused_with_a_pointer():
    model = tiny.tiny_llama().to(torch.bfloat16)
    quantize_base_nf4(model)
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with pytest.raises(MergeError, match=r"NF4.*dequantize the base first"):
        merge(model)


def test_merge_from_nf4_base_reports_drift(tmp_path, monkeypatch):
    """`lorakit merge --quantize-base nf4`: the written model is the trained one (dequantized
    NF4 + update, drift ~ rounding); merging into the original weights drifts much more."""
    from transformers import AutoModelForCausalLM

    from lorakit.adapters.merge import merge_to_directory
    from lorakit.cli import main
    from lorakit.models import load_base

    base_dir = tmp_path / "base"
    tiny.tiny_llama().save_pretrained(base_dir)
    tiny.tiny_tokenizer().save_pretrained(base_dir)
    model, _ = load_base(str(base_dir), dtype=torch.bfloat16, device="cpu")
    quantize_base_nf4(model)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    inject(model, cfg)
    randomize_b(model, scale=0.05)
    save_adapter(model, cfg, tmp_path / "adapter")

    result = merge_to_directory(str(base_dir), tmp_path / "adapter", tmp_path / "merged",
                                quantize_base="nf4")
    assert result.sample_tokens > 0
    assert result.drift_vs_quantized < 0.05 < result.drift_if_original
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    x = ids()
    with torch.no_grad():
        ref = model(x).logits.float()
        torch.testing.assert_close(merged(x).logits, ref, atol=0.05, rtol=0)
    code = main(["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "m2"), "--quantize-base", "nf4"])
    assert code == 0
    assert json.loads((tmp_path / "m2" / "config.json").read_text())["num_hidden_layers"] == 2


def test_dora_on_nf4_base_runs_and_matches_dequantized():
    x = ids()
    model = tiny.tiny_llama().to(torch.bfloat16)
    quantize_base_nf4(model)
    inject(model, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"]))
    randomize_b(model, scale=0.05)
    with torch.no_grad():
        q_out = model(x).logits.float()
        dequantize_base(model)
        torch.testing.assert_close(model(x).logits.float(), q_out, atol=1e-2, rtol=0)
    layer = dict(lora_layers(model))["model.layers.0.self_attn.q_proj"]
    assert layer.use_dora
