"""Baselines beside the adapter: balanced few-shot draws, BM25 examples, one table for all."""

from collections import Counter

import pytest
import torch

from lorakit.data.formats import Example
from lorakit.data.render import encode_prompt
from lorakit.errors import ConfigError, LorakitError
from lorakit.eval.baselines import (Baseline, few_shot_demos, parse_baselines, prompted_rows,
                                    run_baselines, subset)
from lorakit.eval.classify import predict_labels_reference
from lorakit.eval.run import answer_of
from lorakit.eval.study import evaluate_model
from lorakit.lora import LoraConfig, inject, lora_layers, set_adapters_enabled

LABELS = ["availability", "condition", "price"]
INSTRUCTION = "Classify the message as one of: availability, condition, price."
TRAIN = [("is this bike still available?", "availability"), ("can you do 50 dollars", "price"),
         ("what condition is the sofa in", "condition"), ("any scratches or stains", "condition"),
         ("is it still available", "availability"), ("50 dollars?", "price"),
         ("what colour is it", "condition"), ("can you do 40", "price"),
         ("is the table still for sale", "availability"), ("would you take 30", "price")]
TEST = [("is the sofa still available", "availability"), ("can you do 45 for the bike", "price"),
        ("any stains on the sofa", "condition"), ("what condition is it in", "condition")]


def _rows(rows, system=INSTRUCTION, source="t.jsonl"):
    out = []
    for i, (text, label) in enumerate(rows):
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": text}, {"role": "assistant", "content": label}]
        out.append(Example(messages=tuple(msgs), line=i + 1, source=source, label=label))
    return out


def _demos_in(ex):
    """The demonstration answers of a prompted row: assistant turns before its final one."""
    return [m["content"] for m in ex.messages[:-1] if m["role"] == "assistant"]


def test_parse_baselines():
    assert parse_baselines("zero-shot, few-shot:5,retrieval:3") == [
        Baseline("zero-shot"), Baseline("few-shot", 5), Baseline("retrieval", 3)]
    assert [b.name for b in parse_baselines("few-shot:5")] == ["few-shot K=5"]
    assert parse_baselines("") == [] and parse_baselines(None) == []
    with pytest.raises(ConfigError) as e:
        parse_baselines("few-shot,retrieval:0,zero-shot:2,rag:3,few-shot:2,few-shot:2")
    msg = str(e.value)
    for part in ("'few-shot' (expected few-shot:K", "'retrieval:0'", "zero-shot takes no K",
                 "'rag:3'", "'few-shot:2' is listed twice"):
        assert part in msg


@pytest.mark.parametrize("k,want", [(6, [2, 2, 2]), (4, [1, 1, 2]), (2, [0, 1, 1]), (9, [3, 3, 3])])
def test_few_shot_prompt_holds_exactly_k_balanced_examples(k, want):
    train, test = _rows(TRAIN), _rows(TEST)
    rows = prompted_rows(Baseline("few-shot", k), test, train, seed=3)
    for ex, original in zip(rows, test):
        demos = _demos_in(ex)
        assert len(demos) == k
        assert sorted(Counter(demos).get(label, 0) for label in LABELS) == want
        assert ex.messages[0] == original.messages[0]  # the system message stays first
        assert ex.messages[-2:] == original.messages[-2:]  # the question and answer stay last
        assert len(ex.messages) == len(original.messages) + 2 * k
    assert _demos_in(rows[0]) == _demos_in(rows[-1])  # one draw for every row
    again = few_shot_demos(train, k, seed=3, classification=True)
    assert [d.line for d in again] == [d.line for d in few_shot_demos(train, k, 3, True)]
    with pytest.raises(LorakitError, match="only 10 training rows"):
        few_shot_demos(train, 11, 0, True)


def test_retrieval_puts_the_most_similar_training_rows_last(tmp_path):
    train, test = _rows(TRAIN), _rows(TEST)
    rows = prompted_rows(Baseline("retrieval", 2), test, train, index_path=tmp_path / "i.sqlite")
    users = [m["content"] for m in rows[1].messages if m["role"] == "user"]
    # "can you do 45 for the bike": "can you do 50 dollars" / "can you do 40" share three words.
    assert users[-1] == "can you do 45 for the bike"
    assert set(users[:2]) == {"can you do 50 dollars", "can you do 40"}
    assert (tmp_path / "i.sqlite").exists()
    rag = prompted_rows(Baseline("retrieval", 1), test, [], corpus=["sofas are soft", "a bike has wheels"])
    assert rag[1].messages[0]["content"].endswith("[1] a bike has wheels")
    assert len(rag[1].messages) == len(test[1].messages)


def test_subset_is_seeded_and_ordered():
    rows = list(range(100))
    assert subset(rows, 10, 1) == subset(rows, 10, 1) == sorted(subset(rows, 10, 1))
    assert subset(rows, 10, 1) != subset(rows, 10, 2) and subset(rows, 0, 1) == rows


def _adapted(llama):
    inject(llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for _, layer in lora_layers(llama):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)  # B != 0: the adapter matters
    return llama


def test_baseline_report_has_every_column(tokenizer, llama, tmp_path):
    model = _adapted(llama)
    train, test = _rows(TRAIN), _rows(TEST)
    report = evaluate_model(model, tokenizer, test, tmp_path, task="classification", batch_size=2,
                            baselines="zero-shot,few-shot:3,retrieval:2", train_examples=train)
    study = report["baselines"]
    names = [c["name"] for c in study["columns"]]
    assert names == ["zero-shot", "few-shot K=3", "retrieval K=2", "adapter"]
    # Zero-shot is the report's base column; every column is the constrained decoding's answer.
    assert study["columns"][0]["predictions"] == report["base"]["predictions"]
    assert study["columns"][-1]["predictions"] == report["adapter"]["predictions"]
    few = prompted_rows(Baseline("few-shot", 3), test, train, seed=0)
    prompts = [encode_prompt(list(ex.messages[:-1]), tokenizer) for ex in few]
    set_adapters_enabled(model, False)
    assert study["columns"][1]["predictions"] == predict_labels_reference(model, tokenizer, prompts, LABELS)
    set_adapters_enabled(model, True)
    assert study["columns"][1]["prompt_tokens_per_row"] == pytest.approx(sum(map(len, prompts)) / 4)
    zero, few_col = study["columns"][0], study["columns"][1]
    assert few_col["prompt_tokens_per_row"] > zero["prompt_tokens_per_row"]
    for col in study["columns"]:
        rep = col["report"]
        assert rep["accuracy"] == sum(t == p for t, p in zip(col["y_true"], col["predictions"])) / 4
        assert set(rep["per_class"]) == set(LABELS) and "macro_f1" in rep
        assert col["seconds_per_row"] > 0
    md = (tmp_path / "baselines.md").read_text()
    assert "| model | accuracy | macro-F1 | prompt tokens | ms/row |" in md
    assert "| class | zero-shot | few-shot K=3 | retrieval K=2 | adapter |" in md
    for label in LABELS:
        assert f"| {label} |" in md
    assert (tmp_path / "retrieval.sqlite").exists() and (tmp_path / "baselines.json").exists()
    assert "baselines" in (tmp_path / "report.json").read_text()


def test_baselines_need_classification_and_training_rows(tokenizer, llama, tmp_path):
    gen = _rows([("tell me a story about a bike", "once upon a time there was a red bike"),
                 ("describe the sofa", "it is a grey corner sofa with three seats")])
    with pytest.raises(LorakitError, match="baselines: need classification data"):
        evaluate_model(llama, tokenizer, gen, tmp_path, baselines="zero-shot")
    with pytest.raises(LorakitError, match="few-shot baseline: no training rows"):
        evaluate_model(llama, tokenizer, _rows(TEST), tmp_path, task="classification",
                       baselines="few-shot:2")
    assert all(answer_of(ex) in LABELS for ex in _rows(TEST))


def test_run_config_eval_baselines_is_validated(tmp_path):
    from lorakit.config import build_config

    raw = {"data": {"train": "train.jsonl"}, "train": {"output_dir": str(tmp_path / "run")}}
    cfg = build_config(raw, ["eval.baselines=zero-shot,few-shot:5,retrieval:5", "eval.baseline_rows=100"])
    assert [b.name for b in parse_baselines(cfg.eval.baselines)] == [
        "zero-shot", "few-shot K=5", "retrieval K=5"]
    with pytest.raises(ConfigError) as e:
        build_config(raw, ["eval.baselines=few-shot,zero-shot", "eval.baseline_rows=-1"])
    assert "eval.baselines: 'few-shot' (expected few-shot:K with K >= 1" in str(e.value)
    assert "eval.baseline_rows: got -1" in str(e.value)
    with pytest.raises(ConfigError, match="eval.baselines"):
        build_config(raw, ["eval.baselines=[1, 2]"])


@pytest.mark.parametrize("args,want", [
    (["--baselines", "few-shot"], "lorakit eval: error: baselines: 'few-shot' (expected few-shot:K"),
    (["--baselines", "zero-shot,retrieval:5"], "pass --train-data FILE"),
])
def test_cli_names_a_bad_baselines_option_before_loading_a_model(tmp_path, capsys, args, want):
    from lorakit.cli import main

    assert main(["eval", "--model", str(tmp_path / "no-model"), "--data", "x.jsonl", *args]) == 2
    assert want in capsys.readouterr().err
