"""The forgetting probe: zero drift for an adapter with B = 0, positive drift once trained; batched
greedy generation equals the plain loop."""

import json

import pytest
import torch

from lorakit.config import build_config
from lorakit.eval.forgetting import PROBE_EVERY, general_prompts, probe, probe_prompts, prompt_ids, replay_prompts
from lorakit.eval.generate import greedy_answers, greedy_answers_reference
from lorakit.lora import LoraConfig, inject, lora_layers
from lorakit.train.loop import train
from tests import tiny

PROMPTS = probe_prompts()[:10]


def _confident_llama():
    model = tiny.tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # peaked distributions: greedy answers are stable
    return model


def test_shipped_prompts_split_into_probe_and_replay():
    everything = general_prompts()
    assert len(everything) >= 300 and len(set(everything)) == len(everything)
    probe_set, replay_set = probe_prompts(), replay_prompts()
    assert len(probe_set) == len(everything[::PROBE_EVERY])
    assert not set(probe_set) & set(replay_set) and len(probe_set) + len(replay_set) == len(everything)


def test_batched_greedy_equals_the_plain_loop():
    model, tok = _confident_llama(), tiny.tiny_tokenizer()
    ids = prompt_ids(PROMPTS, tok)
    assert len({len(p) for p in ids}) > 1  # the batch is left-padded
    batched = greedy_answers(model, tok, ids, max_new_tokens=12, batch_size=4)
    assert batched == greedy_answers_reference(model, tok, ids, max_new_tokens=12)
    assert any(batched)


def test_zero_drift_for_b_zero_adapter():
    model, tok = _confident_llama(), tiny.tiny_tokenizer()
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert all(float(layer.lora_B.weight.detach().abs().sum()) == 0 for _, layer in lora_layers(model))
    result = probe(model, tok, prompts=PROMPTS, max_new_tokens=12, batch_size=4)
    assert result["drift"] == 0.0 and result["unchanged"] == 1.0 and result["perplexity_ratio"] == 1.0
    assert result["prompts"] == len(PROMPTS) and len(result["rows"]) == len(PROMPTS)


def test_positive_drift_after_training(tmp_path):
    model, tok = _confident_llama(), tiny.tiny_tokenizer()
    rows = [{"instruction": "what colour is the bike?", "input": f"bike {i}", "output": "red"} for i in range(16)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build_config({"model": {"dtype": "fp32", "device": "cpu"},
                        "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
                        "data": {"train": str(tmp_path / "t.jsonl"), "max_seq_len": 64},
                        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 8, "lr": 1e-2,
                                  "max_steps": 10, "warmup_ratio": 0.0}})
    train(cfg, model=model, tokenizer=tok, progress=False)
    result = probe(model, tok, prompts=PROMPTS, max_new_tokens=12, batch_size=4)
    assert result["drift"] > 0.05, result["drift"]
    assert result["adapter_perplexity"] > result["base_perplexity"]
    assert result["unchanged"] < 1.0


def test_needs_a_base_when_nothing_switches_off():
    with pytest.raises(Exception, match="no LoRA layers"):
        probe(tiny.tiny_llama(), tiny.tiny_tokenizer(), prompts=PROMPTS[:1])


def test_report_puts_the_probe_beside_the_task_score(tmp_path):
    from lorakit.data.formats import load_examples
    from lorakit.eval.study import evaluate_model

    rows = [{"instruction": "what colour is the bike?", "input": f"bike {i}", "output": "red" if i % 2 else "blue"}
            for i in range(6)]
    (tmp_path / "e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, tok = _confident_llama(), tiny.tiny_tokenizer()
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    report = evaluate_model(model, tok, load_examples(tmp_path / "e.jsonl"), tmp_path / "eval",
                            compare_base=False, forgetting=True, batch_size=16)
    assert report["forgetting"]["drift"] == 0.0 and report["forgetting"]["prompts"] == len(probe_prompts())
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "forgetting probe" in md.lower() and "unchanged: 100.0%" in md
