"""Every family in `lorakit.models.families`, end to end, on a tiny model built in code.

One matrix, parametrized by `model_type`: a training step lowers the loss and leaves the base
bit-identical; our adapter loads in PEFT with the same logits and PEFT's loads in ours (1e-5,
fp32); merged equals unmerged; padding-free packing gives the padded batch's loss and gradients,
or the family is refused for packing with the reason; a mixed batch of 3 adapters in the serving
engine equals each adapter merged and run alone; `calc` counts equal `numel()`.

The tiny configs keep what breaks naive code: Gemma's scaled embeddings, tied head, attention and
final-logit soft-capping, a sliding-window layer (window 8, shorter than the prompts) and
`(1 + w)` RMSNorm (norm weights moved off their init so the `1 +` matters); Phi-3's fused
`qkv_proj` / `gate_up_proj`, which lorakit adapts whole as PEFT does; GPT-2's `Conv1D`.
"""

import copy
import functools

import pytest
import torch

from lorakit.adapters import load_adapter, save_adapter
from lorakit.calc.params import param_table, shape_from_config
from lorakit.data.collate import pad_batch
from lorakit.data.render import IGNORE, Encoded
from lorakit.lora import LoraConfig, inject, lora_layers, merge, unmerge
from lorakit.lora.inject import adapter_parameters, target_names
from lorakit.models.families import FAMILIES, family_of, refusal
from lorakit.train.loss import causal_lm_loss_sum, packed_loss_sum
from lorakit.train.packing import pack_batch, packed_attention_mode, packing_supported
from tests import tiny
from tests.lora.test_layer import randomize_b

peft = pytest.importorskip("peft")

TYPES = list(FAMILIES)
_COMMON = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               pad_token_id=0, bos_token_id=0, eos_token_id=0)
_GEMMA = dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
              layer_types=["sliding_attention", "full_attention"])


@functools.lru_cache(maxsize=None)
def _built(model_type: str):
    import transformers as T

    if model_type == "llama":
        return tiny.tiny_llama()
    if model_type == "gpt2":  # tests/tiny.py's GPT-2 without dropout
        torch.manual_seed(0)
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=400, n_embd=64, n_layer=2, n_head=4,
                                              n_positions=256, bos_token_id=0, eos_token_id=0,
                                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    config_class, model_class, extra = {
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {}),
        "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(head_dim=128)),
        "mistral": (T.MistralConfig, T.MistralForCausalLM, dict(sliding_window=None)),
        "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM,
                   dict(_GEMMA, attn_logit_softcapping=50.0, final_logit_softcapping=5.0)),
        "gemma3_text": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, _GEMMA),
        "phi3": (T.Phi3Config, T.Phi3ForCausalLM, {}),
    }[model_type]
    torch.manual_seed(0)
    model = model_class(config_class(**_COMMON, **extra))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norms off their init (Gemma's weights start at 0 for its 1 + w)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def tiny_family(model_type: str):
    """A fresh 2-layer model of the family (hidden 64), fp32, eval mode."""
    return copy.deepcopy(_built(model_type))


def ids(seed=0, n=16):
    return torch.randint(1, 400, (2, n), generator=torch.Generator().manual_seed(seed))


def targets(model_type: str) -> list[str]:
    """The family's `all-linear` as the leaf names the table lists."""
    return list(dict.fromkeys(FAMILIES[model_type].all_linear))


def examples(lengths=(5, 11, 3, 17, 8), seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        row = torch.randint(1, 400, (n,), generator=g).tolist()
        out.append(Encoded(row, [IGNORE] * (n // 2) + row[n // 2:]))
    return out


def test_table_matches_the_models_linears():
    """all-linear as inject resolves it equals the table's attention + MLP leaves, and the presets
    name real modules."""
    for model_type in TYPES:
        model = tiny_family(model_type)
        fam = family_of(model)
        assert fam is FAMILIES[model_type]
        chosen = target_names(model, LoraConfig(target_modules="all-linear"))
        assert {n.rsplit(".", 1)[-1] for n in chosen} == set(fam.all_linear), model_type
        assert all(n.startswith(fam.block_path + ".") for n in chosen), model_type
        for preset in ("attention", "mlp"):
            assert target_names(model, LoraConfig(target_modules=fam.targets(preset)))


@pytest.mark.parametrize("model_type", TYPES)
def test_training_step_lowers_loss_and_keeps_base(model_type):
    model = tiny_family(model_type)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    rows = examples()
    batch = pad_batch(rows, pad_id=0)
    opt = torch.optim.AdamW(adapter_parameters(model), lr=1e-2)

    def loss():
        total, n = causal_lm_loss_sum(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
        return total / n

    with torch.no_grad():
        before = float(loss())
    model.train()
    for _ in range(3):
        opt.zero_grad()
        loss().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = float(loss())
    assert after < before - 1e-3, (before, after)
    now = model.state_dict()
    for k, v in base.items():
        # a wrapped module's weight moves under `.base.` but keeps its bits
        key = k if k in now else k.rsplit(".", 1)[0] + ".base." + k.rsplit(".", 1)[1]
        assert torch.equal(now[key], v), (model_type, k)


@pytest.mark.parametrize("model_type", TYPES)
def test_adapter_round_trips_with_peft(model_type, tmp_path):
    from peft import LoraConfig as PeftLoraConfig, PeftModel, get_peft_model

    x = ids()
    kw = dict(r=4, lora_alpha=8, target_modules=targets(model_type))
    model = tiny_family(model_type)
    with torch.no_grad():
        base_logits = model(x).logits
    inject(model, LoraConfig(**kw))
    randomize_b(model, scale=0.3)
    with torch.no_grad():
        ours = model(x).logits
    assert not torch.allclose(ours, base_logits, atol=1e-3), "the adapter must change the output"
    save_adapter(model, LoraConfig(**kw), tmp_path / "ours")
    theirs_model = PeftModel.from_pretrained(tiny_family(model_type), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs_model(x).logits, ours, atol=1e-5, rtol=0)

    torch.manual_seed(3)  # init_lora_weights=False: PEFT leaves B random, so the adapter matters
    pm = get_peft_model(tiny_family(model_type), PeftLoraConfig(init_lora_weights=False, **kw)).eval()
    with torch.no_grad():
        theirs = pm(x).logits
    pm.save_pretrained(str(tmp_path / "peft"))
    back = tiny_family(model_type)
    load_adapter(back, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, theirs, atol=1e-5, rtol=0)
    # Fused layers are adapted whole: one A and one B over the fused output, as in PEFT.
    fused = FAMILIES[model_type].fused
    assert not fused or any(name.endswith(fused) for name, _ in lora_layers(back))


@pytest.mark.parametrize("model_type", TYPES)
def test_merged_equals_unmerged(model_type):
    x = ids(2)
    model = tiny_family(model_type)
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_b(model, scale=0.3)
    with torch.no_grad():
        unmerged = model(x).logits
        merge(model)
        merged = model(x).logits
        unmerge(model)
        again = model(x).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("inner", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", TYPES)
def test_packing_equals_padded_or_is_refused(model_type, inner):
    model = tiny_family(model_type)
    why = packing_supported(model)
    if FAMILIES[model_type].packing:
        assert why is not None and FAMILIES[model_type].packing in why and repr(model_type) in why
        return
    assert why is None
    assert_packed_equals_padded(model, inner)


def assert_packed_equals_padded(model, inner):
    """Loss and every LoRA gradient of the packed row equal the padded batch's."""
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_b(model, scale=0.1)
    model.set_attn_implementation("eager")  # the reference: transformers' own masks
    rows = examples()

    def loss_and_grads(fn):
        model.zero_grad()
        total, n = fn()
        total.backward()
        return float(total.detach()), n, {k: p.grad.clone() for k, p in model.named_parameters()
                                 if p.grad is not None}

    padded = pad_batch(rows, pad_id=0)
    ref = loss_and_grads(lambda: causal_lm_loss_sum(model, padded["input_ids"], padded["labels"],
                                                    padded["attention_mask"]))
    with packed_attention_mode(model):
        got = loss_and_grads(lambda: packed_loss_sum(model, pack_batch(rows, inner)))
    assert got[1] == ref[1]
    assert got[0] == pytest.approx(ref[0], rel=1e-5)
    assert got[2].keys() == ref[2].keys() and ref[2]
    for k in ref[2]:
        torch.testing.assert_close(got[2][k], ref[2][k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("inner", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", ["mistral", "phi3", "qwen2"])
def test_packing_honours_a_configured_sliding_window(model_type, inner):
    """Mistral v0.1 and some Phi-3 configs set a window, Qwen2 with use_sliding_window; a window
    of 4, shorter than the examples, packs to the padded batch's loss and gradients."""
    import transformers as T

    config_class, model_class = {"mistral": (T.MistralConfig, T.MistralForCausalLM),
                                 "phi3": (T.Phi3Config, T.Phi3ForCausalLM),
                                 "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM)}[model_type]
    extra = dict(use_sliding_window=True, max_window_layers=0) if model_type == "qwen2" else {}
    torch.manual_seed(0)
    model = model_class(config_class(**_COMMON, sliding_window=4, **extra)).eval()
    assert packing_supported(model) is None
    full = type(model)(type(model.config)(**_COMMON, **extra)).eval()  # same weights, no window
    full.load_state_dict(model.state_dict())
    with torch.no_grad():  # the window matters: the last position differs from full attention
        x = ids(4)
        assert not torch.allclose(model(x).logits[:, -1], full(x).logits[:, -1], atol=1e-4)
    assert_packed_equals_padded(model, inner)


def test_packing_refuses_attention_dropout():
    """GPT-2 defaults to attention dropout 0.1: refused up front with the setting named (the
    packed attention has no dropout and would stop at the first training step)."""
    assert "attn_pdrop=0.1" in packing_supported(tiny.tiny_gpt2())
    assert "attention_dropout=0.1" in refusal({"model_type": "llama", "attention_dropout": 0.1},
                                              "packing")
    assert "not in lorakit's family table" in refusal({"model_type": "falcon"}, "packing")


@pytest.mark.parametrize("model_type", TYPES)
def test_mixed_adapter_batch_equals_each_adapter_merged(model_type, tmp_path):
    from lorakit.serve.engine import Request
    from tests.serve.builders import greedy, greedy_reference, make_adapter, merged_model, run_all, served

    base = tiny_family(model_type)
    tokenizer = tiny.tiny_tokenizer()
    leaves = targets(model_type)
    dirs = {f"a{i}": make_adapter(base, tmp_path / f"a{i}", seed=10 + i, r=2 + i, targets=leaves,
                                  b_std=0.3) for i in range(3)}
    engine, _, registry = served(base, tokenizer, tmp_path, targets=leaves)
    for name, d in dirs.items():
        registry.add(name, d)
    n = 6
    prompts = [tokenizer(p)["input_ids"] for p in ("is this bike still available? can you do 50",
                                                   "what colour is it and how big is the table")]
    assert all(len(p) > 8 for p in prompts)  # past Gemma's sliding window of 8
    adapters = [None, "a0", "a1", "a2"]
    reqs = [engine.submit(Request(p, a, greedy(n))) for p in prompts for a in adapters]
    run_all(engine, reqs)
    merged = {a: merged_model(base, dirs[a] if a else None) for a in adapters}
    for r in reqs:
        assert r.output_ids == greedy_reference(merged[r.adapter], r.prompt_ids, n), (r.adapter,)
    assert len({tuple(r.output_ids) for r in reqs}) > len(prompts)  # adapters change answers


@pytest.mark.parametrize("model_type", TYPES)
def test_calc_counts_equal_numel(model_type):
    model = tiny_family(model_type)
    shape = shape_from_config(model.config.to_dict(), source=model_type)
    assert param_table(shape) == {n: p.numel() for n, p in model.named_parameters()}


@pytest.mark.parametrize("model_type", ["mistral", "gemma2"])
def test_info_prints_family_and_features(model_type, tmp_path, capsys):
    """`lorakit info --model DIR`: the family, its chat template, and per feature yes or why not."""
    from lorakit.cli import main

    model = tiny_family(model_type)
    model.save_pretrained(str(tmp_path / "m"))
    tiny.tiny_tokenizer().save_pretrained(str(tmp_path / "m"))
    assert main(["info", "--model", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    fam = FAMILIES[model_type]
    # The tiny tokenizer's own template is ChatML, whatever the family's usual one is.
    assert f"family: {fam.label} (model_type {model_type!r}), chat template: the tokenizer's, " \
        "end of turn: <|im_end|>" in out
    assert "  lora: yes" in out
    assert "target modules: attention = q_proj,k_proj,v_proj,o_proj; mlp = " in out
    packing = "  packing: yes" if fam.packing is None else f"  packing: model_type {model_type!r}"
    assert packing in out
    gguf = "  gguf: yes" if fam.gguf_arch else f"  gguf: model_type {model_type!r} ({fam.label}): "
    assert gguf in out
    assert main(["info", "--model", str(tmp_path / "m"), "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["family"] == fam.label and report["features"]["calc"] == "yes"


@pytest.mark.parametrize("model_type", TYPES)
def test_lean_ops_take_exactly_the_table_classes_with_the_same_loss_and_gradients(model_type):
    from lorakit.train.lean_ops import lean_modules, lean_targets

    model = tiny_family(model_type)
    fam = FAMILIES[model_type]
    found, skipped = lean_targets(model)
    assert skipped == []  # each class the table names passes the per-class forward check
    assert {type(m).__name__ for m, _ in found} == {c for c in (fam.lean_rms_norm, fam.lean_gated_mlp) if c}
    assert (refusal(model, "lean_ops") is None) == bool(found)
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_b(model, scale=0.1)
    batch = pad_batch(examples(), pad_id=0)

    def loss_and_grads():
        model.zero_grad()
        total, _ = causal_lm_loss_sum(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
        total.backward()
        return float(total.detach()), {k: p.grad.clone() for k, p in model.named_parameters()
                                       if p.grad is not None}

    plain = loss_and_grads()
    with lean_modules(model) as n:
        lean = loss_and_grads()
    assert n == len(found)
    assert lean[0] == pytest.approx(plain[0], rel=1e-6)
    for k in plain[1]:
        torch.testing.assert_close(lean[1][k], plain[1][k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("model_type", TYPES)
def test_lorakit_train_runs_for_every_family(model_type, tmp_path, capsys):
    """`lorakit train` on a saved folder of the family: the adapter is written, and padding-free
    training is used or refused with the table's reason."""
    import json

    import yaml

    from lorakit.cli import main
    from tests.train.test_loop import write_toy_data

    tiny_family(model_type).save_pretrained(tmp_path / "base")
    tiny.tiny_tokenizer().save_pretrained(tmp_path / "base")
    run = {"model": {"name": str(tmp_path / "base"), "dtype": "fp32", "device": "cpu"},
           "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
           "data": {"train": str(write_toy_data(tmp_path / "toy.jsonl")), "max_seq_len": 64},
           "train": {"output_dir": str(tmp_path / "run"), "batch_size": 4, "max_steps": 2}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps lines
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["target_modules"] == "all-linear" or set(saved["target_modules"]) == set(targets(model_type))
    fam = FAMILIES[model_type]
    assert ("padded micro-batches" in out) == (fam.packing is not None)
    if fam.packing:
        assert fam.packing in out


def test_a_family_outside_the_table_is_refused_up_front_with_the_reason():
    from lorakit.errors import ModelLoadError
    from lorakit.models.families import FEATURES, UnsupportedFamilyError, require

    cfg = {"model_type": "falcon", "hidden_size": 64}
    verdicts = {feature: refusal(cfg, feature) for feature in FEATURES}
    assert verdicts.pop("lora") is None  # plain LoRA needs only linear layers
    for feature, why in verdicts.items():
        assert why == ("model_type 'falcon' is not in lorakit's family table (llama, qwen2, qwen3, "
                       "mistral, gemma2, gemma3_text, phi3, gpt2)"), feature
    with pytest.raises(UnsupportedFamilyError, match="model_type 'falcon': GGUF export needs a model "
                       "family lorakit knows"):
        require(cfg, "GGUF export")
    with pytest.raises(ModelLoadError, match="model_type 'falcon' is not one calc can size"):
        shape_from_config(cfg)
