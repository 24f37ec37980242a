"""Overfitting caught as it happens: validation loss rising while training loss falls.

The classic sign (Goodfellow, Bengio and Courville, "Deep Learning", 2016, section 7.8, "Early
Stopping"): the training loss keeps falling while the loss on held-out rows turns up. One rise of
the validation loss is noise as often as not, so the watch fires when it rose at two evaluations
in a row while the training loss fell over the same two intervals:

    v[i-2] < v[i-1] < v[i]   and   t[i-2] > t[i-1] > t[i]

where v are validation losses at evaluations and t the mean training loss of the steps since the
previous evaluation (a mean, because one step's loss is too noisy to compare). It fires once per
streak: again only after the validation loss has fallen in between. It names the best evaluation
so far and the checkpoint written at that step, and says what to try.

`OverfitWatch.from_metrics` rebuilds the state from a resumed run's metrics.jsonl rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

ADVICE = ("try fewer epochs or train.early_stopping_patience=2 (keeps the best weights), a lower "
          "train.lr, a smaller lora.r, lora.lora_dropout=0.05-0.1, or more training rows")


@dataclass
class OverfitWarning:
    step: int
    val_losses: tuple[float, float, float]
    train_losses: tuple[float, float, float]
    best_step: int
    best_val_loss: float

    def checkpoint(self, ckpt_root: Path | None) -> str | None:
        """The complete checkpoint written at the best step, if one was and is still kept."""
        if ckpt_root is None:
            return None
        from lorakit.train.checkpoint import complete_checkpoints

        found = [p for p in complete_checkpoints(Path(ckpt_root)) if p.name.endswith(f"{self.best_step:08d}")]
        return str(found[0]) if found else None

    def message(self, ckpt_root: Path | None = None) -> str:
        checkpoint = self.checkpoint(ckpt_root)
        v = " -> ".join(f"{x:.4f}" for x in self.val_losses)
        t = " -> ".join(f"{x:.4f}" for x in self.train_losses)
        where = f", checkpoint {checkpoint}" if checkpoint else ", no checkpoint kept at that step"
        return (f"step {self.step}: overfitting: validation loss rose two evaluations in a row "
                f"({v}) while training loss fell ({t}); best so far step {self.best_step} "
                f"(validation loss {self.best_val_loss:.4f}{where}); {ADVICE}")

    def record(self, ckpt_root: Path | None = None) -> dict:
        """The metrics.jsonl row."""
        return {"step": self.step, "overfitting": True, "best_step": self.best_step,
                "best_val_loss": self.best_val_loss, "best_checkpoint": self.checkpoint(ckpt_root)}


@dataclass
class OverfitWatch:
    evaluations: list[tuple[int, float, float]] = field(default_factory=list)  # (step, train, val)
    _window: list[float] = field(default_factory=list)  # training losses since the last evaluation
    _fired: bool = False

    def train(self, loss: float) -> None:
        """One training step's loss."""
        self._window.append(float(loss))

    def validation(self, step: int, val_loss: float) -> OverfitWarning | None:
        """An evaluation's loss; the warning when this evaluation completes the pattern."""
        train = sum(self._window) / len(self._window) if self._window else float("nan")
        self._window = []
        self.evaluations.append((step, train, float(val_loss)))
        if len(self.evaluations) >= 2 and self.evaluations[-1][2] <= self.evaluations[-2][2]:
            self._fired = False  # the streak is broken
        if len(self.evaluations) < 3 or self._fired:
            return None
        (_, t0, v0), (_, t1, v1), (_, t2, v2) = self.evaluations[-3:]
        if not (v0 < v1 < v2 and t0 > t1 > t2):  # NaN (no training steps) compares False
            return None
        self._fired = True
        best_step, _, best_val = min(self.evaluations, key=lambda e: (e[2], e[0]))
        return OverfitWarning(step, (v0, v1, v2), (t0, t1, t2), best_step, best_val)

    @classmethod
    def from_metrics(cls, rows: list[dict]) -> OverfitWatch:
        """The watch as it was after the logged rows (a resumed run)."""
        watch = cls()
        for row in rows:
            if "loss" in row:
                watch.train(row["loss"])
            if "val_loss" in row:
                watch.validation(row["step"], row["val_loss"])
            if row.get("overfitting"):
                watch._fired = True
        return watch

    @classmethod
    def from_metrics_file(cls, path: Path) -> OverfitWatch:
        """`from_metrics` on a metrics.jsonl (missing file or unreadable lines: skipped)."""
        rows = []
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError:
            lines = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
        return cls.from_metrics(rows)
