"""The CLI's error contract: a user error is one `lorakit CMD: error:` line and exit 2, the
operating system refusing a path included; `--debug` shows the traceback instead."""

import os

import pytest

from lorakit.cli import main
from tests.full_disk import tiny_tmpfs


def _results(path):
    path.write_text('{"trial": 0, "status": "failed", "error": "x", "overrides": {}}\n')
    return path


def _one_error_line(capsys, command):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"lorakit {command}: error: ")
    return err[0]


def test_a_file_where_a_folder_belongs_is_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    code = main(["plot", str(_results(tmp_path / "results.jsonl")), "--out", str(tmp_path / "taken" / "plots")])
    assert code == 2
    line = _one_error_line(capsys, "plot")
    assert str(tmp_path / "taken") in line


def test_a_full_disk_is_one_line_that_says_so(tmp_path, capsys):
    with tiny_tmpfs(tmp_path / "disk", size_kib=4) as disk:
        (disk / "filler").write_bytes(os.urandom(4096))
        code = main(["plot", str(_results(tmp_path / "results.jsonl")), "--out", str(disk / "plots")])
    assert code == 2
    assert "disk is full" in _one_error_line(capsys, "plot")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception):
        main(["plot", str(tmp_path / "missing.jsonl"), "--debug"])
