"""Readers for JSONL, JSON and CSV; every bad row reported with its line, all at once."""

import json

import pytest

from lorakit.data.formats import load_examples
from lorakit.data.split import dedupe, train_val_split
from lorakit.data.stats import data_stats
from lorakit.errors import DataError


def test_three_formats_and_three_shapes(tmp_path):
    rows = [{"instruction": "i", "input": "x", "output": "o", "id": 7},
            {"prompt": "p", "completion": "c"},
            {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("instruction,input,output\ni,x,o\n\"multi\nline\",,o2\n")
    a = load_examples(tmp_path / "d.jsonl")
    b = load_examples(tmp_path / "d.json")
    assert [e.messages for e in a] == [e.messages for e in b]
    assert a[0].messages[0] == {"role": "user", "content": "i\n\nx"} and a[0].label == "o"
    assert [e.label for e in a] == ["o", "c", "a"]
    c = load_examples(tmp_path / "d.csv")
    assert [e.label for e in c] == ["o", "o2"] and c[1].messages[0]["content"] == "multi\nline"
    assert c[1].line == 4  # the CSV line where the row ends


def test_every_bad_row_reported_with_its_line(tmp_path):
    lines = [
        json.dumps({"instruction": "ok", "output": "fine"}),                       # 1 good
        "{not json",                                                               # 2
        json.dumps(["a", "list"]),                                                 # 3
        json.dumps({"instruction": "no answer"}),                                  # 4 missing field
        json.dumps({"instruction": "x", "output": 5}),                             # 5 wrong type
        json.dumps({"instruction": "x", "output": "  "}),                          # 6 empty answer
        json.dumps({"messages": [{"role": "robot", "content": "x"},
                                 {"role": "assistant", "content": "y"}]}),         # 7 unknown role
        json.dumps({"messages": [{"role": "user", "content": "x"}]}),              # 8 no answer last
        json.dumps({"text": "what shape is this"}),                                # 9 unknown shape
    ]
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_examples(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: 8 bad row(s)")
    for n, fragment in [(2, "not valid JSON"), (3, "row is list"), (4, "missing field 'output'"),
                        (5, "field 'output' is int (expected a string)"), (6, "empty answer"),
                        (7, "messages[0].role 'robot'"), (8, "last message is not from the assistant"),
                        (9, "no known fields")]:
        assert f"{p}:{n}: {fragment}" in msg, (n, msg)


def test_json_rows_are_named_by_index(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"prompt": "a", "completion": "b"}, {"prompt": "a"}]))
    with pytest.raises(DataError, match=r"d.json: row 2: missing field 'completion'"):
        load_examples(p)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"unknown data format '.txt'"):
        load_examples(tmp_path / "d.txt")


def test_dedupe_and_seeded_stratified_split(tmp_path):
    rows = [{"prompt": f"message {i}", "completion": ["a", "b", "c"][i % 3]} for i in range(60)]
    rows += [{"prompt": "MESSAGE   1 ", "completion": "b"}]  # a normalised duplicate of row 1
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept, removed = dedupe(load_examples(p))
    assert removed == 1 and len(kept) == 60
    train, val = train_val_split(kept, 0.2, seed=1)
    assert len(val) == 12 and len(train) == 48
    assert sorted(e.label for e in val) == ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    assert train_val_split(kept, 0.2, seed=1) == (train, val)
    assert train_val_split(kept, 0.2, seed=2)[1] != val


def test_stats_on_a_small_file_warns(tmp_path, tokenizer):
    rows = [{"prompt": f"is item {i} available", "completion": "yes"} for i in range(20)]
    rows.append(rows[0])
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = data_stats(p, tokenizer, max_seq_len=2048)
    assert s["rows"] == 21 and s["duplicates"] == 1 and s["labels"] == {"yes": 21}
    assert s["tokens"]["answer"]["p50"] == len(tokenizer("yes<|im_end|>")["input_ids"])
    assert any("fewer than 500 examples" in w for w in s["warnings"])
