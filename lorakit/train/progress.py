"""The training progress bar: step, loss, learning rate, tokens/s and ETA, drawn with rich.

A bar redraws itself in place, which only a terminal shows: with the output piped to a file (CI,
`nohup`, a job scheduler) rich draws nothing until the run ends. There the bar prints a plain
line instead, at every tenth of the run and at least every 30 seconds (whichever comes first),
so a log shows how far a run is while it runs.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

PLAIN_LINES = 10  # plain progress lines per run when the output is not a terminal ...
PLAIN_EVERY_S = 30.0  # ... and at most this long between two of them


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class TrainProgress:
    """A context manager; `update` after each optimizer step, `note`/`warn` print above the bar."""

    def __init__(self, total_steps: int, start_step: int = 0, console: Console | None = None,
                 enabled: bool = True):
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.total_steps, self.start_step = total_steps, start_step
        self.plain = enabled and not self.console.is_terminal
        self.plain_every = max(1, total_steps // PLAIN_LINES)
        self.started = self.last_line = time.monotonic()
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), console=self.console, disable=not enabled, transient=False)
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                           loss="-", lr="-", tps="-")

    def __enter__(self):
        self.progress.__enter__()
        self.started = self.last_line = time.monotonic()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, step: int, loss: float, lr: float, tok_per_s: float) -> None:
        self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                             tps=f"{tok_per_s:,.0f}")
        now = time.monotonic()
        if self.plain and step < self.total_steps and (
                step % self.plain_every == 0 or now - self.last_line >= PLAIN_EVERY_S):
            self.last_line = now
            self.console.print(self.plain_line(step, loss, lr, tok_per_s, now - self.started),
                               soft_wrap=True, highlight=False, markup=False)

    def plain_line(self, step: int, loss: float, lr: float, tok_per_s: float,
                   elapsed: float) -> str:
        """`step 12/120 (10%) loss 2.3456 lr 1.00e-04 1,234 tok/s 0:01:02 eta 0:09:18` (the bar's
        columns: elapsed, then the ETA, which extrapolates this session's pace; a resumed run
        counts from its restart). Under 80 columns up to 99,999 steps."""
        done = step - self.start_step
        eta = elapsed / done * (self.total_steps - step) if done > 0 else 0.0
        return (f"step {step}/{self.total_steps} ({100 * step // max(self.total_steps, 1)}%) "
                f"loss {loss:.4f} lr {lr:.2e} {tok_per_s:,.0f} tok/s "
                f"{_clock(elapsed)} eta {_clock(eta)}")

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)

    def warn(self, text: str) -> None:
        if self.enabled:
            self.console.print(f"[yellow]warning:[/] {text}")
