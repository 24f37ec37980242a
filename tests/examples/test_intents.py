"""The bundled intents data: deterministic, balanced, no train/test leak, labels follow the rule."""

from __future__ import annotations

import collections
import json
import math
import re
from pathlib import Path

import pytest

from lorakit.errors import ConfigError
from lorakit.examples import intents
from lorakit.examples.intents import LABELS, PRECEDENCE, INSTRUCTION, generate, normalize, write_dataset

SHIPPED = Path(intents.__file__).resolve().parent

# Phrases that only templates of one class produce. A row containing a marker of class C must be
# labelled C or a class above C in PRECEDENCE (typos can only remove markers, never add them).
MARKERS = {
    "prompt injection": r"previous instructions|ignore your instructions|system prompt|developer mode|you are now",
    "offensive": r"\b(clown|idiot|muppet|moron|loser)s?\b",
    "price negotiation": r"would you take|lowest price|best price|lowest you'd go|price negotiable|open to offers|ignore my last message",
    "item availability": r"still available|pick it up|can i pick|hold it for me",
    "item condition": r"does it still work|what condition is it in|has it ever been repaired",
    "item aspects": r"what colour is it|what are the dimensions|what size is it|which model is it",
}


@pytest.fixture(scope="module")
def data():
    return generate()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = write_dataset(tmp_path / "a", seed=3, n_train=140, n_test=70)
    b = write_dataset(tmp_path / "b", seed=3, n_train=140, n_test=70)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    other = write_dataset(tmp_path / "c", seed=4, n_train=140, n_test=70)
    assert a[0].read_bytes() != other[0].read_bytes()


def test_shipped_files_are_the_default_generator_output(tmp_path):
    train_path, test_path = write_dataset(tmp_path)
    assert (SHIPPED / intents.TRAIN_FILE).read_bytes() == train_path.read_bytes()
    assert (SHIPPED / intents.TEST_FILE).read_bytes() == test_path.read_bytes()


def test_cli_writes_the_same_files(tmp_path, capsys):
    assert intents.main(["--out-dir", str(tmp_path), "--train", "70", "--test", "35", "--seed", "1"]) == 0
    expected = generate(1, 70, 35)
    assert read_jsonl(tmp_path / intents.TRAIN_FILE) == expected[0]
    assert read_jsonl(tmp_path / intents.TEST_FILE) == expected[1]
    assert "35 rows" in capsys.readouterr().out


def test_counts_are_balanced(data):
    train, test = data
    assert len(train) == 1400 and len(test) == 500
    for rows in (train, test):
        counts = collections.Counter(r["output"] for r in rows)
        assert set(counts) == set(LABELS)
        assert max(counts.values()) - min(counts.values()) <= 1
    assert min(collections.Counter(r["output"] for r in test).values()) == 71


def test_rows_are_alpaca_with_ids_and_one_instruction(data):
    for split, rows in zip(("train", "test"), data):
        assert [r["id"] for r in rows] == [f"{split}-{i:04d}" for i in range(len(rows))]
        for r in rows:
            assert list(r) == ["id", "instruction", "input", "output"]
            assert r["instruction"] == INSTRUCTION and r["output"] in LABELS
            assert 3 <= len(r["input"].split()) <= 65


def test_instruction_lists_every_label_in_precedence_order():
    positions = [INSTRUCTION.index(label) for label in PRECEDENCE]
    assert positions == sorted(positions) and sorted(PRECEDENCE) == sorted(LABELS)
    assert len(INSTRUCTION.split()) <= 40  # 43 SmolLM2 tokens; the brief's budget is ~60


def test_no_message_text_in_both_splits_or_twice_in_one(data):
    train, test = data
    train_keys = [normalize(r["input"]) for r in train]
    test_keys = [normalize(r["input"]) for r in test]
    assert len(set(train_keys)) == 1400 and len(set(test_keys)) == 500
    assert not set(train_keys) & set(test_keys)
    assert normalize("Still  available?? Thx!") == "still available thx"


def test_labels_follow_the_multi_intent_precedence(data):
    rank = {label: i for i, label in enumerate(PRECEDENCE)}
    mixed = collections.Counter()
    for r in data[0] + data[1]:
        text = r["input"].lower()
        for cls, pattern in MARKERS.items():
            if re.search(pattern, text):
                assert rank[r["output"]] <= rank[cls], (r, cls)
                if cls != r["output"]:
                    mixed[(r["output"], cls)] += 1
    # The hard cases exist: each class co-occurs with lower ones and is still labelled by the rule.
    for pair in [("price negotiation", "item availability"), ("offensive", "price negotiation"),
                 ("prompt injection", "item availability"), ("item availability", "item condition"),
                 ("item condition", "item aspects")]:
        assert mixed[pair] >= 3, (pair, mixed)


def _naive_bayes_accuracy(train: list[dict], test: list[dict]) -> float:
    def feats(text):
        words = re.findall(r"[a-z0-9']+", text.lower())
        return words + [a + "_" + b for a, b in zip(words, words[1:])]
    counts = {label: collections.Counter() for label in LABELS}
    for r in train:
        counts[r["output"]].update(feats(r["input"]))
    vocab = len(set().union(*counts.values()))
    totals = {label: sum(c.values()) for label, c in counts.items()}
    def predict(text):
        return max(LABELS, key=lambda l: sum(math.log((counts[l][f] + 1) / (totals[l] + vocab)) for f in feats(text)))
    return sum(predict(r["input"]) == r["output"] for r in test) / len(test)


def test_labels_are_learnable_but_not_template_recall(data):
    # A bag-of-words naive Bayes gets most rows right (labels are consistent) but not nearly all:
    # held-out templates and hard multi-intent rows need more than word counts.
    accuracy = _naive_bayes_accuracy(*data)
    assert 0.75 <= accuracy <= 0.95, accuracy


def test_too_few_rows_is_a_config_error():
    with pytest.raises(ConfigError, match="--test must be at least 7"):
        generate(0, 1400, 3)
