"""Base identity: equal across fp32/bf16 loads and LoRA injection, different after one weight
changes, and equal to a plain-loop reference of the hash."""

import hashlib

import pytest
import torch

from lorakit.lora import LoraConfig, inject, lora_layers
from lorakit.models import base_identity, load_base
from lorakit.models.identity import MAX_SAMPLE, RUN, original_name, weights_sha256
from tests import tiny


def reference_sha256(named_params: dict[str, torch.Tensor]) -> str:
    """The hash as a plain loop: explicit sample indices, one element at a time."""
    h = hashlib.sha256()
    for name in sorted(named_params):
        p = named_params[name].detach().float().reshape(-1)
        n = p.numel()
        if n <= MAX_SAMPLE:
            index = list(range(n))
        else:
            count = MAX_SAMPLE // RUN
            step = (n - RUN) // (count - 1)
            index = [k * step + j for k in range(count) for j in range(RUN)]
        values = torch.tensor([p[i].item() for i in index], dtype=torch.float32).to(torch.bfloat16)
        h.update(name.encode() + b"\0" + ",".join(map(str, named_params[name].shape)).encode() + b"\0")
        h.update(values.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def test_matches_the_plain_loop_reference_including_sampled_tensors():
    # vocab 2000 x hidden 64 = 128,000 elements: the embedding and head are sampled, not whole.
    model = tiny.tiny_llama(vocab_size=2000)
    params = dict(model.named_parameters())
    assert params["model.embed_tokens.weight"].numel() > MAX_SAMPLE
    assert weights_sha256(model) == reference_sha256(params)


def test_tied_weights_are_hashed_once():
    model = tiny.tiny_llama(tie=True)
    params = dict(model.named_parameters())  # named_parameters drops the tied lm_head.weight
    assert "lm_head.weight" not in params
    assert weights_sha256(model) == reference_sha256(params)


def test_same_for_fp32_and_bf16_loads(tmp_path, llama, tokenizer):
    llama.save_pretrained(str(tmp_path / "m"))
    tokenizer.save_pretrained(str(tmp_path / "m"))
    fp32, _ = load_base(tmp_path / "m", dtype=torch.float32)
    bf16, _ = load_base(tmp_path / "m", dtype=torch.bfloat16)
    assert fp32.lorakit_identity == bf16.lorakit_identity
    assert fp32.lorakit_identity == {"name": str((tmp_path / "m").resolve()),
                                     "weights_sha256": weights_sha256(llama)}
    assert weights_sha256(llama.to(torch.bfloat16)) == fp32.lorakit_identity["weights_sha256"]


@pytest.mark.parametrize("where", ["small", "sampled_run"])
def test_changes_when_one_weight_changes(where):
    model = tiny.tiny_llama(vocab_size=2000)
    before = weights_sha256(model)
    with torch.no_grad():
        if where == "small":
            model.model.layers[1].mlp.up_proj.weight[3, 5] += 0.01
        else:  # the embedding is sampled; its second run starts at `step`
            n = model.model.embed_tokens.weight.numel()
            step = (n - RUN) // (MAX_SAMPLE // RUN - 1)
            model.model.embed_tokens.weight.view(-1)[step + 1] += 0.01
    assert weights_sha256(model) != before


def test_name_and_shape_are_part_of_the_identity(llama):
    other = tiny.tiny_llama(vocab_size=401)  # same seed, one more row in embedding and head
    assert weights_sha256(other) != weights_sha256(llama)
    assert base_identity(llama, "a")["weights_sha256"] == base_identity(llama, "b")["weights_sha256"]
    assert base_identity(llama, "a")["name"] == "a"


def test_lorakit_injection_does_not_change_it(llama):
    before = weights_sha256(llama)
    inject(llama, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    layers = dict(lora_layers(llama))
    assert len(layers) == 14  # 7 linears x 2 layers
    for layer in layers.values():
        torch.nn.init.normal_(layer.lora_B.weight)  # B != 0: the adapter changes the output
    assert any(".base." in name for name, _ in llama.named_parameters())
    assert weights_sha256(llama) == before


def test_peft_wrapping_does_not_change_it(llama):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    before = weights_sha256(llama)
    peft_model = get_peft_model(llama, PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    assert any("base_layer" in name for name, _ in peft_model.named_parameters())
    assert weights_sha256(peft_model) == before


def test_original_name():
    wrappers = {"model.layers.0.self_attn.q_proj"}
    assert original_name("model.layers.0.self_attn.q_proj.base.weight", wrappers) == \
        "model.layers.0.self_attn.q_proj.weight"
    assert original_name("model.layers.0.self_attn.q_proj.lora_A.weight", wrappers) is None
    # A module that happens to be called `base` outside a wrapper keeps its name.
    assert original_name("encoder.base.weight", wrappers) == "encoder.base.weight"
    assert original_name("base_model.model.lm_head.weight", set(), peft_model=True) == "lm_head.weight"
