"""GGUF export for every family the table gives a llama.cpp architecture (Llama, Mistral as llama,
Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3): the merged file loads in transformers' GGUF reader with
the merged model's logits, the LoRA file's tensors rebuild each module's delta under the merged
file's tensor names; GPT-2 is refused up front with the table's reason, and so is a config that
llama.cpp's graph for its family would compute differently.

transformers' GGUF reader takes what a file does not state from the config class's defaults: a
Qwen3 file's head_dim is 128 (it reads no key_length for qwen3), a Gemma file's
query_pre_attn_scalar 256, Gemma 2's soft-cappings 50 / 30 and Gemma 3's sliding-layer pattern one
in six. So the tiny Qwen3 and Gemmas have those values, as the released models do (Gemma 3 with 6
layers, so one is global); the norms are moved off their init, so Gemma's stored 1 + w matters.
A SentencePiece vocabulary (Gemma's kind, and Llama 2's / Phi-3's with a `▁` in front) is checked
by transformers' GGUF tokenizer reader and by llama.cpp's SentencePiece merge loop restated here."""

import json
import re

import numpy as np
import pytest
import torch

from lorakit.adapters import save_adapter
from lorakit.adapters.export_gguf import ExportError, export
from lorakit.lora import LoraConfig, inject, lora_layers
from lorakit.models import load_base
from lorakit.models.families import FAMILIES, gguf_config_problems
from tests import tiny
from tests.adapters.test_export_gguf import _load_gguf, _merged
from tests.lora.test_layer import randomize_b
from tests.models.test_families import _COMMON, tiny_family

gguf = pytest.importorskip("gguf")

EXPORTED = [t for t, f in FAMILIES.items() if f.gguf_arch]
REFUSED = [t for t, f in FAMILIES.items() if not f.gguf_arch]


def _readable_config(model_type):
    """The family's tiny config, with the values transformers' GGUF reader assumes (see above)."""
    import transformers as T

    if model_type == "gemma2":
        return T.Gemma2Config(**_COMMON, head_dim=256, sliding_window=8)
    if model_type == "gemma3_text":
        return T.Gemma3TextConfig(**{**_COMMON, "num_hidden_layers": 6}, head_dim=256, sliding_window=8)
    return tiny_family(model_type).config


def _readable(model_type):
    from transformers import AutoModelForCausalLM

    if model_type not in ("gemma2", "gemma3_text"):
        return tiny_family(model_type)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_readable_config(model_type))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _base(model_type, path, tokenizer=None):
    _readable(model_type).save_pretrained(path)
    (tokenizer or tiny.tiny_tokenizer()).save_pretrained(path)
    return path


def _adapter(base, out):
    model, _ = load_base(base)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    inject(model, cfg)
    randomize_b(model, scale=0.3)
    return save_adapter(model, cfg, out), {n: (l.scaling * l.lora_B.weight @ l.lora_A.weight).detach()
                                           for n, l in lora_layers(model)}


def test_the_table_exports_every_family_but_gpt2():
    assert EXPORTED == ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3"]
    assert REFUSED == ["gpt2"]


@pytest.mark.parametrize("model_type", EXPORTED)
def test_merged_gguf_loads_in_transformers_with_the_merged_logits(model_type, tmp_path):
    base = _base(model_type, tmp_path / "base")
    adapter, _ = _adapter(base, tmp_path / "adapter")
    merged, _ = _merged(base, adapter)
    x = torch.randint(1, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = merged(x).logits
        assert not torch.allclose(want, load_base(base)[0](x).logits, atol=1e-3)
    out = export(str(base), adapter, tmp_path / "m.gguf", fmt="gguf", outtype="f32").path
    reader = gguf.GGUFReader(str(out))
    arch = reader.fields["general.architecture"].contents()
    assert arch == gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[FAMILIES[model_type].gguf_arch]]
    if model_type == "qwen2":  # transformers gives a Qwen2 folder Qwen2's pre-tokenizer regex
        assert reader.fields["tokenizer.ggml.pre"].contents() == "qwen2"
    # What llama.cpp reads and transformers' reader does not: the header states the config's values.
    cfg, fields = merged.config, reader.fields
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(cfg, key, None) is not None:
            assert fields[f"{arch}.{key}"].contents() == pytest.approx(getattr(cfg, key))
        else:
            assert f"{arch}.{key}" not in fields
    if FAMILIES[model_type].gguf_window_key:
        assert fields[f"{arch}.attention.sliding_window"].contents() == (cfg.sliding_window or 0)
    assert fields[f"{arch}.attention.key_length"].contents() == \
        (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    loaded = _load_gguf(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", EXPORTED)
def test_gguf_lora_rebuilds_each_delta_under_the_model_names(model_type, tmp_path):
    from lorakit.adapters.export_gguf import tensor_name_map, to_gguf_layout

    base = _base(model_type, tmp_path / "base")
    adapter, deltas = _adapter(base, tmp_path / "adapter")
    out = export(str(base), adapter, tmp_path / "l.gguf", fmt="gguf-lora", outtype="f32").path
    model_file = export(str(base), adapter, tmp_path / "m.gguf", fmt="gguf", outtype="f32").path
    model_names = {t.name for t in gguf.GGUFReader(str(model_file)).tensors}
    reader = gguf.GGUFReader(str(out))
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    tensors = {t.name: torch.from_numpy(np.array(t.data)).reshape(tuple(reversed(t.shape.tolist())))
               for t in reader.tensors}
    config = load_base(base)[0].config
    names = tensor_name_map(config)
    assert len(tensors) == 2 * len(deltas)
    for module, delta in deltas.items():
        name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        assert name in model_names, module
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        want = to_gguf_layout(f"{module}.weight", delta, config)
        torch.testing.assert_close(alpha / a.shape[0] * b @ a, want, atol=1e-5, rtol=0, msg=module)


@pytest.mark.parametrize("model_type", REFUSED)
def test_other_families_are_refused_with_the_reason(model_type, tmp_path):
    base = tmp_path / "base"
    tiny_family(model_type).save_pretrained(base)
    tiny.tiny_tokenizer().save_pretrained(base)
    adapter, _ = _adapter(base, tmp_path / "adapter")
    with pytest.raises(ExportError) as e:
        export(str(base), adapter, tmp_path / "m.gguf", fmt="gguf")
    assert FAMILIES[model_type].gguf_refusal in str(e.value)
    assert not (tmp_path / "m.gguf").exists()


def test_a_configured_sliding_window_is_refused(tmp_path):
    model = tiny_family("mistral")
    model.config.sliding_window = 4096
    model.save_pretrained(tmp_path / "base")
    tiny.tiny_tokenizer().save_pretrained(tmp_path / "base")
    adapter, _ = _adapter(tmp_path / "base", tmp_path / "adapter")
    with pytest.raises(ExportError, match="sliding_window=4096"):
        export(str(tmp_path / "base"), adapter, tmp_path / "m.gguf", fmt="gguf")


_ROPE_DEFAULT = dict(rope_type="default")


def _rope(full, sliding):
    return {"full_attention": full, "sliding_attention": sliding}


# (family, config changes, what the refusal names): what llama.cpp's graph fixes and a config could
# set otherwise (llama.cpp's `llama_model::load_hparams` and the converters' `set_gguf_parameters`).
CONFIG_REFUSALS = [
    ("gemma2", dict(layer_types=["full_attention", "sliding_attention"]),
     r"fixes them as \['sliding_attention', 'full_attention'\]"),
    ("gemma2", dict(query_pre_attn_scalar=64), r"query_pre_attn_scalar=64 .*1/sqrt\(256\): head_dim"),
    ("gemma2", dict(num_hidden_layers=46, layer_types=None),  # Gemma 2 27B's layer count
     r"query_pre_attn_scalar=256 .*1/sqrt\(16\): hidden / heads at this layer count"),
    ("gemma2", dict(final_logit_softcapping=None), "final_logit_softcapping=None .*always applies"),
    ("gemma2", dict(tie_word_embeddings=False), "tie_word_embeddings=False"),
    ("gemma2", dict(hidden_activation="gelu"), "hidden_act='gelu' .*'gelu_pytorch_tanh'"),
    ("gemma3_text", dict(layer_types=["sliding_attention", "full_attention"] * 3),
     r"fixes them as \[('sliding_attention', ){5}'full_attention'\]"),
    ("gemma3_text", dict(attn_logit_softcapping=50.0), "attn_logit_softcapping=50.0 .*has none"),
    ("gemma3_text", dict(rope_parameters=_rope(_ROPE_DEFAULT | dict(rope_theta=1e6),
                                                _ROPE_DEFAULT | dict(rope_theta=5e4))),
     "sliding layers' rope_theta=50000.0 .*fixes 10000.0"),
    ("gemma3_text", dict(rope_parameters=_rope(dict(rope_type="linear", factor=8.0, rope_theta=1e6),
                                                _ROPE_DEFAULT | dict(rope_theta=1e4))),
     "rope_type='linear'"),
    ("phi3", dict(sliding_window=2047), "sliding_window=2047 .*no window"),
    ("qwen2", dict(hidden_act="gelu"), "hidden_act='gelu' .*'silu'"),
]


@pytest.mark.parametrize("model_type,changes,reason", CONFIG_REFUSALS)
def test_configs_llama_cpp_computes_differently_are_refused(model_type, changes, reason):
    readable = _readable_config(model_type)
    assert not gguf_config_problems(readable)
    config = type(readable)(**{**readable.to_dict(), **changes})
    assert re.search(reason, "; ".join(gguf_config_problems(config))), gguf_config_problems(config)


def test_a_config_llama_cpp_computes_differently_is_refused_before_writing(tmp_path):
    """The test matrix's Gemma 3 has a global second layer; llama.cpp's gemma3 graph has its first
    global layer sixth."""
    tiny_family("gemma3_text").save_pretrained(tmp_path / "base")
    tiny.tiny_tokenizer().save_pretrained(tmp_path / "base")
    adapter, _ = _adapter(tmp_path / "base", tmp_path / "adapter")
    with pytest.raises(ExportError, match="Gemma3ForCausalLM cannot be exported to GGUF: layer_types="):
        export(str(tmp_path / "base"), adapter, tmp_path / "m.gguf", fmt="gguf")
    assert not (tmp_path / "m.gguf").exists()


# ---------------------------------------------------------------------------------------------
# A SentencePiece vocabulary (Gemma's kind): scored tokens, read back by transformers and llama.cpp
# ---------------------------------------------------------------------------------------------

_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
_GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
                   "{{ m['content'] }}<end_of_turn>\n{% endfor %}")


def sentencepiece_tokenizer(shape):
    """A tiny tokenizer shaped like Gemma's (`GemmaTokenizer`: no `▁` in front of the text, `<bos>`
    added, Gemma's turn tokens) or Llama 2's and Phi-3's (`LlamaTokenizer`: a `▁` in front): BPE
    over text with spaces as `▁`, byte fallback to `<0x..>` tokens."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import GemmaTokenizer, LlamaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.normalizer = normalizers.Replace(" ", "\u2581")
    specials = _SPECIALS + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    bpe.train_from_iterator(["\u2581" + text for text in tiny._CORPUS] * 4, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab, merges = model["vocab"], [tuple(m) for m in model["merges"]]
    if shape == "llama":
        return LlamaTokenizer(vocab=vocab, merges=merges, bos_token="<bos>", eos_token="<eos>",
                              add_bos_token=True)
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True,
                         additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    tok.chat_template = _GEMMA_TEMPLATE
    return tok


def llama_cpp_spm(text, tokens, scores, add_space_prefix):
    """llama.cpp's `llm_tokenizer_spm` on text without special tokens, as a plain loop: spaces as
    `▁` (one in front when add_space_prefix), one symbol per character, then merge the adjacent pair
    whose joined text is the best-scoring token (leftmost on a tie) until none is a token; a symbol
    that is no token falls back to its UTF-8 bytes `<0x..>`."""
    vocab = {t: i for i, t in enumerate(tokens)}
    symbols = list(("\u2581" if add_space_prefix else "") + text.replace(" ", "\u2581"))
    while True:
        pairs = [(scores[vocab[a + b]], -i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))
                 if a + b in vocab]
        if not pairs:
            break
        i = -max(pairs)[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return [j for s in symbols for j in ([vocab[s]] if s in vocab else
                                         [vocab[f"<0x{b:02X}>"] for b in s.encode()])]


# Merge order matters for the middle two (merging leftmost first gives other tokens); the last
# has characters outside the vocabulary (byte fallback).
TEXTS = ["is this bike still available? can you do 50 dollars", "what condition is the table in",
         "any scratches or stains on the sofa", "hello  world\n0123 !?", "caf\u00e9 \u00b1 \u4e16"]


@pytest.mark.parametrize("model_type,shape", [("gemma2", "gemma"), ("phi3", "llama")])
def test_sentencepiece_vocabulary_reads_back_in_transformers_and_llama_cpp(model_type, shape, tmp_path):
    from transformers import AutoTokenizer

    tok = sentencepiece_tokenizer(shape)
    base = _base(model_type, tmp_path / "base", tokenizer=tok)
    adapter, _ = _adapter(base, tmp_path / "adapter")
    out = export(str(base), adapter, tmp_path / "m.gguf", fmt="gguf", outtype="f32").path
    value = {k: f.contents() for k, f in gguf.GGUFReader(str(out)).fields.items() if k.startswith("tokenizer")}
    assert value["tokenizer.ggml.model"] == "llama" and value["tokenizer.ggml.pre"] == "default"
    prefix = value["tokenizer.ggml.add_space_prefix"]
    assert prefix is (shape == "llama")  # Gemma's normalizer puts no ▁ in front; Llama 2's does
    assert value["tokenizer.ggml.add_bos_token"] is True and value["tokenizer.ggml.bos_token_id"] == 2
    tokens, types = value["tokenizer.ggml.tokens"], value["tokenizer.ggml.token_type"]
    kind = gguf.TokenType
    assert types[tok.unk_token_id] == kind.UNKNOWN and types[tok.convert_tokens_to_ids("<0x41>")] == kind.BYTE
    assert sum(t == kind.NORMAL for t in types) == len(tok) - len(tok.added_tokens_decoder) - 256
    for text in TEXTS:
        want = tok(text, add_special_tokens=False)["input_ids"]
        assert llama_cpp_spm(text, tokens, value["tokenizer.ggml.scores"], prefix) == want, text

    back = AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    for text in TEXTS:
        assert back(text)["input_ids"] == tok(text)["input_ids"], text
    if shape == "gemma":
        assert types[tok.convert_tokens_to_ids("<end_of_turn>")] == kind.CONTROL
        text = "<start_of_turn>user\nwhat colour is it<end_of_turn>"
        assert back(text)["input_ids"] == tok(text)["input_ids"]
        assert back.chat_template == _GEMMA_TEMPLATE
