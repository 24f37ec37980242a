"""The Ray backend of `lorakit sweep`: every trial a Ray Tune trial, the same results.jsonl.

`run_trials_on_ray(prepared, ...)` takes a sweep planned by lorakit/sweep/run.py and runs the
trials that have no line in results.jsonl yet as one Ray Tune experiment (Liaw et al. 2018,
"Tune: A Research Platform for Distributed Model Selection and Training"): a grid over the trial
ids, each trial holding `resources_per_trial` of the cluster and training through the same
`run_trial` as the sequential backend, so its line is the same line.

- Lines are written by the driver, one as each trial ends (a Tune callback), so a driver that dies
  keeps every finished trial and a rerun trains only the others; a trial's own checkpoints let it
  continue where it stopped, as in the sequential backend.
- `scheduler: asha` stops trials early on validation loss (`ASHAScheduler`, time in optimizer
  steps): each evaluation but the last is reported from inside the training loop
  (`train(on_validation=...)`), and the report blocks until Tune has decided, so a stopped trial
  stops at that evaluation. Its line has status "stopped", the steps it ran and the curves so far.
- A trial that raises is a line with status "error" (caught in the trial, as sequentially); a
  trial whose process dies (killed, out of memory, node lost) is one too, from Tune's error.

Trial folders are written by the node that runs the trial: on a cluster, the sweep's output_dir
must be on a filesystem every node shares (docs/cluster.md).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from lorakit.sweep.results import append_result, failure_record, stopped_record

ROW_KEY = "lorakit_row"  # the trial's results line, as JSON, in its last report
NEVER = 2 ** 30  # ASHA's max_t: trials end by their own step count, never by ASHA's limit


def _tune_trial(config: dict, planned: dict, keep_checkpoints: bool, model_factory) -> None:
    """One Ray Tune trial: train the trial named by config["trial_id"], report its line."""
    from ray import tune

    from lorakit.sweep.run import run_trial

    trial, cfg = planned[config["trial_id"]]

    def on_validation(step: int, val_loss: float, total_steps: int) -> None:
        if step < total_steps:  # the last evaluation is part of the line; nothing left to stop
            tune.report({"step": step, "val_loss": val_loss})

    row = run_trial(trial, cfg, keep_checkpoints, model_factory, console=None, progress=False,
                    on_validation=on_validation)
    tune.report({ROW_KEY: json.dumps(row)})


def _recorder(prepared, console):
    """The Tune callback that appends each ended trial's line to results.jsonl."""
    from ray.tune import Callback

    planned = {t.id: (t, cfg) for t, cfg in prepared.planned}

    class Recorder(Callback):
        def __init__(self, console):
            self.console = console
            self.written: set[str] = set()
            self.reported: dict[str, list] = {}  # trial id -> [[step, val_loss], ...]
            self.started: dict[str, float] = {}
            self.counts = {"ok": 0, "error": 0, "stopped": 0}

        def _write(self, row: dict) -> None:
            if row["id"] in self.written:
                return
            self.written.add(row["id"])
            append_result(prepared.results_path, row)
            self.counts[row["status"]] = self.counts.get(row["status"], 0) + 1
            if self.console is not None:
                what = {"ok": f"val loss {row.get('final_val_loss')}",
                        "stopped": f"stopped by ASHA at step {row.get('steps')}",
                        "error": f"[red]failed:[/] {row.get('error')}"}[row["status"]]
                settings = ", ".join(f"{k}={v}" for k, v in row["params"].items())
                self.console.print(f"trial {row['id']} ({settings}): {what}")

        def __getstate__(self):  # Tune saves its callbacks with the experiment: not the console
            return {**self.__dict__, "console": None}

        def _seconds(self, tid: str) -> float:
            return time.perf_counter() - self.started.get(tid, time.perf_counter())

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started[trial.config["trial_id"]] = time.perf_counter()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            tid = trial.config["trial_id"]
            if ROW_KEY in result:
                self._write(json.loads(result[ROW_KEY]))
            elif "val_loss" in result:
                self.reported.setdefault(tid, []).append([result["step"], result["val_loss"]])

        def on_trial_complete(self, iteration, trials, trial, **info):
            tid = trial.config["trial_id"]
            if tid not in self.written:  # ended by the scheduler before its last step
                t, cfg = planned[tid]
                self._write(stopped_record(t, cfg, self.reported.get(tid, []), self._seconds(tid)))
                if not prepared.sweep.keep_checkpoints:  # it will not be resumed
                    shutil.rmtree(Path(cfg.train.output_dir) / "checkpoints", ignore_errors=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            tid = trial.config["trial_id"]
            if tid in self.written:
                return
            error = _trial_error(trial)
            t, cfg = planned[tid]
            self._write(failure_record(t, cfg, error, self._seconds(tid)))

    return Recorder(console)  # an argument, not a closure: the saved callback leaves it out


class TrialDied(RuntimeError):
    """A Ray Tune trial whose process ended without a result (killed, out of memory, node lost)."""


def _trial_error(trial) -> BaseException:
    """The exception that ended a Tune trial (its process died, or the trial function raised
    outside `run_trial`), as Tune kept it: pickled, or else the first line of its error.txt."""
    try:
        error = trial.get_pickled_error()
    except Exception:  # noqa: BLE001 (an unreadable error file is still an error)
        error = None
    if error is None:
        lines = []
        if trial.error_file and Path(trial.error_file).exists():
            lines = [x.strip() for x in Path(trial.error_file).read_text().splitlines()
                     if x.strip() and not x.startswith("Failure #")]
        return TrialDied(lines[0] if lines else "the trial's process ended without a result")
    cause = getattr(error, "cause", None)  # RayTaskError wraps the trial's own exception
    return cause if isinstance(cause, BaseException) else error


def _asha_problems(prepared) -> list[str]:
    """ASHA needs evaluations during training, which need validation data."""
    problems = []
    cfg = prepared.planned[0][1] if prepared.planned else None
    if cfg is None:
        return problems
    if not (cfg.data.validation or cfg.data.val_fraction):
        problems.append("scheduler: asha stops trials on validation loss; set data.validation or "
                        "data.val_fraction in the base config")
    if not cfg.train.eval_every:
        problems.append("scheduler: asha needs evaluations during training; set train.eval_every "
                        "(steps) in the base config")
    return problems


def run_trials_on_ray(prepared, model_factory=None, console=None,
                      address: str | None = None) -> tuple[int, int, int]:
    """Run the prepared sweep's missing trials on Ray; (ran, skipped, failed) as run_sweep counts."""
    from lorakit.cluster import connect
    from lorakit.errors import ConfigError

    sweep = prepared.sweep
    if sweep.scheduler == "asha" and (problems := _asha_problems(prepared)):
        raise ConfigError(f"{sweep.source}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    todo = [t.id for t, _ in prepared.planned if t.id not in prepared.done]
    skipped = len(prepared.planned) - len(todo)
    if console is not None and skipped:
        console.print(f"{skipped} trial(s) already in {prepared.results_path}, skipped")
    if not todo:
        return 0, skipped, 0

    connect(address, what="lorakit sweep --backend ray")
    # Our callback writes the results; Tune's own loggers and progress tables would only repeat them.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # the last report has no loss
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # ...so the result files Tune would read back at the end are not there: not a problem here.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    from ray import tune

    planned = {t.id: (t, cfg) for t, cfg in prepared.planned if t.id in set(todo)}
    res = sweep.resources_per_trial
    trainable = tune.with_resources(
        tune.with_parameters(_tune_trial, planned=planned, keep_checkpoints=sweep.keep_checkpoints,
                             model_factory=model_factory),
        {"cpu": res.cpu, "gpu": res.gpu})
    scheduler = None
    if sweep.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="step", metric="val_loss", mode="min", max_t=NEVER,
                                  grace_period=sweep.asha.grace_period,
                                  reduction_factor=sweep.asha.reduction_factor)
    recorder = _recorder(prepared, console)
    if console is not None:
        console.print(f"{len(todo)} trial(s) on Ray, {res.cpu:g} CPU / {res.gpu:g} GPU each"
                      + (f", ASHA (grace period {sweep.asha.grace_period} steps)" if scheduler else ""))
    tuner = tune.Tuner(
        trainable,
        param_space={"trial_id": tune.grid_search(todo)},
        # One process per concurrent trial, reused: a new one would import torch again per trial.
        tune_config=tune.TuneConfig(scheduler=scheduler, num_samples=1, reuse_actors=True),
        run_config=tune.RunConfig(
            name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str((prepared.output_dir / "ray").resolve()),
            callbacks=[recorder], verbose=0,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)))
    tuner.fit()
    counts = recorder.counts
    return len(recorder.written), skipped, counts.get("error", 0)

