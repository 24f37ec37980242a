"""ShareGPT rows (`conversations` of `{from, value}`, as Axolotl and LLaMA-Factory read them)
become the same conversations as the OpenAI `messages` rows they stand for."""

import json

import pytest

from lorakit.data.formats import load_examples
from lorakit.errors import DataError


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sharegpt_rows_equal_their_messages_rows(tmp_path):
    sharegpt = [
        {"conversations": [{"from": "human", "value": "is it available?"},
                           {"from": "gpt", "value": "yes"},
                           {"from": "human", "value": "50 dollars?"},
                           {"from": "gpt", "value": "deal"}], "id": "a"},
        {"system": "be brief", "conversations": [{"from": "human", "value": "hi"},
                                                 {"from": "gpt", "value": "hello"}]},
        {"conversations": [{"from": "system", "value": "sys"}, {"from": "user", "value": "q"},
                           {"from": "assistant", "value": "a"}]},
    ]
    messages = [
        {"messages": [{"role": "user", "content": "is it available?"},
                      {"role": "assistant", "content": "yes"},
                      {"role": "user", "content": "50 dollars?"},
                      {"role": "assistant", "content": "deal"}]},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a"}]},
    ]
    got = load_examples(write(tmp_path / "s.jsonl", sharegpt))
    want = load_examples(write(tmp_path / "m.jsonl", messages))
    assert [(e.messages, e.line, e.label) for e in got] == [(e.messages, e.line, e.label) for e in want]
    # The --system prompt is added where the row has none, as for chat rows.
    with_system = load_examples(tmp_path / "s.jsonl", system_prompt="p")
    assert [e.messages[0]["content"] for e in with_system] == ["p", "be brief", "sys"]


def test_bad_sharegpt_rows_are_reported_with_line_and_expected_values(tmp_path):
    p = write(tmp_path / "s.jsonl", [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "bing", "value": "a"}]},
        {"conversations": []},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}]},
        {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
        {"conversations": ["hello"]},
    ])
    with pytest.raises(DataError) as e:
        load_examples(p)
    assert str(e.value) == (
        f"{p}: 5 bad row(s):\n"
        f"  {p}:1: conversations[1].from 'bing' (expected one of system, human, user, gpt, assistant)\n"
        f"  {p}:2: field 'conversations' must be a non-empty list of {{from, value}}\n"
        f"  {p}:3: conversations[1].value is int (expected a string)\n"
        f"  {p}:4: last message is not from the assistant (expected the answer last)\n"
        f"  {p}:5: conversations[0] is str (expected an object with from, value)")
