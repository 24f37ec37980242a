"""`lorakit export`: GGUF files that transformers' GGUF loader and gguf.GGUFReader read back right.

The merged model is checked through transformers' own GGUF loader (which undoes llama.cpp's q/k
permutation and dequantizes), the LoRA file by rebuilding alpha / r * B A from it the way
llama.cpp scales it, and comparing with the adapter's own scaling_for(module) * B A.
"""

import copy

import numpy as np
import pytest
import torch

from lorakit.adapters import load_adapter, read_adapter, save_adapter
from lorakit.adapters.export_gguf import ExportError, export
from lorakit.errors import StorageError
from lorakit.lora import LoraConfig, inject, merge_and_unload
from lorakit.models import load_base
from tests import tiny
from tests.lora.test_layer import randomize_b

gguf = pytest.importorskip("gguf")

PLAIN = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
RSLORA = dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True)
PATTERNS = dict(r=4, lora_alpha=8, target_modules="all-linear",
                rank_pattern={"q_proj": 8, "down_proj": 2}, alpha_pattern={"k_proj": 32, "up_proj": 3})
ADAPTERS = {"plain": PLAIN, "rslora": RSLORA, "patterns": PATTERNS}


def ids(seed=0):
    return torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def base_dir(tmp_path):
    return _base_dir(tmp_path / "base", tie=False)


def _base_dir(path, tie=False, make=tiny.tiny_llama):
    model = make(tie=tie) if make is tiny.tiny_llama else make()
    model.save_pretrained(path)
    tiny.tiny_tokenizer().save_pretrained(path)
    return path


def _adapter(base, out, **kw):
    """An adapter trained on `base` in name only: injected, B randomised so it matters, saved."""
    model, _ = load_base(base)
    cfg = LoraConfig(**kw)
    inject(model, cfg)
    randomize_b(model)
    return save_adapter(model, cfg, out)


def _merged(base, adapter):
    model, tokenizer = load_base(base)
    load_adapter(model, adapter)
    return merge_and_unload(model), tokenizer


def _load_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


def _rounded(model, fn):
    """A copy with every 2-D weight passed through `fn` (as the file stores it); vectors kept."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 2:
                p.copy_(fn(p))
    return ref


def _q8_0_round_trip(w):
    q8 = gguf.GGMLQuantizationType.Q8_0
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), q8), q8))


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


ROUNDING = {
    "f32": lambda w: w,
    "f16": lambda w: w.half().float(),
    "bf16": lambda w: w.bfloat16().float(),
    "q8_0": _q8_0_round_trip,
}


# Unit roundoff of each file type: the largest relative error of one stored weight (q8_0: relative
# to the largest |w| of its 32-weight block, whose scale d = max/127 is itself stored in f16).
UNIT_ROUNDOFF = {"f32": 0.0, "f16": 2.0 ** -11, "bf16": 2.0 ** -8, "q8_0": 2.0 ** -8}


def _within_rounding(got, want, outtype):
    """|got - want| within what storing `want` as `outtype` can change, weight by weight."""
    if outtype == "q8_0":
        d = want.reshape(want.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 127  # block scale
        # round-to-nearest gives d/2; storing d in f16 adds at most 127 * d * 2^-11.
        bound = (d * (0.5 + 127 * 2.0 ** -11)).expand(-1, -1, 32).reshape(want.shape)
    else:
        bound = UNIT_ROUNDOFF[outtype] * want.abs() + 2.0 ** -24  # 2^-24: f16's smallest step
    return bool(((got - want).abs() <= bound).all())


@pytest.mark.parametrize("outtype, tie", [("f32", False), ("f16", False), ("f16", True),
                                          ("bf16", False), ("q8_0", False), ("q8_0", True)])
def test_merged_gguf_loads_in_transformers_with_the_merged_logits(tmp_path, outtype, tie):
    base = _base_dir(tmp_path / "base", tie=tie)
    adapter = _adapter(base, tmp_path / "adapter", **PLAIN)
    merged, _ = _merged(base, adapter)
    x = ids()
    want = _logits(merged, x)
    assert not torch.allclose(want, _logits(load_base(base)[0], x), atol=0.1), \
        "the adapter must change the output"

    out = tmp_path / f"merged-{outtype}.gguf"
    result = export(str(base), adapter, out, fmt="gguf", outtype=outtype)
    assert result.path == out and result.bytes == out.stat().st_size
    loaded = _load_gguf(out)
    got = _logits(loaded, x)

    # 1. Exact: the merged model with its 2-D weights rounded as the file stores them (vectors stay
    # f32, as in the file) gives the same logits up to fp32 summation order, hence atol 1e-5 on
    # logits of size ~1. This checks names, q/k permutation, hyperparameters and tying.
    reference = _logits(_rounded(merged, ROUNDING[outtype]), x)
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)
    # 2. Every weight transformers read back (q/k un-permuted by its loader) is the merged weight
    # up to the file type's own rounding.
    merged_state = merged.state_dict()
    for name, w in loaded.state_dict().items():
        assert _within_rounding(w, merged_state[name], outtype if w.dim() == 2 else "f32"), name
    # 3. Against the unrounded fp32 merge. Each weight is off by at most u (the unit roundoff above)
    # relatively; two layers amplify that a few times (2-10x measured), so the logits must stay
    # within 16u in relative norm: f16 ~0.8%, bf16 and q8_0 ~6%. A wrong layout is off by ~100%.
    drift = ((got - want).norm() / want.norm()).item()
    assert drift <= 16 * UNIT_ROUNDOFF[outtype] + 1e-6, f"{outtype}: relative drift {drift:.3g}"

    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert ("output.weight" in types) == (not tie)
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    want_2d = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[outtype]
    assert types["blk.1.ffn_down.weight"] == want_2d and types["token_embd.weight"] == want_2d
    assert len(types) == result.tensors == 2 * 9 + 2 + (not tie)


@pytest.mark.parametrize("kind", ["rslora", "patterns"])
def test_merged_gguf_of_per_module_adapters_is_exact_in_f32(tmp_path, base_dir, kind):
    adapter = _adapter(base_dir, tmp_path / "adapter", **ADAPTERS[kind])
    merged, _ = _merged(base_dir, adapter)
    out = export(str(base_dir), adapter, tmp_path / "m.gguf", outtype="f32").path
    x = ids(1)
    torch.testing.assert_close(_logits(_load_gguf(out), x), _logits(merged, x), atol=1e-5, rtol=0)


def test_merged_gguf_metadata_and_tokenizer(tmp_path, base_dir):
    from transformers import AutoTokenizer

    adapter = _adapter(base_dir, tmp_path / "adapter", **PLAIN)
    out = export(str(base_dir), adapter, tmp_path / "m.gguf").path  # default f16
    fields = gguf.GGUFReader(str(out)).fields
    value = {k: f.contents() for k, f in fields.items() if not k.startswith("GGUF.")}
    cfg = load_base(base_dir)[0].config
    assert value["general.architecture"] == "llama" and value["general.type"] == "model"
    assert value["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert value["llama.context_length"] == 256 and value["llama.embedding_length"] == 64
    assert value["llama.block_count"] == 2 and value["llama.feed_forward_length"] == 128
    assert value["llama.attention.head_count"] == 4 and value["llama.attention.head_count_kv"] == 2
    assert value["llama.rope.dimension_count"] == 16 and value["llama.vocab_size"] == 400
    assert value["llama.rope.freq_base"] == pytest.approx(cfg.rope_parameters["rope_theta"])
    assert value["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert value["tokenizer.ggml.model"] == "gpt2" and value["tokenizer.ggml.pre"] == "gpt-2"

    tok = tiny.tiny_tokenizer()
    assert len(value["tokenizer.ggml.tokens"]) == 400
    assert value["tokenizer.ggml.tokens"][tok.eos_token_id] == "<|im_end|>"
    assert value["tokenizer.ggml.token_type"][tok.eos_token_id] == gguf.TokenType.CONTROL
    assert value["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert value["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert "tokenizer.ggml.bos_token_id" not in value  # the tiny tokenizer has none
    assert value["tokenizer.ggml.add_bos_token"] is False
    assert value["tokenizer.chat_template"] == tiny.CHATML_TEMPLATE

    # transformers rebuilds the same tokenizer from the file alone.
    back = AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    for text in ["is this bike still available? can you do 50 dollars", "hello  world\n0123 !?",
                 "<|im_start|>user\nwhat colour is it<|im_end|>"]:
        assert back(text)["input_ids"] == tok(text)["input_ids"], text
    assert back.eos_token == "<|im_end|>" and back.pad_token == "<|endoftext|>"
    assert back.chat_template == tiny.CHATML_TEMPLATE


def _reverse_qk(gguf_name, w, config):
    """transformers' own inverse of llama.cpp's permutation, as its GGUF loader applies it."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor(config={"num_attention_heads": config.num_attention_heads,
                                             "num_key_value_heads": config.num_key_value_heads})
    return processor.process(w, gguf_name).weights


@pytest.mark.parametrize("kind", ["plain", "rslora", "patterns"])
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_gguf_lora_rebuilds_every_module_delta(tmp_path, base_dir, kind, outtype):
    kw = ADAPTERS[kind]
    adapter = _adapter(base_dir, tmp_path / "adapter", **kw)
    files = read_adapter(adapter)
    cfg = files.config
    config = load_base(base_dir)[0].config
    out = export(str(base_dir), adapter, tmp_path / "lora.gguf", fmt="gguf-lora", outtype=outtype).path

    reader = gguf.GGUFReader(str(out))
    fields = reader.fields
    assert fields["general.type"].contents() == "adapter"
    assert fields["general.architecture"].contents() == "llama"
    assert fields["adapter.type"].contents() == "lora"
    assert fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    alpha = fields["adapter.lora.alpha"].contents()
    assert alpha == cfg.lora_alpha
    tensors = {t.name: t for t in reader.tensors}

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    expected = set()
    for module in files.modules():
        gg = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        expected |= {f"{gg}.lora_a", f"{gg}.lora_b"}
        ta, tb = tensors[f"{gg}.lora_a"], tensors[f"{gg}.lora_b"]
        a0 = files.tensors[f"base_model.model.{module}.lora_A.weight"]  # (r, d_in)
        b0 = files.tensors[f"base_model.model.{module}.lora_B.weight"]  # (d_out, r)
        r = cfg.r_for(module)
        # GGUF lists dimensions innermost first: torch (r, d_in) is ne (d_in, r).
        assert [int(n) for n in ta.shape] == [a0.shape[1], r]
        assert [int(n) for n in tb.shape] == [r, b0.shape[0]]
        assert ta.tensor_type.name == tb.tensor_type.name == outtype.upper()
        a = gguf.quants.dequantize(ta.data, ta.tensor_type).reshape(r, -1)  # (r, d_in)
        b = gguf.quants.dequantize(tb.data, tb.tensor_type).reshape(-1, r)  # (d_out, r)
        # llama.cpp: scale = alpha / (rank read from the B tensor), delta = scale * B A.
        delta = alpha / tb.shape[0] * (b.astype(np.float64) @ a.astype(np.float64))  # (d_out, d_in)
        delta = _reverse_qk(gg, delta, config)
        want = cfg.scaling_for(module) * (b0.double() @ a0.double()).numpy()
        tol = 1e-6 if outtype == "f32" else 2e-3  # f16: two factors, each rounded to 2^-11
        np.testing.assert_allclose(delta, want, atol=tol * np.abs(want).max(), rtol=0, err_msg=module)
    assert set(tensors) == expected
    if kind == "plain" and outtype == "f32":
        # Nothing to fold: A and the non-q/k B go out bit for bit, as llama.cpp's converter writes them.
        v_b = files.tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
        assert np.array_equal(tensors["blk.0.attn_v.weight.lora_b"].data, v_b.numpy())


def test_gguf_lora_b_rows_of_q_and_k_are_permuted_like_the_base(tmp_path, base_dir):
    """Merging the file's delta into the exported base GGUF's q weight gives the exported merged q."""
    adapter = _adapter(base_dir, tmp_path / "adapter", **PLAIN)
    base_file = export(str(base_dir), adapter, tmp_path / "m.gguf", outtype="f32").path
    lora_file = export(str(base_dir), adapter, tmp_path / "l.gguf", fmt="gguf-lora").path
    base, _ = load_base(base_dir)
    from lorakit.adapters.export_gguf import to_gguf_layout

    merged = {t.name: t.data for t in gguf.GGUFReader(str(base_file)).tensors}
    lora = {t.name: t.data for t in gguf.GGUFReader(str(lora_file)).tensors}
    for hf, gg in (("model.layers.1.self_attn.q_proj.weight", "blk.1.attn_q.weight"),
                   ("model.layers.0.self_attn.k_proj.weight", "blk.0.attn_k.weight")):
        w = to_gguf_layout(hf, base.state_dict()[hf], base.config).numpy()
        b, a = lora[f"{gg}.lora_b"], lora[f"{gg}.lora_a"]
        np.testing.assert_allclose(w + 8 / 4 * (b @ a), merged[gg], atol=1e-5, rtol=0)


def test_gguf_lora_on_lm_head_goes_to_output_weight_unless_tied(tmp_path):
    kw = dict(r=4, lora_alpha=8, target_modules=["lm_head", "v_proj"])
    untied = _base_dir(tmp_path / "untied", tie=False)
    out = export(str(untied), _adapter(untied, tmp_path / "a1", **kw), tmp_path / "l.gguf",
                 fmt="gguf-lora").path
    shapes = {t.name: [int(n) for n in t.shape] for t in gguf.GGUFReader(str(out)).tensors}
    assert shapes["output.weight.lora_a"] == [64, 4] and shapes["output.weight.lora_b"] == [4, 400]
    # Tied, llama.cpp has no output.weight: its converter refuses such an adapter, and so do we.
    tied = _base_dir(tmp_path / "tied", tie=True)
    with pytest.raises(ExportError, match="adapts lm_head, but this base ties it"):
        export(str(tied), _adapter(tied, tmp_path / "a2", **kw), tmp_path / "t.gguf", fmt="gguf-lora")


# ---------------------------------------------------------------------------------------------
# Errors: one line, naming what was wrong, and nothing written
# ---------------------------------------------------------------------------------------------

def test_unsupported_architecture_is_refused(tmp_path):
    base = _base_dir(tmp_path / "gpt2", make=tiny.tiny_gpt2)
    adapter = _adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["c_attn"])
    for fmt in ("gguf", "gguf-lora"):
        with pytest.raises(ExportError, match="architecture GPT2LMHeadModel.*supported: LlamaForCausalLM"):
            export(str(base), adapter, tmp_path / "x.gguf", fmt=fmt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "gpt2"]


def test_dora_adapter_is_refused_for_gguf_lora_but_merges(tmp_path, base_dir):
    adapter = _adapter(base_dir, tmp_path / "dora", use_dora=True, **PLAIN)
    with pytest.raises(ExportError, match="DoRA.*--format gguf"):
        export(str(base_dir), adapter, tmp_path / "x.gguf", fmt="gguf-lora")
    assert not (tmp_path / "x.gguf").exists()
    # Merged, the magnitude is part of the weight, so a DoRA adapter exports fine that way.
    merged, _ = _merged(base_dir, adapter)
    out = export(str(base_dir), adapter, tmp_path / "m.gguf", outtype="f32").path
    torch.testing.assert_close(_logits(_load_gguf(out), ids()), _logits(merged, ids()), atol=1e-5, rtol=0)


def test_q8_0_is_refused_for_gguf_lora_before_anything_is_read(tmp_path):
    expected = "outtype 'q8_0' for format gguf-lora: expected one of f32, f16, bf16"
    with pytest.raises(ExportError, match=expected):
        export("no-such-model", tmp_path / "no-such-adapter", tmp_path / "x.gguf",
               fmt="gguf-lora", outtype="q8_0")
    with pytest.raises(ExportError, match="format 'ggml'"):
        export("no-such-model", tmp_path / "no-such-adapter", tmp_path / "x.gguf", fmt="ggml")


def test_output_path_errors(tmp_path, base_dir):
    adapter = _adapter(base_dir, tmp_path / "adapter", **PLAIN)
    with pytest.raises(ExportError, match=f"folder {tmp_path / 'missing'} does not exist"):
        export(str(base_dir), adapter, tmp_path / "missing" / "x.gguf")
    with pytest.raises(ExportError, match="is a directory"):
        export(str(base_dir), adapter, tmp_path)
    assert not (tmp_path / "missing").exists()


def test_existing_file_is_replaced_atomically_and_kept_on_failure(tmp_path, base_dir, monkeypatch):
    adapter = _adapter(base_dir, tmp_path / "adapter", **PLAIN)
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    out.write_bytes(b"old contents")
    export(str(base_dir), adapter, out, outtype="f32")
    assert out.read_bytes()[:4] == b"GGUF"
    first = out.read_bytes()

    # The disk fills up half-way through the tensors (a fault injected into gguf's writer):
    # the previous file stays whole and no temporary file is left behind.
    def full_disk(self, *args, **kwargs):
        self.fout[0].write(b"partial tensor data")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    with pytest.raises(StorageError) as info:
        export(str(base_dir), adapter, out, outtype="f16")
    assert str(info.value) == (f"{out}: cannot write (no space left on the device); expected a "
                               "writable folder with free space")
    assert out.read_bytes() == first
    assert [p.name for p in out.parent.iterdir()] == ["model.gguf"]


def test_pre_tokenizer_names():
    from lorakit.adapters.gguf_writer import _LLAMA3_SPLIT, infer_tokenizer_pre

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert infer_tokenizer_pre({"pre_tokenizer": byte_level}) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    smollm = {"type": "Sequence", "pretokenizers": [digits, byte_level]}
    assert infer_tokenizer_pre({"pre_tokenizer": smollm}) == "smollm"
    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        dict(byte_level, use_regex=False)]}
    assert infer_tokenizer_pre({"pre_tokenizer": llama3}) == "llama-bpe"
    # A prefix space changes the tokens: not plain GPT-2 any more.
    with pytest.raises(ExportError, match="no known llama.cpp name.*--tokenizer-pre"):
        infer_tokenizer_pre({"pre_tokenizer": dict(byte_level, add_prefix_space=True)})


def test_cli_export_and_its_errors(tmp_path, base_dir, capsys):
    from lorakit.cli import main

    adapter = _adapter(base_dir, tmp_path / "adapter", **PLAIN)
    out = tmp_path / "lora.gguf"
    argv = ["export", "--model", str(base_dir), "--adapter", str(adapter), "--format", "gguf-lora",
            "--out", str(out)]
    assert main(argv) == 0
    assert f"LoRA adapter written to {out} (f32, 16 tensors" in capsys.readouterr().out
    assert gguf.GGUFReader(str(out)).fields["adapter.type"].contents() == "lora"
    assert main([*argv, "--outtype", "q8_0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorakit export: error: outtype 'q8_0' for format gguf-lora") and "\n" not in err
