"""The full and freeze baselines on tiny models: what changes, what is saved, exact resume, eval."""

import json

import pytest
import torch

from lorakit.config import build_config
from lorakit.errors import ConfigError
from lorakit.train.loop import train
from lorakit.train.methods import TRAINABLE_DIR, TRAINABLE_FILE, decoder_blocks
from tests import tiny
from tests.train.test_loop import leave_as_crashed_after
from tests.train.test_loop import config


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


def test_full_changes_every_parameter_and_the_loss_goes_down(tmp_path):
    model = tiny.tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = config(tmp_path, method="full", max_steps=30, eval_every=15, lr=3e-3)
    result = train(cfg, model=model, tokenizer=tiny.tiny_tokenizer(), progress=False)
    losses, vals = _losses(tmp_path / "run")
    assert len(losses) == 30 and len(vals) == 2
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert vals[-1] < vals[0]
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not change"
    assert result.trainable_params == result.total_params == sum(p.numel() for p in before.values())
    assert result.method == "full"
    assert result.adapter_dir == tmp_path / "run" / "model"
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.parametrize("make, blocks_name", [(tiny.tiny_llama, "model.layers"),
                                               (tiny.tiny_gpt2, "transformer.h")])
def test_freeze_changes_only_the_last_blocks(tmp_path, make, blocks_name):
    model = make()
    name, blocks = decoder_blocks(model)
    assert name == blocks_name and len(blocks) == 2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = config(tmp_path, method="freeze", layers_to_train=1, max_steps=10, lr=1e-3)
    result = train(cfg, model=model, tokenizer=tiny.tiny_tokenizer(), progress=False)
    trained = f"{blocks_name}.1."
    changed = sorted(n for n, p in model.named_parameters() if not torch.equal(p, before[n]))
    assert changed == sorted(n for n in before if n.startswith(trained))  # every one of them, no other
    assert result.trainable_params == sum(p.numel() for n, p in before.items() if n.startswith(trained))
    # Embeddings, final norm and head are among the untouched ones.
    assert any("embed" in n or "wte" in n for n in before if n not in changed)


def test_saved_model_directory_loads_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny.tiny_llama()
    cfg = config(tmp_path, method="full", max_steps=5, lr=1e-3)
    result = train(cfg, model=model, tokenizer=tiny.tiny_tokenizer(), progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(result.adapter_dir, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(result.adapter_dir)
    ids = torch.tensor([tokenizer("the bike is red 3 what colour")["input_ids"]])
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    base = tiny.tiny_llama()(input_ids=ids).logits
    assert torch.equal(got, want)
    assert not torch.allclose(got, base, atol=1e-3)  # the saved weights are the trained ones


def test_resume_of_a_freeze_run_is_bitwise_identical(tmp_path):
    from safetensors.torch import load_file

    kw = dict(method="freeze", layers_to_train=1, max_steps=10, grad_accum=2, save_every=3,
              keep_checkpoints=5, lr=1e-3)
    (tmp_path / "a").mkdir()
    full = train(config(tmp_path / "a", **kw), model=tiny.tiny_llama(), tokenizer=tiny.tiny_tokenizer(),
                 progress=False)
    (tmp_path / "b").mkdir()
    cfg_b = config(tmp_path / "b", **kw)
    train(cfg_b, model=tiny.tiny_llama(), tokenizer=tiny.tiny_tokenizer(), progress=False)
    run_b = tmp_path / "b" / "run"
    saved = load_file(str(run_b / "checkpoints" / "step-00000003" / TRAINABLE_DIR / TRAINABLE_FILE))
    assert sorted(saved) == sorted(n for n, _ in tiny.tiny_llama().named_parameters()
                                   if n.startswith("model.layers.1."))
    leave_as_crashed_after(run_b, step=3, output="model")
    resumed = train(cfg_b, resume=True, model=tiny.tiny_llama(), tokenizer=tiny.tiny_tokenizer(),
                    progress=False)
    a = load_file(str(full.adapter_dir / "model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.steps == full.steps == 10
    assert _losses(run_b) == _losses(tmp_path / "a" / "run")


def test_evaluation_of_a_full_run_compares_with_a_fresh_base(tmp_path):
    from lorakit.data.formats import load_examples
    from lorakit.eval.run import evaluate
    from lorakit.eval.study import evaluate_run

    base_dir = tmp_path / "base"
    tiny.tiny_llama().save_pretrained(base_dir)
    tiny.tiny_tokenizer().save_pretrained(base_dir)
    cfg = config(tmp_path, method="full", max_steps=20, lr=1e-2)
    cfg.model.name = str(base_dir)
    cfg.eval.data = str(tmp_path / "toy.jsonl")
    cfg.eval.max_examples = 10
    result = train(cfg, progress=False)  # loads the base from cfg.model, as the CLI does
    report = evaluate_run(cfg, result.adapter_dir)
    examples = load_examples(cfg.eval.data)[:10]
    base_alone = evaluate(tiny.tiny_llama(), tiny.tiny_tokenizer(), examples, progress=False)
    assert report["base"]["loss"] == pytest.approx(base_alone["loss"], rel=1e-5)
    assert report["adapter"]["loss"] < 0.5 * report["base"]["loss"]
    assert (tmp_path / "run" / "eval" / "report.md").exists()


def test_bad_method_and_layers_to_train_are_listed_together(tmp_path):
    raw = {"data": {"train": "x.jsonl"}, "train": {"method": "adapters", "layers_to_train": 0}}
    with pytest.raises(ConfigError) as e:
        build_config(raw)
    msg = str(e.value)
    assert "train.method: got 'adapters' (expected one of lora, full, freeze)" in msg
    assert "train.layers_to_train: got 0 (expected >= 1)" in msg


def test_freeze_more_layers_than_the_model_has_is_an_error(tmp_path):
    cfg = config(tmp_path, method="freeze", layers_to_train=3, max_steps=1)
    with pytest.raises(ConfigError, match="layers_to_train: got 3 but the model has 2"):
        train(cfg, model=tiny.tiny_llama(), tokenizer=tiny.tiny_tokenizer(), progress=False)
