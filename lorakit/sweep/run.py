"""Run a sweep: its trials one after another, each an ordinary training run in its own folder.

`run_sweep(path, overrides)` reads the sweep file (`lorakit.sweep.config`), builds and checks
every trial's run config first, then trains each trial with `lorakit.train.loop.train` into
`<output_dir>/trials/<id>/` and appends its line to `<output_dir>/results.jsonl`
(`lorakit.sweep.results`). It is resumable: a trial that already has a line is skipped, and a
trial interrupted after a checkpoint continues from it. A trial that fails is recorded with its
error and the sweep goes on. The eval section of the run config is not run for trials; the
validation loss is what trials are compared on.

`<output_dir>/sweep.json` records the base config the results were produced with; rerunning into
the same folder with a different base (other overrides, say) is refused rather than mixing
results of two experiments in one file.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from lorakit.config import dump_config
from lorakit.errors import ConfigError
from lorakit.sweep.config import base_config, load_sweep, plan
from lorakit.sweep.results import (
    RESULTS_NAME, append_result, failure_record, read_results, success_record,
)

FINGERPRINT_NAME = "sweep.json"


@dataclass
class SweepResult:
    output_dir: Path
    results_path: Path
    rows: list[dict]  # this sweep's trials' lines, in trial order
    ran: int
    skipped: int
    failed: int


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_fingerprint(out: Path, base_yaml: str, source: str) -> None:
    """Refuse to mix results of two different base configs in one output folder."""
    path = out / FINGERPRINT_NAME
    if not path.exists():
        path.write_text(json.dumps({"sweep": source, "base": base_yaml}, indent=1) + "\n")
        return
    before = yaml.safe_load(json.loads(path.read_text())["base"])
    now = yaml.safe_load(base_yaml)
    if before != now:
        a, b = _flat(before), _flat(now)
        diff = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
                if a.get(k) != b.get(k)]
        raise ConfigError(f"{out} holds results of a sweep with a different base config "
                          f"({'; '.join(diff[:5])}); use another output_dir (sweep.output_dir=...) "
                          "or delete that folder")


def run_sweep(path: str | Path, overrides: list[str] = (), model_factory=None, console=None,
              progress: bool = True) -> SweepResult:
    """Run every trial of the sweep at `path` that has no line in results.jsonl yet.

    `overrides` are dotted: `sweep.key=value` sets a key of the sweep file (e.g.
    `sweep.output_dir=runs/x`), anything else overrides every trial's run config.
    `model_factory(cfg) -> (model, tokenizer)` builds each trial's model (tests); by default
    `train` loads `cfg.model` itself.
    """
    from lorakit.train.checkpoint import latest_checkpoint
    from lorakit.train.loop import train

    sweep_overrides = [o for o in overrides if o.strip().startswith("sweep.")]
    run_overrides = [o for o in overrides if not o.strip().startswith("sweep.")]
    sweep = load_sweep(path, sweep_overrides)
    planned = plan(sweep, run_overrides)
    out = Path(sweep.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_fingerprint(out, dump_config(base_config(sweep, run_overrides)), str(path))
    results_path = out / RESULTS_NAME
    done = {row["id"] for row in read_results(results_path)}

    def say(text):
        if console is not None:
            console.print(text)

    ran = skipped = failed = 0
    for i, (trial, cfg) in enumerate(planned, 1):
        settings = ", ".join(f"{k}={v}" for k, v in trial.params.items())
        if trial.id in done:
            skipped += 1
            say(f"trial {i}/{len(planned)} {trial.id} ({settings}): already in {results_path}, skipped")
            continue
        say(f"[bold]trial {i}/{len(planned)} {trial.id}[/] ({settings})")
        run_dir = Path(cfg.train.output_dir)
        started = time.perf_counter()
        try:
            model, tokenizer = model_factory(cfg) if model_factory is not None else (None, None)
            resume = latest_checkpoint(run_dir / "checkpoints") is not None
            result = train(cfg, resume=resume, model=model, tokenizer=tokenizer, console=console,
                           progress=progress)
            row = success_record(trial, cfg, result)
            if not sweep.keep_checkpoints:
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        except Exception as e:  # noqa: BLE001 (one bad trial must not stop the sweep)
            row = failure_record(trial, cfg, e, time.perf_counter() - started)
            failed += 1
            say(f"[red]trial {trial.id} failed:[/] {row['error']}")
        model = tokenizer = result = None
        gc.collect()
        append_result(results_path, row)
        ran += 1
    ids = {t.id for t, _ in planned}
    latest = {row["id"]: row for row in read_results(results_path) if row["id"] in ids}
    rows = [latest[t.id] for t, _ in planned if t.id in latest]
    return SweepResult(out, results_path, rows, ran, skipped, failed)
