"""Malformed data files: each one a DataError naming the file and line, never a traceback.

Regression tests for the faults of issue 16 (binary, non-UTF-8, UTF-16, lone surrogates, deep
nesting, a CSV with a byte-order mark, rows of unknown shape) and for the preparation step
(duplicates counted, empty validation refused, the eval file read before training).
"""

import codecs
import json

import pytest

from lorakit.config import build_config
from lorakit.data.formats import load_examples
from lorakit.data.render import encode_example
from lorakit.errors import ConfigError, DataError
from lorakit.train.loop import train
from lorakit.train.prepare import check_model_fits, prepare_data
from tests import tiny

ROW = {"instruction": "what colour is the sky?", "output": "blue"}
JSONL = json.dumps(ROW) + "\n" + json.dumps({"prompt": "2+2", "completion": "4"}) + "\n"


def test_binary_file(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00")
    with pytest.raises(DataError, match=r"d.jsonl:1: not UTF-8 text \(byte 0x89 at offset 0"):
        load_examples(p)
    p.write_bytes(JSONL.encode() + b"\x00\x01\x02\x03garbage\n")
    with pytest.raises(DataError, match=r"d.jsonl:3: a NUL character: this looks like a binary file"):
        load_examples(p)


def test_latin1_names_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(JSONL.encode() + json.dumps({"prompt": "café", "completion": "x"},
                                              ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=r"d.jsonl:3: not UTF-8 text \(byte 0xe9 .*expected UTF-8 text"):
        load_examples(p)


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig"])
def test_byte_order_marks_are_read(tmp_path, codec):
    p = tmp_path / "d.jsonl"
    bom = {"utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE}.get(codec, b"")
    p.write_bytes(bom + JSONL.replace("sky", "ciel étoilé").encode(codec))
    rows = load_examples(p)
    assert [e.label for e in rows] == ["blue", "4"]
    assert rows[0].messages[0]["content"] == "what colour is the ciel étoilé?"


@pytest.mark.parametrize("codec, order", [("utf-16-le", "LE"), ("utf-16-be", "BE")])
def test_utf16_without_a_mark_is_named(tmp_path, codec, order):
    p = tmp_path / "d.jsonl"
    p.write_bytes(JSONL.encode(codec))
    with pytest.raises(DataError, match=rf"d.jsonl: looks like UTF-16-{order} text without a byte-order "
                                        r"mark \(expected UTF-8, or UTF-16 starting with a byte-order mark\)"):
        load_examples(p)


def test_csv_with_a_utf8_bom_reads_its_first_column(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(codecs.BOM_UTF8 + b"instruction,output\nwhat colour is the sky?,blue\n")
    (ex,) = load_examples(p)
    assert ex.messages[0]["content"] == "what colour is the sky?" and ex.label == "blue"


def test_lone_surrogates_are_bad_rows(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(JSONL + '{"prompt": "a \\ud800 b", "completion": "x"}\n'
                 + '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\udfff"}]}\n'
                 + '{"prompt": "pair \\ud83d\\ude00 ok", "completion": "x"}\n')
    with pytest.raises(DataError) as e:
        load_examples(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: 2 bad row(s)")
    assert f"{p}:3: field 'prompt' holds a lone surrogate escape \\ud800 at character 2" in msg
    assert f"{p}:4: messages[1].content holds a lone surrogate escape \\udfff" in msg


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_deep_nesting_is_a_data_error(tmp_path, suffix):
    p = tmp_path / f"d{suffix}"
    deep = "[" * 100_000 + "]" * 100_000
    p.write_text((JSONL + deep + "\n") if suffix == ".jsonl" else deep)
    line = 3 if suffix == ".jsonl" else 1
    with pytest.raises(DataError, match=rf"d{suffix}:{line}: JSON nested too deeply"):
        load_examples(p)


def test_huge_integer_and_csv_oddities(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(JSONL + '{"prompt": "x", "completion": ' + "9" * 5000 + "}\n")
    with pytest.raises(DataError, match=r"d.jsonl:3: not valid JSON \(Exceeds the limit"):
        load_examples(p)
    c = tmp_path / "d.csv"
    c.write_text("instruction,output\n\"" + "x" * 200_000 + "\",y\n")
    with pytest.raises(DataError, match=r"d.csv:\d+: not valid CSV \(field larger than field limit"):
        load_examples(c)


def test_unknown_shape_everywhere_is_one_error(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"text": f"row {i}", "label": "x"}) + "\n" for i in range(500)))
    with pytest.raises(DataError) as e:
        load_examples(p)
    assert str(e.value) == (f"{p}: none of its 500 rows has a known shape (expected Alpaca "
                            "(instruction, output), chat (messages), ShareGPT (conversations) or "
                            "prompt/completion fields; "
                            "the first row's keys: text, label)")


def test_bad_rows_are_capped_with_a_count(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(JSONL + "".join(json.dumps({"instruction": "x", "output": i}) + "\n" for i in range(30)))
    with pytest.raises(DataError) as e:
        load_examples(p)
    lines = str(e.value).splitlines()
    assert lines[0] == f"{p}: 30 bad row(s):" and len(lines) == 12
    assert lines[1] == f"  {p}:3: field 'output' is int (expected a string)"
    assert lines[-1] == "  ... and 20 more"


def test_the_header_counts_rows_not_problems(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(JSONL + "".join(json.dumps({"instruction": i, "output": [i]}) + "\n" for i in range(3)))
    with pytest.raises(DataError) as e:
        load_examples(p)
    lines = str(e.value).splitlines()
    assert lines[0] == f"{p}: 3 bad row(s):" and len(lines) == 7
    assert lines[1:3] == [f"  {p}:3: field 'instruction' is int (expected a string)",
                          f"  {p}:3: field 'output' is list (expected a string)"]


@pytest.mark.parametrize("text, fragment", [
    ('{"messages": [{"role": "assistant", "content": "a"}]}', "no user message"),
    ('{"messages": [{"role": ["user"], "content": "a"}, {"role": "assistant", "content": "b"}]}',
     "messages[0].role ['user']"),
    ('{"messages": "hello"}', "field 'messages' must be a non-empty list"),
    ('{"instruction": {"a": 1}, "output": "b"}', "field 'instruction' is dict (expected a string)"),
    ('"just a string"', "row is str (expected an object)"),
])
def test_rows_of_the_wrong_shape(tmp_path, text, fragment):
    p = tmp_path / "d.jsonl"
    p.write_text(JSONL + text + "\n")
    with pytest.raises(DataError, match=rf"d.jsonl:3: .*{__import__('re').escape(fragment)}"):
        load_examples(p)


def test_folder_and_empty_file(tmp_path):
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(DataError, match=r"d.jsonl: is a folder \(expected a .jsonl, .json or .csv data file\)"):
        load_examples(tmp_path / "d.jsonl")
    (tmp_path / "e.jsonl").write_text("\n\n  \n")
    with pytest.raises(DataError, match=r"e.jsonl: no rows \(expected rows with Alpaca"):
        load_examples(tmp_path / "e.jsonl")


def test_a_template_that_refuses_a_conversation_names_the_row(tmp_path, tokenizer):
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
                               "{{ raise_exception('system only first') }}{% endif %}{{ m['content'] }}"
                               "{% endfor %}")
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                                          {"role": "assistant", "content": "b"}]}) + "\n")
    (ex,) = load_examples(p)
    with pytest.raises(DataError, match=r"d.jsonl:1: the chat template refuses this conversation "
                                        r"\(system only first\)"):
        encode_example(ex, tokenizer, 64)


def _config(tmp_path, data: dict, **sections):
    raw = {"model": {"dtype": "fp32", "device": "cpu"}, "data": {"max_seq_len": 64, **data},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1}, **sections}
    return build_config(raw)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_duplicates_dropped_are_counted(tmp_path, tokenizer):
    rows = [{"prompt": f"q{i}", "completion": "a"} for i in range(5)] + [{"prompt": "Q1 ", "completion": "a"}] * 3
    cfg = _config(tmp_path, {"train": _write(tmp_path / "d.jsonl", rows)})
    data = prepare_data(cfg, tokenizer)
    assert data.duplicates_removed == 3 and len(data.train) == 5
    assert any(w.startswith("dropped 3 duplicate rows (data.dedupe: true") for w in data.warnings), data.warnings


def test_empty_validation_is_an_error(tmp_path, tokenizer):
    one = _write(tmp_path / "one.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError, match=r"one.jsonl: data.val_fraction=0.2 of 1 rows leaves 1 training "
                                        r"and 0 validation rows"):
        prepare_data(_config(tmp_path, {"train": one, "val_fraction": 0.2}), tokenizer)
    two = _write(tmp_path / "two.jsonl", [{"prompt": "q", "completion": "a"}, {"prompt": "r", "completion": "a"}])
    with pytest.raises(DataError, match=r"leaves 0 training and 2 validation rows"):
        prepare_data(_config(tmp_path, {"train": two, "val_fraction": 0.9}), tokenizer)
    long_val = _write(tmp_path / "val.jsonl", [{"prompt": "word " * 100, "completion": "a"}])
    with pytest.raises(DataError, match=r"val.jsonl: no usable validation rows after truncation to max_seq_len=64"):
        prepare_data(_config(tmp_path, {"train": two, "validation": long_val}), tokenizer)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty.jsonl: no rows"):
        prepare_data(_config(tmp_path, {"train": two, "validation": str(tmp_path / "empty.jsonl")}), tokenizer)


def test_eval_file_is_checked_before_training(tmp_path):
    train_file = _write(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": "a"} for i in range(4)])
    cfg = _config(tmp_path, {"train": train_file}, eval={"data": str(tmp_path / "missing.jsonl")})
    with pytest.raises(DataError, match=r"missing.jsonl: no such data file"):
        train(cfg, model=tiny.tiny_llama(), tokenizer=tiny.tiny_tokenizer(), progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before the first step


def test_max_seq_len_beyond_the_model_positions(tmp_path):
    cfg = _config(tmp_path, {"train": "x.jsonl", "max_seq_len": 4096})
    with pytest.raises(ConfigError, match=r"data.max_seq_len: got 4096 but smollm2-135m-instruct has 256 "
                                          r"positions \(max_position_embeddings; expected <= 256\)"):
        check_model_fits(cfg, tiny.tiny_llama())
    with pytest.raises(ConfigError, match=r"has 256 positions"):
        train(cfg, model=tiny.tiny_gpt2(), tokenizer=tiny.tiny_tokenizer(), progress=False)
    check_model_fits(_config(tmp_path, {"train": "x.jsonl", "max_seq_len": 256}), tiny.tiny_llama())
