"""Training and serving memory: the worked figures, and a measured step against the estimate."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from lorakit.calc.memory import (
    GB,
    adamw_state_bytes,
    adapter_file_bytes,
    base_weight_bytes,
    bytes_per_parameter_full,
    kv_cache_bytes,
    nf4_constant_bytes,
    serving_bytes,
    training_memory,
)
from lorakit.calc.params import count_parameters, shape_from_config
from lorakit.calc.presets import get_preset
from lorakit.lora import LoraConfig, inject, lora_state_dict

REPO = Path(__file__).resolve().parents[2]

# Llama-2-7B's shapes: the usual "7B" model.
LLAMA_7B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
            "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "tie_word_embeddings": False}


def test_full_finetuning_is_16_bytes_per_parameter():
    # fp32: weights 4 + grads 4 + Adam 8; 16-bit: 2 + 2 + Adam 8 + fp32 master 4 (ZeRO).
    assert bytes_per_parameter_full("fp32") == 16
    assert bytes_per_parameter_full("bf16") == 16
    assert 7 * 10**9 * bytes_per_parameter_full("fp32") == 112 * GB
    shape = shape_from_config(LLAMA_7B)
    counts = count_parameters(shape, "full")
    assert counts.base == 6_738_415_616
    mem = training_memory(shape, counts, batch=1, seq_len=512, dtype="fp32")
    assert (mem.weights, mem.gradients, mem.optimizer_states, mem.master_weights) == (
        4 * counts.base, 4 * counts.base, 8 * counts.base, 0)
    assert mem.static == 16 * counts.base == 107_814_649_856  # ~108 GB: "about 112 GB for 7B"


def test_lora_memory_terms_on_llama_3_8b():
    shape = shape_from_config(get_preset("llama-3-8b"))
    counts = count_parameters(shape, "lora", 8, ["q_proj", "v_proj"])
    mem = training_memory(shape, counts, batch=1, seq_len=512, dtype="bf16", adapter_dtype="fp32")
    assert mem.weights == 2 * 8_030_261_248 + 4 * 3_407_872
    assert mem.gradients == 4 * 3_407_872
    assert mem.optimizer_states == adamw_state_bytes(3_407_872) == 8 * 3_407_872
    assert mem.master_weights == 0  # fp32 adapters need no master copy
    assert mem.quantization_constants == 0
    assert 0 < mem.activations_checkpointed < mem.activations


def test_serving_8b_base_with_15_adapters():
    # The worked example: 8B fp32 base (32 GB) + 15 adapters of 20M fp32 parameters (80 MB each).
    assert adapter_file_bytes(20 * 10**6, 4) == 80 * 10**6
    assert serving_bytes(8 * 10**9 * 4, 15, 20 * 10**6, 4) == 33_200_000_000
    # The same with Llama-3-8B's real count and an all-linear r=8 adapter (20,971,520 parameters).
    shape = shape_from_config(get_preset("llama-3-8b"))
    counts = count_parameters(shape, "lora", 8, "all-linear")
    assert counts.trainable == 20_971_520
    base = base_weight_bytes(counts, 4)
    assert base == 32_121_044_992
    total = serving_bytes(base, 15, counts.trainable, 4)
    assert total == 33_379_336_192  # 32.12 + 15 * 0.0839 GB: "about 34 GB" rounded up
    assert 33 * GB < total < 34 * GB


def test_nf4_constants_are_0_127_bits_per_parameter_with_double_quant():
    n = 64 * 256 * 1000
    assert nf4_constant_bytes(n, double_quant=True) * 8 / n == 8 / 64 + 32 / (64 * 256) == 0.126953125
    assert nf4_constant_bytes(n, double_quant=False) * 8 / n == 0.5


def test_qlora_weights_are_nf4_blocks_plus_16_bit_rest():
    shape = shape_from_config(get_preset("llama-3-8b"))
    counts = count_parameters(shape, "qlora", 8, ["q_proj", "v_proj"])
    linear_weights = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    assert counts.quantized == linear_weights
    mem = training_memory(shape, counts, batch=1, seq_len=512, dtype="bf16")
    rest = counts.base - linear_weights  # embeddings, head, norms
    assert mem.weights == linear_weights / 2 + 2 * rest + 4 * counts.trainable
    assert mem.quantization_constants == linear_weights * 0.126953125 / 8


def test_kv_cache_bytes():
    shape = shape_from_config(get_preset("llama-3-8b"))
    # 2 (k, v) * 32 layers * 8 kv heads * 128 dims * 2 bytes = 128 KiB per token.
    assert kv_cache_bytes(shape, 1, 2) == 131_072
    assert kv_cache_bytes(shape, 4 * 1024, 2) == 512 * 2**20


def test_adapter_file_size_matches_a_saved_file(tmp_path, llama):
    inject(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    shape = shape_from_config(llama.config.to_dict())
    counts = count_parameters(shape, "lora", 4, ["q_proj", "v_proj"])
    path = tmp_path / "adapter_model.safetensors"
    save_file({k: v.contiguous() for k, v in lora_state_dict(llama).items()}, str(path))
    header = path.stat().st_size - adapter_file_bytes(counts.trainable, 4)
    assert 0 < header < 4096  # the rest is the JSON header naming the tensors


MEASURED = {"model_type": "llama", "vocab_size": 2048, "hidden_size": 512,
            "intermediate_size": 1376, "num_hidden_layers": 4, "num_attention_heads": 8,
            "num_key_value_heads": 4, "max_position_embeddings": 512, "tie_word_embeddings": False}


@pytest.mark.slow
def test_measured_step_peak_within_25_percent():
    """Peak RSS of real AdamW steps (hidden 512, 4 blocks, batch 8 x 256, fp32) vs the estimate,
    for full fine-tuning and an all-linear LoRA (how it is measured: tests/calc/peak_step.py)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("peak_step.py")), json.dumps(MEASURED),
         "fp32", "8", "256", "full", "lora"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    shape = shape_from_config(MEASURED)
    for method in ("full", "lora"):
        counts = count_parameters(shape, method, 8, "all-linear")
        estimate = training_memory(shape, counts, batch=8, seq_len=256, dtype="fp32").total
        assert estimate > 300 * 10**6  # large enough that interpreter overhead does not dominate
        assert abs(measured[method] - estimate) / estimate < 0.25, (method, measured[method], estimate)


def test_per_rank_memory_splits_the_batch_and_fsdp_shards_the_state():
    """DDP: every rank holds the whole model and 1/N of the batch's activations. FSDP2: 1/N of
    weights, gradients and optimizer state plus one gathered block (PyTorch FSDP, ZeRO-3)."""
    from lorakit.calc.memory import per_rank_memory
    from lorakit.calc.params import block_param_count

    shape = shape_from_config(LLAMA_7B)
    full = count_parameters(shape, "full", 8, "all-linear", 1)
    one = training_memory(shape, full, 8, 1024, "bf16")
    ddp = per_rank_memory(shape, full, 8, 1024, 4, "ddp", "bf16")
    assert ddp == training_memory(shape, full, 2, 1024, "bf16")
    assert ddp.weights == one.weights and ddp.optimizer_states == one.optimizer_states
    assert ddp.activations == pytest.approx(one.activations / 4, rel=0.01)
    fsdp = per_rank_memory(shape, full, 8, 1024, 4, "fsdp", "bf16")
    block = block_param_count(shape, 0) * 2
    assert fsdp.weights == pytest.approx(one.weights / 4 + block)
    assert fsdp.gradients == pytest.approx(one.gradients / 4 + block)
    assert fsdp.optimizer_states == pytest.approx(one.optimizer_states / 4)
    assert fsdp.total < ddp.total / 2.5
    # LoRA: the frozen base's blocks are gathered, but no base gradient exists to gather.
    lora = count_parameters(shape, "lora", 8, "all-linear", 1)
    assert per_rank_memory(shape, lora, 8, 1024, 2, "fsdp", "bf16").gradients == pytest.approx(
        training_memory(shape, lora, 4, 1024, "bf16").gradients / 2)
