"""The training progress bar: step, loss, learning rate, tokens/s and ETA, drawn with rich."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    """A context manager; `update` after each optimizer step, `note`/`warn` print above the bar."""

    def __init__(self, total_steps: int, start_step: int = 0, console: Console | None = None,
                 enabled: bool = True):
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), console=self.console, disable=not enabled, transient=False)
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                           loss="-", lr="-", tps="-")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, step: int, loss: float, lr: float, tok_per_s: float) -> None:
        self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                             tps=f"{tok_per_s:,.0f}")

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)

    def warn(self, text: str) -> None:
        if self.enabled:
            self.console.print(f"[yellow]warning:[/] {text}")
