"""evaluate() and supervised_loss() on a tiny Llama, against plain per-example computations."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lorakit.data.formats import Example
from lorakit.data.render import encode_example, encode_prompt
from lorakit.errors import DataError
from lorakit.eval.classify import predict_labels_reference
from lorakit.eval.metrics import classification_report
from lorakit.eval.perplexity import supervised_loss
from lorakit.eval.run import compare, detect_task, evaluate, with_label_hint, write_report
from tests.tiny import tiny_llama

LABELS = ["availability", "condition", "price"]
ROWS = [("is this bike still available?", "availability"), ("can you do 50 dollars", "price"),
        ("what condition is the sofa in", "condition"), ("any scratches or stains", "condition"),
        ("is it still available", "availability"), ("50 dollars?", "price"),
        ("what colour is it", "condition"), ("can you do 40", "price")]
INSTRUCTION = "Classify the message as one of: availability, condition, price."


def _examples(rows=ROWS, system=INSTRUCTION):
    out = []
    for i, (text, label) in enumerate(rows):
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": text}, {"role": "assistant", "content": label}]
        out.append(Example(messages=tuple(msgs), line=i + 1, source="test.jsonl", label=label))
    return out


def _manual_loss(model, tokenizer, examples, max_seq_len):
    """Per example, unpadded: sum of -log p over its supervised next tokens; then / total count."""
    total, count = 0.0, 0
    for ex in examples:
        enc = encode_example(ex, tokenizer, max_seq_len)
        ids, labels = torch.tensor([enc.input_ids]), torch.tensor(enc.labels)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].double()
        targets = labels[1:]
        keep = targets != -100
        total += float(F.cross_entropy(logits[keep], targets[keep], reduction="sum"))
        count += int(keep.sum())
    return total / count, count


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_supervised_loss_equals_manual(tokenizer, llama, batch_size):
    examples = _examples()
    want, count = _manual_loss(llama, tokenizer, examples, 512)
    got = supervised_loss(llama, tokenizer, examples, max_seq_len=512, batch_size=batch_size)
    assert got["tokens"] == count
    assert got["loss"] == pytest.approx(want, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)
    assert got["answers_truncated"] == 0 and got["answers_dropped"] == 0


def test_supervised_loss_counts_only_answer_tokens(tokenizer, llama):
    examples = _examples()
    got = supervised_loss(llama, tokenizer, examples)
    # Each answer's own tokens plus its end-of-turn token, nothing from the prompt.
    want = sum(len(tokenizer.encode(label, add_special_tokens=False)) + 1 for _, label in ROWS)
    assert got["tokens"] == want


def test_classification_equals_reference_decoding(tokenizer, llama):
    examples = _examples()
    r = evaluate(llama, tokenizer, examples, task="auto", batch_size=3, progress=False)
    assert r["task"] == "classification" and r["labels"] == LABELS
    prompts = [encode_prompt(list(ex.messages[:-1]), tokenizer) for ex in examples]
    want = predict_labels_reference(llama, tokenizer, prompts, LABELS)
    assert r["predictions"] == want
    assert r["report"] == classification_report([lab for _, lab in ROWS], want, LABELS)
    loss, count = _manual_loss(llama, tokenizer, examples, 512)
    assert r["loss"] == pytest.approx(loss, rel=1e-5) and r["tokens"] == count
    assert r["hinted_rows"] == 0


def test_label_hint_only_where_the_prompt_misses_labels(tokenizer, llama):
    bare = _examples(system=None)
    hinted = with_label_hint(bare[0], LABELS)
    assert hinted.messages[0] == {"role": "system",
                                  "content": "Answer with exactly one of: availability, condition, price."}
    assert hinted.messages[1:] == bare[0].messages and hinted.label == bare[0].label
    listed = _examples()
    assert with_label_hint(listed[0], LABELS) is listed[0]  # the instruction already lists them all
    partial = _examples(system="You sort marketplace messages.")[0]
    assert with_label_hint(partial, LABELS).messages[0]["content"] == (
        "You sort marketplace messages.\n\nAnswer with exactly one of: availability, condition, price.")

    r = evaluate(llama, tokenizer, bare, task="classification", progress=False, label_hint=True)
    assert r["hinted_rows"] == len(bare)
    prompts = [encode_prompt(list(with_label_hint(ex, LABELS).messages[:-1]), tokenizer) for ex in bare]
    assert r["predictions"] == predict_labels_reference(llama, tokenizer, prompts, LABELS)


def test_generation_task_reports_loss_and_answers(tokenizer, llama):
    rows = [("hello", "the quick brown fox jumps over the lazy dog and then some more"),
            ("what colour", "it is brown, with a few scratches on the table top")]
    examples = _examples(rows, system=None)
    assert detect_task(examples) == "generation"
    r = evaluate(llama, tokenizer, examples, progress=True)
    assert r["task"] == "generation" and "predictions" not in r and len(r["answers"]) == 2
    assert r["loss"] == pytest.approx(_manual_loss(llama, tokenizer, examples, 512)[0], rel=1e-5)


def test_detect_task_rules():
    assert detect_task(_examples()) == "classification"
    # every answer different -> not a categorical set
    assert detect_task(_examples([("a", "x"), ("b", "y")])) == "generation"
    assert detect_task(_examples([("a", "x")] * 3)) == "generation"  # one class only
    assert detect_task(_examples([("a", "yes"), ("b", "no"), ("c", "x" * 41), ("d", "yes")])) == "generation"
    many = [(str(i), f"c{i % 51}") for i in range(102)]
    assert detect_task(_examples(many)) == "generation"  # 51 classes
    assert detect_task(_examples([(str(i), f"c{i % 50}") for i in range(100)])) == "classification"


def test_bad_inputs_name_the_row(tokenizer, llama):
    with pytest.raises(DataError, match="no examples"):
        evaluate(llama, tokenizer, [], progress=False)
    with pytest.raises(DataError, match=r"test.jsonl:2: answer 'price' is not in the label set"):
        evaluate(llama, tokenizer, _examples(), task="classification", labels=["availability", "condition"],
                 progress=False)


def test_base_vs_adapter_report_files(tokenizer, llama, tmp_path):
    # Two different tiny models stand in for base and adapter on the same rows.
    examples = _examples()
    base = evaluate(llama, tokenizer, examples, progress=False)
    other = tiny_llama(seed=3)
    adapter = evaluate(other, tokenizer, examples, progress=False)
    report = compare(base, adapter, LABELS)
    json_path, md_path = write_report(report, tmp_path)
    md = md_path.read_text().splitlines()
    acc_b, acc_a = base["report"]["accuracy"], adapter["report"]["accuracy"]
    assert (f"| accuracy | {100 * acc_b:.1f}% | {100 * acc_a:.1f}% | {100 * (acc_a - acc_b):+.1f} pts |") in md
    assert f"| loss | {base['loss']:.4f} | {adapter['loss']:.4f} | {adapter['loss'] - base['loss']:+.4f} |" in md
    for label in LABELS:
        b, a = base["report"]["per_class"][label], adapter["report"]["per_class"][label]
        cells = [label, str(b["support"])] + [f"{100 * c[k]:.1f}%" for c in (b, a) for k in ("precision", "recall", "f1")]
        assert "| " + " | ".join(cells) + " |" in md
        row = adapter["report"]["confusion_matrix"][LABELS.index(label)]
        assert "| " + " | ".join([label] + [str(v) for v in row]) + " |" in md
    saved = json.loads(json_path.read_text())
    assert saved["adapter"]["predictions"] == adapter["predictions"]
    assert saved["base"]["loss"] == pytest.approx(base["loss"])
