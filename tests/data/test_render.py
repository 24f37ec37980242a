"""Masking: -100 exactly on prompt, padding and non-assistant turns, for every data shape."""

import json

import pytest

from lorakit.data.collate import pad_batch
from lorakit.data.formats import load_examples
from lorakit.data.render import IGNORE, encode_example, encode_prompt


def supervised_text(tok, enc):
    """The decoded runs of supervised tokens, one string per contiguous run."""
    runs, current = [], []
    for t, label in zip(enc.input_ids, enc.labels):
        if label != IGNORE:
            assert label == t
            current.append(t)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.mark.parametrize("row, answer", [
    ({"instruction": "what colour?", "input": "the bike is red", "output": "red"}, "red"),
    ({"prompt": "is it available?", "completion": "item availability"}, "item availability"),
    ({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "hello there"}]}, "hello there"),
])
def test_only_the_answer_and_its_end_token_are_supervised(tmp_path, tokenizer, row, answer):
    (ex,) = load_examples(write(tmp_path, [row]))
    enc = encode_example(ex, tokenizer, max_seq_len=256)
    assert supervised_text(tokenizer, enc) == [answer + "<|im_end|>"]
    # The prompt the model answers at inference is exactly the unsupervised prefix.
    prompt = encode_prompt(ex.messages[:-1], tokenizer)
    first = next(i for i, label in enumerate(enc.labels) if label != IGNORE)
    assert enc.input_ids[:first] == prompt


def test_multi_turn_supervises_every_assistant_turn_only(tmp_path, tokenizer):
    row = {"messages": [
        {"role": "user", "content": "price?"}, {"role": "assistant", "content": "50 dollars"},
        {"role": "user", "content": "condition?"}, {"role": "assistant", "content": "like new"}]}
    (ex,) = load_examples(write(tmp_path, [row]))
    enc = encode_example(ex, tokenizer, max_seq_len=256)
    assert supervised_text(tokenizer, enc) == ["50 dollars<|im_end|>", "like new<|im_end|>"]
    # The newline after <|im_end|> and the next user turn carry no loss.
    text = tokenizer.decode(enc.input_ids)
    assert text.count("<|im_end|>") == 4


def test_train_on_inputs_supervises_everything(tmp_path, tokenizer):
    (ex,) = load_examples(write(tmp_path, [{"prompt": "a", "completion": "b"}]))
    enc = encode_example(ex, tokenizer, max_seq_len=256, train_on_inputs=True)
    assert enc.labels == enc.input_ids


def test_truncation_counts_cut_and_dropped_answers(tmp_path, tokenizer):
    (ex,) = load_examples(write(tmp_path, [{"prompt": "is the table still for sale", "completion":
                                            "yes it is still available and you can collect it"}]))
    full = encode_example(ex, tokenizer, max_seq_len=512)
    first = next(i for i, label in enumerate(full.labels) if label != IGNORE)
    cut = encode_example(ex, tokenizer, max_seq_len=first + 2)
    assert cut.answer_truncated and not cut.answer_dropped and len(cut.input_ids) == first + 2
    gone = encode_example(ex, tokenizer, max_seq_len=first)
    assert gone.answer_dropped
    assert not full.answer_truncated and not full.answer_dropped


def test_padding_is_masked(tmp_path, tokenizer):
    exs = load_examples(write(tmp_path, [{"prompt": "a", "completion": "b"},
                                         {"prompt": "a much longer prompt here", "completion": "c d e"}]))
    encs = [encode_example(e, tokenizer, 256) for e in exs]
    batch = pad_batch(encs, pad_id=tokenizer.pad_token_id, pad_to_multiple_of=8)
    n0 = len(encs[0].input_ids)
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["labels"][0, n0:].eq(IGNORE).all() and batch["attention_mask"][0, n0:].eq(0).all()
    assert batch["input_ids"][0, n0:].eq(tokenizer.pad_token_id).all()
    assert batch["labels"][0, :n0].tolist() == encs[0].labels


def test_no_chat_template_falls_back_to_plain_rendering(tmp_path, tokenizer):
    tokenizer.chat_template = None
    (ex,) = load_examples(write(tmp_path, [{"instruction": "say hi", "output": "hello"}]))
    enc = encode_example(ex, tokenizer, 256)
    assert supervised_text(tokenizer, enc) == ["hello<|im_end|>"]
    assert tokenizer.decode(encode_prompt(ex.messages[:-1], tokenizer)).endswith("### Response:\n")
