"""The real bundled base (SmolLM2-135M-Instruct, Q4_1 GGUF): converted into this test's
LORAKIT_HOME, reloaded from the cache with the same logits, and able to answer in ChatML.

The first test is not marked slow on purpose (it is the one check that the shipped default model
works end to end) and stays under ~40 s on 2 CPU cores; the slow one adds comparisons that need a
second dequantization or a second dtype.
"""

import json
import time

import pytest
import torch

from lorakit.models import DEFAULT_MODEL, gguf_cache, load_base
from lorakit.models.gguf_cache import is_complete, models_dir

PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _logits(model, tokenizer):
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits


def _answer(model, tokenizer, max_new_tokens=10) -> str:
    enc = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_bundled_model_converts_once_reloads_and_generates(monkeypatch, capsys):
    converted = []
    real = gguf_cache._convert_into
    monkeypatch.setattr(gguf_cache, "_convert_into", lambda *a: (converted.append(a), real(*a)))

    first, tok = load_base(DEFAULT_MODEL)
    caches = [p for p in models_dir().iterdir() if p.is_dir()]
    assert len(caches) == 1 and is_complete(caches[0])
    assert caches[0].name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    cfg = first.config
    assert (type(first).__name__, cfg.num_hidden_layers, cfg.hidden_size, cfg.tie_word_embeddings) == \
        ("LlamaForCausalLM", 30, 576, True)
    assert tok.chat_template and tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    first_logits = _logits(first, tok)
    del first

    start = time.perf_counter()
    again, tok2 = load_base(DEFAULT_MODEL)
    reload_seconds = time.perf_counter() - start
    assert len(converted) == 1
    assert reload_seconds < 15, f"reading the cache took {reload_seconds:.1f} s"
    assert torch.equal(_logits(again, tok2), first_logits)
    assert again.lorakit_identity["name"] == DEFAULT_MODEL
    assert len(again.lorakit_identity["weights_sha256"]) == 64

    answer = _answer(again, tok2)
    assert answer.strip(), "greedy generation produced no text"

    # `lorakit info` on the same cache: 30 layers x 8 x ((576 + 576) + (576 + 192)) for q and v.
    from lorakit.cli import main

    capsys.readouterr()
    assert main(["info", "--model", DEFAULT_MODEL, "--r", "8", "--target-modules", "q_proj,v_proj",
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["trainable_params"] == 460_800
    assert len(info["adapted_modules"]) == 60 and len(converted) == 1


@pytest.mark.slow
def test_bundled_cache_equals_direct_gguf_load_and_bf16_keeps_identity():
    from transformers import AutoModelForCausalLM, GgufConfig

    from lorakit.models.load import bundled_gguf

    cached, tok = load_base(DEFAULT_MODEL)
    gguf_path = bundled_gguf(DEFAULT_MODEL)
    direct = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                  dtype=torch.float32,
                                                  quantization_config=GgufConfig(dequantize=True)).eval()
    assert torch.equal(_logits(direct, tok), _logits(cached, tok))
    assert "Paris" in _answer(cached, tok, max_new_tokens=12)

    bf16, _ = load_base(DEFAULT_MODEL, dtype=torch.bfloat16)
    assert bf16.lorakit_identity == cached.lorakit_identity
    # bf16 keeps the model usable: the next-token choice after the prompt is unchanged.
    assert _logits(bf16, tok)[0, -1].argmax() == _logits(cached, tok)[0, -1].argmax()
