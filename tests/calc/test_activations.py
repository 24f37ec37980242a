"""The activation formula equals the bytes autograd actually keeps for the backward pass.

The reference is `torch.autograd.graph.saved_tensors_hooks`: every tensor an op saves for its
backward passes through the pack hook; we add up the distinct storages that are not parameters.
"""

import pytest
import torch

from lorakit.calc.activations import activation_bytes
from lorakit.calc.params import count_parameters, shape_from_config
from lorakit.lora import LoraConfig, inject


def saved_activation_bytes(model, ids, mask) -> int:
    """Bytes of the distinct non-parameter storages saved for backward by one forward + loss."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=mask, labels=ids)
    return sum(kept.values())


def _model(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=3)
    configs = {
        "llama_gqa": tf.LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2),
        "llama_tied_attn_dropout": tf.LlamaConfig(**common, num_attention_heads=4,
                                                  num_key_value_heads=2, attention_dropout=0.1,
                                                  tie_word_embeddings=True),
        "qwen3": tf.Qwen3Config(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
        "gpt2_dropout": tf.GPT2Config(vocab_size=400, n_embd=64, n_layer=3, n_head=4, n_positions=64),
        "gpt2_no_dropout": tf.GPT2Config(vocab_size=400, n_embd=64, n_layer=3, n_head=4, n_positions=64,
                                         resid_pdrop=0.0, attn_pdrop=0.0, embd_pdrop=0.0),
    }
    return tf.AutoModelForCausalLM.from_config(configs[kind])


# (method, llama-style targets, GPT-2 targets, adapter dtype)
SETUPS = {
    "full": ("full", None, None, None),
    "freeze": ("freeze", None, None, None),
    "lora_qv": ("lora", ["q_proj", "v_proj"], ["c_attn"], torch.float32),
    "lora_v_only": ("lora", ["v_proj"], ["attn.c_proj"], torch.float32),
    "lora_mlp_and_head": ("lora", ["down_proj", "lm_head"], ["mlp.c_proj", "lm_head"], torch.float32),
    "lora_all_linear": ("lora", "all-linear", "all-linear", torch.float32),
    "lora_all_linear_bf16_adapters": ("lora", "all-linear", "all-linear", torch.bfloat16),
}
BATCH, SEQ = 2, 16


@pytest.mark.parametrize("kind", ["llama_gqa", "llama_tied_attn_dropout", "qwen3", "gpt2_dropout",
                                  "gpt2_no_dropout"])
@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize(("dtype", "padded"), [(torch.float32, False), (torch.float32, True),
                                               (torch.bfloat16, True)],
                         ids=["fp32", "fp32-padded", "bf16-padded"])
def test_activation_formula_equals_saved_tensors(kind, setup, dtype, padded):
    method, llama_targets, gpt2_targets, adapter_dtype = SETUPS[setup]
    model = _model(kind).to(dtype).train()
    shape = shape_from_config(model.config.to_dict())
    targets = gpt2_targets if kind.startswith("gpt2") else llama_targets
    if method == "lora":
        inject(model, LoraConfig(r=4, target_modules=targets), dtype=adapter_dtype)
        counts = count_parameters(shape, "lora", 4, targets)
    elif method == "freeze":
        counts = count_parameters(shape, "freeze", layers_to_train=2)
        trainable = {f"{shape.block_prefix}.{i}." for i in counts.trainable_layers}
        for name, p in model.named_parameters():
            p.requires_grad_(any(name.startswith(t) for t in trainable))
    else:
        counts = count_parameters(shape, "full")
    ids = torch.randint(0, 400, (BATCH, SEQ))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :5] = 0
    e = 4 if dtype == torch.float32 else 2
    ea = 2 if adapter_dtype == torch.bfloat16 else 4
    estimate = activation_bytes(shape, counts, BATCH, SEQ, e, ea, r=4, padded=padded)
    assert estimate.total == saved_activation_bytes(model, ids, mask)


@pytest.mark.parametrize("kind", ["llama_gqa", "qwen3", "gpt2_no_dropout"])
@pytest.mark.parametrize("method", ["full", "lora", "freeze"])
def test_checkpointed_forward_keeps_block_inputs_and_head(kind, method):
    """Under gradient checkpointing the forward keeps each block's input plus the head; the rest
    (one block at a time, and the rotary tables it uses) comes back during backward."""
    model = _model(kind).train()
    shape = shape_from_config(model.config.to_dict())
    if method == "lora":
        inject(model, LoraConfig(r=4, target_modules="all-linear"))
        model.enable_input_require_grads()
        counts = count_parameters(shape, "lora", 4, "all-linear")
    elif method == "freeze":
        counts = count_parameters(shape, "freeze", layers_to_train=1)
        last = f"{shape.block_prefix}.{counts.trainable_layers[0]}."
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(last))
    else:
        counts = count_parameters(shape, "full")
    model.activation_checkpointing_enable()
    ids = torch.randint(0, 400, (BATCH, SEQ))
    estimate = activation_bytes(shape, counts, BATCH, SEQ, 4, 4, r=4)
    assert estimate.block_inputs + estimate.head == saved_activation_bytes(model, ids, torch.ones_like(ids))
    assert estimate.total_checkpointed == (estimate.block_inputs + estimate.head + estimate.rope_tables
                                           + estimate.largest_block)
    # Frozen blocks keep their input under checkpointing but nothing without it.
    assert (estimate.total_checkpointed < estimate.total) == (method != "freeze")


def test_gradient_checkpointing_is_korthikanti_2sbhl_plus_one_block():
    """At 16 bits the kept block inputs are 2*s*b*h*L bytes (Korthikanti et al. 2022, sec. 5)."""
    from lorakit.calc.presets import get_preset

    shape = shape_from_config(get_preset("llama-3-8b"))
    counts = count_parameters(shape, "full")
    s, b = 2048, 1
    acts = activation_bytes(shape, counts, b, s, e=2)
    assert acts.block_inputs == 2 * s * b * shape.hidden_size * shape.num_layers
    assert acts.largest_block * shape.num_layers == acts.blocks
