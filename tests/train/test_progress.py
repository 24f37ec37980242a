"""Training progress when the output is not a terminal: plain lines a log file can show."""

import io
import re

from rich.console import Console

from lorakit.train import progress as progress_module
from lorakit.train.loop import train
from lorakit.train.progress import TrainProgress
from tests import tiny
from tests.train.test_loop import config

LINE = re.compile(r"^step (\d+)/(\d+) \((\d+)%\) loss \d+\.\d{4} lr \d\.\d\de-\d\d [\d,]+ tok/s "
                  r"\d+:\d\d:\d\d eta \d+:\d\d:\d\d$")


def _steps(text: str) -> list[int]:
    return [int(m.group(1)) for m in map(LINE.match, text.splitlines()) if m]


def test_a_training_run_into_a_file_prints_progress_lines(tmp_path):
    out = io.StringIO()
    train(config(tmp_path, max_steps=20), model=tiny.tiny_llama(), tokenizer=tiny.tiny_tokenizer(),
          console=Console(file=out, width=80))
    text = out.getvalue()
    # Every tenth of the run (the last step is the final bar's), nothing wider than 80 columns.
    assert _steps(text) == [2, 4, 6, 8, 10, 12, 14, 16, 18]
    assert "step 10/20 (50%) loss " in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "20/20" in text.splitlines()[-1]  # and the final bar


def test_a_terminal_gets_the_bar_only():
    out = io.StringIO()
    bar = TrainProgress(20, console=Console(file=out, width=80, force_terminal=True))
    with bar:
        for step in range(1, 21):
            bar.update(step, loss=1.0, lr=1e-4, tok_per_s=100)
    assert _steps(out.getvalue()) == []


def test_plain_lines_at_least_every_30_seconds(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    bar = TrainProgress(1000, start_step=100, console=Console(file=out, width=80))
    with bar:
        for step in range(101, 106):
            clock[0] += 20.0  # 20 s a step: a line every second step, though 1000 // 10 = 100
            bar.update(step, loss=2.5, lr=3e-4, tok_per_s=1234.5)
    lines = [line for line in out.getvalue().splitlines() if LINE.match(line)]
    assert lines == [
        # 40 s for 2 steps since the resume at step 100: 898 steps to go take 4:59:20.
        "step 102/1000 (10%) loss 2.5000 lr 3.00e-04 1,234 tok/s 0:00:40 eta 4:59:20",
        "step 104/1000 (10%) loss 2.5000 lr 3.00e-04 1,234 tok/s 0:01:20 eta 4:58:40",
    ]


def test_a_plain_line_of_a_long_run_fits_80_columns():
    bar = TrainProgress(99_999, console=Console(file=io.StringIO(), width=80))
    line = bar.plain_line(12_345, loss=2.3456, lr=1.5e-4, tok_per_s=12_345.0, elapsed=9 * 3600.0)
    # 9 h for 12,345 steps: the 87,654 left take 63:54:11 at that pace.
    assert line == "step 12345/99999 (12%) loss 2.3456 lr 1.50e-04 12,345 tok/s 9:00:00 eta 63:54:11"
    assert len(line) == 80


def test_disabled_progress_prints_nothing():
    out = io.StringIO()
    with TrainProgress(10, console=Console(file=out, width=80), enabled=False) as bar:
        for step in range(1, 11):
            bar.update(step, loss=1.0, lr=1e-4, tok_per_s=100)
        bar.note("hidden")
    assert out.getvalue() == ""
