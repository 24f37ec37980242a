"""Seeded fuzz of the data loader: malformed files either load or raise a DataError naming the file.

Each case is one file built from a fixed seed: random bytes, truncations of a good file, other
encodings, wrong types per field, deep nesting, huge lines, empty files, good and bad rows mixed,
and CSV oddities. Every case goes through what `lorakit data stats` and `lorakit train` run
(`load_examples`, dedupe and split, then rendering and tokenizing with a tiny tokenizer); the only
exception allowed is a `DataError` whose message names the file. The first `FAST` cases run in
`make test`; the rest (to `TOTAL`) are marked slow. A few run through the real CLI, which must
exit 2 with one error line and no traceback. A config fuzz does the same for `load_config`,
`load_serve_config` and `load_sweep`: anything but a `ConfigError` is a failure.
"""

import codecs
import json
import random
import subprocess
import sys

import pytest
import yaml

from lorakit.config import load_config
from lorakit.data.formats import load_examples
from lorakit.data.render import encode_example
from lorakit.data.split import dedupe, train_val_split
from lorakit.errors import ConfigError, DataError, LorakitError
from lorakit.serve.config import load_serve_config
from lorakit.sweep.config import load_sweep, plan
from tests import tiny

SEED = 16
FAST, TOTAL = 50, 300

GOOD = [
    {"instruction": "what colour is the sky?", "output": "blue"},
    {"instruction": "add", "input": "2 and 2", "output": "4", "system": "be brief", "id": 3},
    {"prompt": "capital of France", "completion": "Paris"},
    {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"}]},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                  {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
]
FIELDS = ["instruction", "input", "output", "system", "prompt", "completion", "messages", "role", "content"]


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(12 if depth < 3 else 10)
    if kind == 10:
        return [_random_value(rng, depth + 1)]
    if kind == 11:
        return {rng.choice(FIELDS): _random_value(rng, depth + 1)}
    return [None, True, rng.randint(-10 ** 30, 10 ** 30), rng.random() * 1e308, float("nan"), "",
            " \t\n", "\u0000\u202e\ufeff", [], {}][kind]


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _csv(rng: random.Random) -> bytes:
    oddities = [
        "instruction,output\nhi,there\n\"unbalanced,quote\n",
        "instruction,output\nhi,there,extra,columns\nlonely\n",
        "instruction,instruction,output\na,b,c\n",
        "instruction,output\n",
        "",
        "prompt;completion\na;b\n",
        "instruction,output\r\nhi,there\r\n\r\n",
        "instruction,output\rhi,there\r",
        "messages,output\n\"[{}]\",x\n",
        "a,b,c\n1,2,3\n",
        ",,\n,,\n",
        "instruction,output\n\"" + "x" * rng.choice([10, 140_000]) + "\",y\n",
        "\ufeffprompt,completion\nq,a\n",
        "instruction,output\n\"multi\nline\",\"ans\"\"wer\"\n",
    ]
    return rng.choice(oddities).encode("utf-8")


def make_case(i: int) -> tuple[str, bytes]:
    """(file suffix, content) of case i; the same for every run."""
    rng = random.Random(SEED * 100_003 + i)
    good = [rng.choice(GOOD) for _ in range(rng.randint(1, 6))]
    kind = i % 12
    if kind == 0:  # random bytes
        return rng.choice([".jsonl", ".json", ".csv"]), rng.randbytes(rng.choice([1, 7, 100, 5000]))
    if kind == 1:  # a good file cut short
        suffix = rng.choice([".jsonl", ".json"])
        data = _jsonl(good) if suffix == ".jsonl" else json.dumps(good).encode()
        return suffix, data[:rng.randrange(len(data))]
    if kind == 2:  # another encoding
        codec = rng.choice(["utf-16-le", "utf-16-be", "utf-16", "utf-32", "latin-1", "cp1252", "utf-8-sig"])
        text = _jsonl(good).decode().replace("blue", "bleu é ï").replace("Paris", "Zürich")
        return ".jsonl", text.encode(codec, errors="replace")
    if kind == 3:  # a field of the wrong type
        rows = [dict(r) for r in good]
        row = rng.choice(rows)
        row[rng.choice(FIELDS)] = _random_value(rng)
        return ".jsonl", _jsonl(rows)
    if kind == 4:  # deep nesting, as a row or in a field
        depth = rng.choice([50, 1_000, 100_000])
        opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
        deep = opener * depth + "1" + closer * depth
        line = deep if rng.random() < 0.5 else '{"prompt": ' + deep + ', "completion": "x"}'
        if rng.random() < 0.5:
            return ".json", f"[{line}]".encode()
        return ".jsonl", _jsonl(good) + line.encode() + b"\n"
    if kind == 5:  # huge lines
        n = rng.choice([10_000, 100_000, 300_000])
        row = rng.choice([{"prompt": "x" * n, "completion": "y"}, {"prompt": "q", "completion": "w " * (n // 2)},
                          {"junk": "z" * n}])
        return ".jsonl", _jsonl(good) + json.dumps(row).encode() + b"\n"
    if kind == 6:  # empty and nearly empty
        return rng.choice([".jsonl", ".json", ".csv"]), rng.choice(
            [b"", b"\n\n", b"   ", codecs.BOM_UTF8, codecs.BOM_UTF16_LE, b"[]", b"{}", b"null", b"\"\"", b"0"])
    if kind == 7:  # good and bad rows mixed
        lines = [json.dumps(r) for r in good]
        for _ in range(rng.randint(1, 15)):
            bad = rng.choice(['{not json', '[1, 2]', '"text"', '{"text": "unknown shape"}', "{}",
                              '{"instruction": "x"}', '{"prompt": "\\ud800", "completion": "y"}',
                              '{"messages": []}', '{"messages": [{"role": "assistant", "content": "a"}]}',
                              '{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}',
                              'NaN', '{"prompt": "a", "completion": "b"', '{"prompt": 1e999, "completion": "x"}',
                              '{"output": "\\u0000"}', '\x00\x01', "\ufeff{}"])
            lines.insert(rng.randrange(len(lines) + 1), bad)
        return ".jsonl", ("\n".join(lines) + "\n").encode("utf-8", errors="surrogatepass")
    if kind == 8:  # CSV oddities
        return ".csv", _csv(rng)
    if kind == 9:  # a JSON document of the wrong shape
        return ".json", json.dumps(rng.choice([{"rows": good}, good[0], [good], 5, "x", [[1]], good + [None]])).encode()
    if kind == 10:  # random bytes inside good text
        data = bytearray(_jsonl(good))
        for _ in range(rng.randint(1, 5)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return rng.choice([".jsonl", ".csv"]), bytes(data)
    # every row of an unknown shape, or every row bad
    rows = [{"text": f"row {k}", "label": rng.choice("ab")} for k in range(rng.randint(1, 300))]
    if rng.random() < 0.5:
        rows = [{"instruction": k, "output": [k]} for k in range(rng.randint(1, 300))]
    return ".jsonl", _jsonl(rows)


@pytest.fixture(scope="module")
def tok():
    return tiny.tiny_tokenizer()


def _check_case(i: int, tmp_path, tok) -> str:
    """Run case i as `lorakit data stats` and training would; 'loaded' or the DataError message."""
    suffix, data = make_case(i)
    path = tmp_path / f"case{i}{suffix}"
    path.write_bytes(data)
    try:
        examples = load_examples(path)
        kept, _ = dedupe(examples)
        train_val_split(kept, 0.2, seed=0)
        for ex in examples[:20]:
            encode_example(ex, tok, max_seq_len=64)
        return "loaded"
    except DataError as e:
        assert str(path) in str(e), f"case {i}: the error does not name the file: {e}"
        return str(e)


CASES = [i if i < FAST else pytest.param(i, marks=pytest.mark.slow) for i in range(TOTAL)]


@pytest.mark.parametrize("i", CASES)
def test_malformed_file_loads_or_names_itself(i, tmp_path, tok):
    _check_case(i, tmp_path, tok)


def test_cases_are_seeded_and_mostly_refused(tmp_path, tok):
    assert [make_case(i) for i in range(5)] == [make_case(i) for i in range(5)]
    outcomes = [_check_case(i, tmp_path, tok) for i in range(0, FAST, 5)]
    assert sum(o != "loaded" for o in outcomes) >= len(outcomes) // 2, outcomes


def _cli(path, model_dir):
    return subprocess.run([sys.executable, "-m", "lorakit", "data", "stats", str(path), "--model", str(model_dir)],
                          capture_output=True, text=True, timeout=300)


def _assert_one_error_line(r, path):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    errors = [line for line in r.stderr.splitlines() if ": error: " in line]
    # `lorakit data stats: error:` once cli.main names the subcommand in full (lead's area).
    assert len(errors) == 1 and errors[0].startswith("lorakit data") and str(path) in errors[0], r.stderr


def test_the_cli_exits_2_on_a_bad_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\xff\xfe\x00{" + b"\x00" * 10)
    _assert_one_error_line(_cli(bad, tmp_path / "unused-model"), bad)


@pytest.mark.slow
def test_the_cli_on_a_handful_of_cases(tmp_path):
    model_dir = tmp_path / "model"
    tiny.tiny_llama().save_pretrained(model_dir)
    tiny.tiny_tokenizer().save_pretrained(model_dir)
    for i in (0, 1, 2, 4, 7, 8, 11):
        suffix, data = make_case(i)
        path = tmp_path / f"case{i}{suffix}"
        path.write_bytes(data)
        r = _cli(path, model_dir)
        if r.returncode == 0:
            assert "Traceback" not in r.stderr
        else:
            _assert_one_error_line(r, path)


# The config fuzz: random keys and values through the run, serve and sweep loaders.

RUN_KEYS = ["model.name", "model.dtype", "model.quantize_base", "lora.r", "lora.lora_alpha",
            "lora.target_modules", "lora.rank_pattern", "lora.alpha_pattern", "lora.init_lora_weights",
            "lora.use_dora", "data.train", "data.val_fraction", "data.max_seq_len", "train.epochs",
            "train.lr", "train.max_grad_norm", "train.weight_decay", "train.batch_size", "train.output_dir",
            "train.method", "eval.data", "eval.batch_size", "lora.rank", "train", "x.y", ".", "a.b.c"]
VALUES = ["1", "-1", "0", "1e-4", "1e400", ".nan", ".inf", "-.inf", "nan", "true", "no", "'no'", "null", "~",
          "[1,", "[]", "{}", "{a: 1}", "[q_proj, v_proj]", "q_proj(", "(?P<x", "all-linear", "2024-01-01",
          "!!binary aGk=", "!!python/object:os.system x", "*alias", "&a x", "'\\ud800'", "\"\\ud800\"",
          "9" * 40, "[" * 200 + "]" * 200, "a=b", "=", "", "lora", "'", "\"", "- a", ": :", "\t"]


def _random_yaml(rng: random.Random) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:
        return rng.randbytes(rng.randint(0, 200))
    if kind == 1:
        return rng.choice(["[]", "5", "- a\n- b", "a: [", "? [a, b]\n: 1", "{" * 500, "data: !!set {a}",
                           "data:\n  train: x\n  train: y\n", "\ufeffdata: 1\n"]).encode()
    if kind == 2:
        raw = {rng.choice(["model", "lora", "data", "train", "eval", "extra", 1, None]):
               {rng.choice(RUN_KEYS).split(".")[-1]: yaml.safe_load("x: " + v).get("x") if ":" not in v else v
                for v in rng.sample(["1", "x", "[a]", "{}", ".inf", "no"], 2)} for _ in range(3)}
        return yaml.safe_dump(raw).encode()
    if kind == 3:
        return yaml.safe_dump({"data": {"train": "d.jsonl"}, "train": _random_value(rng)}).encode()
    return "data:\n  train: d.jsonl\n".encode("utf-16" if rng.random() < 0.5 else "latin-1")


@pytest.mark.parametrize("i", range(120))
def test_config_fuzz_only_config_errors(i, tmp_path):
    rng = random.Random(SEED * 7 + i)
    overrides = [f"{rng.choice(RUN_KEYS)}={rng.choice(VALUES)}" for _ in range(rng.randint(0, 4))]
    run = tmp_path / "run.yaml"
    run.write_bytes(_random_yaml(rng) if i % 2 else b"data:\n  train: d.jsonl\n")
    serve = tmp_path / "serve.yaml"
    serve.write_bytes(_random_yaml(rng) if i % 3 == 0 else b"max_loras: 2\n")
    serve_overrides = [f"{rng.choice(['port', 'limits.max_tokens', 'dtype', 'limits', 'pack_weights', 'a.b.c', 'target_modules'])}"
                       f"={rng.choice(VALUES)}" for _ in range(rng.randint(0, 3))]
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"base": {"data": {"train": "d.jsonl"}},
                                     rng.choice(["grid", "random", "trials", "overrides", "base"]): _random_value(rng)}))
    for load in (lambda: load_config(run, overrides), lambda: load_serve_config(serve, serve_overrides),
                 lambda: plan(load_sweep(sweep, [f"sweep.{rng.choice(['seed', 'grid', 'trials'])}={rng.choice(VALUES)}"]))):
        try:
            load()
        except ConfigError as e:
            assert str(e).strip(), "an empty message"
        except LorakitError as e:  # pragma: no cover - reported with its type
            pytest.fail(f"case {i}: {type(e).__name__} instead of ConfigError: {e}")
