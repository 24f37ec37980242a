"""Run a sweep: its trials one after another, each an ordinary training run in its own folder.

`run_sweep(path, overrides)` reads the sweep file (`lorakit.sweep.config`), builds and checks
every trial's run config first, then trains each trial with `lorakit.train.loop.train` into
`<output_dir>/trials/<id>/` and appends its line to `<output_dir>/results.jsonl`
(`lorakit.sweep.results`). It is resumable: a trial that already has a line is skipped, and a
trial interrupted after a checkpoint continues from it. A trial that fails is recorded with its
error and the sweep goes on. The eval section of the run config is not run for trials; the
validation loss is what trials are compared on.

With `backend="ray"` the same trials run as Ray Tune trials (lorakit/sweep/ray_tune.py), each
through `run_trial` below, and write the same lines.

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
from lorakit.sweep.config import SweepConfig, Trial, base_config, load_sweep, plan
from lorakit.sweep.results import (
    RESULTS_NAME, append_result, failure_record, read_results, success_record,
)

FINGERPRINT_NAME = "sweep.json"
BACKENDS = ("sequential", "ray")


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


@dataclass
class Prepared:
    """A sweep read and checked, ready to run: every trial's config and the trials already done."""
    sweep: SweepConfig
    planned: list  # [(Trial, RunConfig)] in trial order
    output_dir: Path
    results_path: Path
    done: set  # ids with a line in results.jsonl

    def rows(self) -> list[dict]:
        """This sweep's lines of results.jsonl, in trial order (the last line of a repeated id)."""
        ids = {t.id for t, _ in self.planned}
        latest = {row["id"]: row for row in read_results(self.results_path) if row["id"] in ids}
        return [latest[t.id] for t, _ in self.planned if t.id in latest]


def prepare(path: str | Path, overrides: list[str] = ()) -> Prepared:
    """Read the sweep, plan and check every trial, and find the trials results.jsonl holds."""
    sweep_overrides = [o for o in overrides if o.strip().startswith("sweep.")]
    run_overrides = [o for o in overrides if not o.strip().startswith("sweep.")]
    sweep = load_sweep(path, sweep_overrides)
    planned = plan(sweep, run_overrides)
    out = Path(sweep.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_fingerprint(out, dump_config(base_config(sweep, run_overrides)), str(path))
    results_path = out / RESULTS_NAME
    done = {row["id"] for row in read_results(results_path)}
    return Prepared(sweep, planned, out, results_path, done)


def run_trial(trial: Trial, cfg, keep_checkpoints: bool, model_factory=None, console=None,
              progress: bool = True, on_validation=None) -> dict:
    """Train one trial into its folder (from its last checkpoint when it has one) and return its
    results line; a trial that raises returns its failure line instead."""
    from lorakit.train.checkpoint import latest_checkpoint
    from lorakit.train.loop import train

    run_dir = Path(cfg.train.output_dir)
    started = time.perf_counter()
    try:
        model, tokenizer = model_factory(cfg) if model_factory is not None else (None, None)
        resume = latest_checkpoint(run_dir / "checkpoints") is not None
        result = train(cfg, resume=resume, model=model, tokenizer=tokenizer, console=console,
                       progress=progress, on_validation=on_validation)
        row = success_record(trial, cfg, result)
        if not keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    except Exception as e:  # noqa: BLE001 (one bad trial must not stop the sweep)
        row = failure_record(trial, cfg, e, time.perf_counter() - started)
    model = tokenizer = result = None
    gc.collect()
    return row


def run_sweep(path: str | Path, overrides: list[str] = (), model_factory=None, console=None,
              progress: bool = True, backend: str = "sequential",
              address: str | None = None) -> SweepResult:
    """Run every trial of the sweep at `path` that has no line in results.jsonl yet.

    `overrides` are dotted: `sweep.key=value` sets a key of the sweep file (e.g.
    `sweep.output_dir=runs/x`), anything else overrides every trial's run config.
    `model_factory(cfg) -> (model, tokenizer)` builds each trial's model (tests); by default
    `train` loads `cfg.model` itself. `backend="ray"` runs the trials as Ray Tune trials
    (lorakit/sweep/ray_tune.py), on the Ray cluster at `address` or a local one.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"--backend: got {backend!r} (expected one of {', '.join(BACKENDS)})")
    if address and backend != "ray":
        raise ConfigError("--address: joins a Ray cluster, so it needs --backend ray")
    prepared = prepare(path, overrides)
    if backend == "ray":
        from lorakit.sweep.ray_tune import run_trials_on_ray

        ran, skipped, failed = run_trials_on_ray(prepared, model_factory, console, address)
    else:
        if prepared.sweep.scheduler is not None:
            raise ConfigError(f"{path}: scheduler: {prepared.sweep.scheduler} needs the Ray "
                              "backend (lorakit sweep ... --backend ray), or remove it")
        ran, skipped, failed = _run_in_order(prepared, model_factory, console, progress)
    return SweepResult(prepared.output_dir, prepared.results_path, prepared.rows(), ran, skipped,
                       failed)


def _run_in_order(prepared: Prepared, model_factory, console, progress) -> tuple[int, int, int]:
    def say(text):
        if console is not None:
            console.print(text)

    planned, results_path = prepared.planned, prepared.results_path
    ran = skipped = failed = 0
    for i, (trial, cfg) in enumerate(planned, 1):
        settings = ", ".join(f"{k}={v}" for k, v in trial.params.items())
        if trial.id in prepared.done:
            skipped += 1
            say(f"trial {i}/{len(planned)} {trial.id} ({settings}): already in {results_path}, skipped")
            continue
        say(f"[bold]trial {i}/{len(planned)} {trial.id}[/] ({settings})")
        row = run_trial(trial, cfg, prepared.sweep.keep_checkpoints, model_factory, console, progress)
        if row["status"] == "error":
            failed += 1
            say(f"[red]trial {trial.id} failed:[/] {row['error']}")
        append_result(results_path, row)
        ran += 1
    return ran, skipped, failed
