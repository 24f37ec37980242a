"""`lorakit adapters list` at the terminal's width: what fits, and everything with --json."""

import argparse
import json

import pytest

from lorakit.serve import cli_adapters
from tests.serve.builders import make_adapter


def _list(argv, monkeypatch, capsys, columns):
    monkeypatch.setenv("COLUMNS", str(columns))
    parser = argparse.ArgumentParser()
    cli_adapters.add_adapters_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["adapters", "list", *argv])
    assert args.fn(args) == 0
    return capsys.readouterr().out


@pytest.fixture
def registered(llama, tmp_path):
    deep = tmp_path / "runs" / "banking77-intents" / "r16-alpha32-lr2e-4" / "adapter"
    results = tmp_path / "eval.json"
    results.write_text(json.dumps({"accuracy": 0.8571, "macro_f1": 0.8312, "rows": 3080}))
    for i, name in enumerate(["banking77-r16", "support-tickets-v2", "tiny"]):
        d = make_adapter(llama, deep.parent.parent / f"{name}" / "adapter", seed=i)
        cli_adapters.add_adapter(name, d, eval_results=results)
    return tmp_path


def test_list_fits_80_columns_and_points_to_json(registered, monkeypatch, capsys):
    out = _list([], monkeypatch, capsys, 80)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80
    for name in ("banking77-r16", "support-tickets-v2", "tiny"):
        assert any(line.startswith(f"│ {name} ") for line in lines), name
    header = next(line for line in lines if "name" in line)
    assert [c.strip() for c in header.strip("┃ ").split("┃")] == ["name", "base", "r", "size",
                                                                 "pinned"]
    assert " ".join(" ".join(lines[-2:]).split()) == ("not shown at this width: eval, targets, created, path "
                                    "(every field: `lorakit adapters list --json`)")


def test_a_wide_terminal_shows_every_column(registered, monkeypatch, capsys):
    out = _list([], monkeypatch, capsys, 400)
    header = next(line for line in out.splitlines() if "name" in line)
    assert [c.strip() for c in header.strip("┃ ").split("┃")] == list(cli_adapters.LIST_COLUMNS)
    assert "not shown" not in out and "accuracy=0.857, macro_f1=0.831, rows=3080" in out


def test_json_lists_every_field(registered, monkeypatch, capsys):
    rows = json.loads(_list(["--json"], monkeypatch, capsys, 80))
    assert [r["name"] for r in rows] == ["banking77-r16", "support-tickets-v2", "tiny"]
    assert rows[0]["eval_results"] == {"accuracy": 0.8571, "macro_f1": 0.8312, "rows": 3080}
    assert rows[0]["path"].endswith("banking77-r16/adapter") and rows[0]["rank"] == 4
