"""`results.jsonl`: one JSON line per finished sweep trial, everything the plots need.

A line is appended (flushed and fsynced) when a trial finishes, so a sweep killed at any moment
keeps every finished trial and reruns only the others. Fields of a line:

    id, status               trial id; "ok", "error", or "stopped" (ended early by the Ray
                             backend's ASHA scheduler: its curves and losses up to that step)
    params                   the trial's own settings (dotted key -> value)
    method, r, lora_alpha, lr, target_modules, layers_to_train
                             the trial's effective settings, read from its resolved config
                             (r, lora_alpha, target_modules are null unless method is lora)
    final_train_loss         mean token loss of the last optimizer step
    final_val_loss           validation loss at the end (the best one if early stopping fired)
    best_val_loss            lowest validation loss of any evaluation
    steps, seconds           optimizer steps; wall time of the training call that finished it
    trainable_params, total_params, tokens
    loss_curve               [[step, train loss], ...] from the trial's metrics.jsonl
    val_curve                [[step, validation loss], ...]
    output_dir               the trial's run folder
    error                    "Type: message" of a failed trial (status "error"), else absent

Non-finite numbers are written as null (standard JSON has no NaN or Infinity).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

RESULTS_NAME = "results.jsonl"


def _finite(x):
    return x if x is None or not isinstance(x, float) or math.isfinite(x) else None


def _config_fields(cfg) -> dict:
    lora = cfg.train.method == "lora"
    return {"method": cfg.train.method, "r": cfg.lora.r if lora else None,
            "lora_alpha": cfg.lora.lora_alpha if lora else None, "lr": cfg.train.lr,
            "target_modules": cfg.lora.target_modules if lora else None,
            "layers_to_train": cfg.train.layers_to_train if cfg.train.method == "freeze" else None}


def curves(metrics_path: Path) -> tuple[list, list]:
    """([[step, loss]], [[step, val_loss]]) from a run's metrics.jsonl."""
    loss, val = [], []
    if metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if "loss" in row:
                    loss.append([row["step"], _finite(row["loss"])])
                if "val_loss" in row:
                    val.append([row["step"], _finite(row["val_loss"])])
    return loss, val


def success_record(trial, cfg, result) -> dict:
    loss_curve, val_curve = curves(Path(result.output_dir) / "metrics.jsonl")
    vals = [v for _, v in val_curve if v is not None]
    return {"id": trial.id, "status": "ok", "params": trial.params, **_config_fields(cfg),
            "final_train_loss": _finite(result.train_loss), "final_val_loss": _finite(result.val_loss),
            "best_val_loss": min(vals) if vals else None, "steps": result.steps,
            "seconds": round(result.seconds, 2), "trainable_params": result.trainable_params,
            "total_params": result.total_params, "tokens": result.tokens,
            "loss_curve": loss_curve, "val_curve": val_curve, "output_dir": str(result.output_dir)}


def stopped_record(trial, cfg, reported: list, seconds: float) -> dict:
    """A trial ended early by a scheduler: its curves so far from its metrics.jsonl (or, where this
    machine cannot read the trial's folder, the validation losses it reported)."""
    loss_curve, val_curve = curves(Path(cfg.train.output_dir) / "metrics.jsonl")
    val_curve = val_curve or [[s, _finite(v)] for s, v in reported]
    vals = [v for _, v in val_curve if v is not None]
    steps = max([s for s, _ in loss_curve] + [s for s, _ in val_curve] + [0])
    return {"id": trial.id, "status": "stopped", "params": trial.params, **_config_fields(cfg),
            "final_train_loss": loss_curve[-1][1] if loss_curve else None,
            "final_val_loss": val_curve[-1][1] if val_curve else None,
            "best_val_loss": min(vals) if vals else None, "steps": steps,
            "seconds": round(seconds, 2), "loss_curve": loss_curve, "val_curve": val_curve,
            "output_dir": cfg.train.output_dir}


def failure_record(trial, cfg, error: BaseException, seconds: float) -> dict:
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return {"id": trial.id, "status": "error", "params": trial.params, **_config_fields(cfg),
            "seconds": round(seconds, 2), "output_dir": cfg.train.output_dir,
            "error": f"{type(error).__name__}: {first}"}


def append_result(path: Path, row: dict) -> None:
    """Append one line and make it durable before the next trial starts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():  # a line torn by a crash must not swallow this one
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(row) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def read_results(path: str | Path) -> list[dict]:
    """Every complete line of a results file, in order (a torn last line is left out)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # only a crash mid-write leaves such a line
        if isinstance(row, dict) and "id" in row:
            rows.append(row)
    return rows
