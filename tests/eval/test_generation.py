"""Generation tasks judged by their answers: batched greedy answers, exact and normalised match,
the per-row answers file with the base beside the adapter."""

import json

import torch

from lorakit.config import build_config
from lorakit.data.formats import load_examples
from lorakit.data.render import encode_prompt
from lorakit.eval.generate import greedy_answers_reference
from lorakit.eval.metrics import match_scores, normalise_answer
from lorakit.eval.run import evaluate
from lorakit.eval.study import evaluate_model
from lorakit.train.loop import train
from tests import tiny

ANSWER = "It is red, and shiny."


def test_normalised_match_follows_squad():
    assert normalise_answer("  The Eiffel-Tower!! ") == "eiffeltower"
    assert normalise_answer("a cat  and AN owl") == "cat and owl"
    scores = match_scores(["Paris", "the cat", "42"], ["Paris ", "Cat.", "41"])
    assert scores == {"exact_match": 1 / 3, "normalised_match": 2 / 3}


def _rows(tmp_path, name, n, start=0):
    rows = [{"instruction": "what colour is the bike?", "input": f"bike {i}", "output": ANSWER}
            for i in range(start, start + n)]
    (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path / name)


def test_answers_are_the_batched_greedy_answers(tmp_path):
    model, tok = tiny.tiny_llama(), tiny.tiny_tokenizer()
    examples = load_examples(_rows(tmp_path, "e.jsonl", 5))
    r = evaluate(model, tok, examples, task="generation", batch_size=2, progress=False, max_new_tokens=10)
    prompts = [encode_prompt(list(ex.messages[:-1]), tok) for ex in examples]
    assert r["answers"] == greedy_answers_reference(model, tok, prompts, max_new_tokens=10)
    assert r["expected"] == [ANSWER] * 5 and r["max_new_tokens"] == 10
    assert r["exact_match"] == match_scores(r["expected"], r["answers"])["exact_match"]


def test_trained_adapter_beside_the_base_with_an_answers_file(tmp_path):
    model, tok = tiny.tiny_llama(), tiny.tiny_tokenizer()
    cfg = build_config({"model": {"dtype": "fp32", "device": "cpu"},
                        "lora": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
                        "data": {"train": _rows(tmp_path, "t.jsonl", 16), "max_seq_len": 64},
                        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 8, "lr": 5e-3,
                                  "max_steps": 60, "warmup_ratio": 0.0}})
    torch.manual_seed(0)
    train(cfg, model=model, tokenizer=tok, progress=False)
    examples = load_examples(_rows(tmp_path, "e.jsonl", 4, start=100))
    report = evaluate_model(model, tok, examples, tmp_path / "eval", task="generation", batch_size=4)
    assert report["base"]["exact_match"] == 0.0 and report["adapter"]["exact_match"] == 1.0
    assert report["delta"]["normalised_match"] == 1.0 and report["answers_changed"] == 4
    assert report["agreement"]["adapter_only"] == 4
    rows = [json.loads(line) for line in (tmp_path / "eval" / "answers.jsonl").read_text().splitlines()]
    assert [r["adapter"] for r in rows] == [ANSWER] * 4
    assert [r["base"] for r in rows] == report["base"]["answers"]
    assert rows[0]["prompt"] == "what colour is the bike?\n\nbike 100" and rows[0]["expected"] == ANSWER
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "| exact match | 0.0% | 100.0% | +100.0 pts |" in md
