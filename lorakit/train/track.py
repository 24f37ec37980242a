"""Runs tracked where users look: `train.report_to: [tensorboard, mlflow]`.

Every row the loop appends to metrics.jsonl (training loss, rate, throughput; validation loss;
the overfitting warning) is also written, as the same numbers at the same step, to

- TensorBoard event files in output_dir/tensorboard (`torch.utils.tensorboard.SummaryWriter`,
  which needs the `tensorboard` package; `tensorboard --logdir OUTPUT_DIR/tensorboard` shows them),
  with the run's config as a text entry;
- an MLflow run (`mlflow.MlflowClient`, which `mlflow-skinny` provides): the local file store
  output_dir/mlruns by default (MLflow 3 keeps that store in maintenance mode and asks for
  MLFLOW_ALLOW_FILE_STORE=true, which lorakit sets for file: URIs; `mlflow ui` needs it too), or
  `train.tracking_uri` (a server, a database, or one store shared by the trials of a sweep: one
  run per trial), in the experiment `train.experiment`, with the config flattened into parameters
  (`lora.r`, `train.lr`, ...).

The evaluation after training (`lorakit.eval.study.evaluate_run`) adds its table to the same MLflow
run (eval/adapter/accuracy, eval/base/macro_f1, forgetting/drift, ...) and report.md as an
artifact, and to TensorBoard as scalars at the last step; `tracking.json` in the run folder holds
the MLflow run id so that evaluation, and a resumed run, write to the same run.

Both packages are imported only when asked for (`pip install lorakit[track]`).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from lorakit.errors import ConfigError

REPORT_TO = ("tensorboard", "mlflow")
TRACKING_FILE = "tracking.json"
TENSORBOARD_DIR = "tensorboard"


def flat_params(d: dict, prefix: str = "") -> dict[str, str]:
    """{"lora": {"r": 8}} -> {"lora.r": "8"}: the config as MLflow parameters."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


def numeric(row: dict) -> dict[str, float]:
    """The finite numbers of a metrics row (booleans and the step itself left out)."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _missing(package: str, what: str) -> ConfigError:
    return ConfigError(f"train.report_to: {what} needs the {package} package "
                       f"(pip install 'lorakit[track]', or pip install {package})")


class Tracker:
    """The sinks of one run: a TensorBoard writer and/or an MLflow run, written row by row."""

    def __init__(self, out_dir: Path, report_to: list[str], config: dict | None = None,
                 tracking_uri: str | None = None, experiment: str = "lorakit", resume: bool = False):
        self.out_dir = Path(out_dir)
        self.writer = self.client = self.run_id = None
        state = self._state() if resume else {}
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise _missing("tensorboard", "tensorboard") from None
            self.writer = SummaryWriter(log_dir=str(self.out_dir / TENSORBOARD_DIR))
            if config is not None and not resume:
                import yaml

                self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)
        if "mlflow" in report_to:
            try:
                from mlflow import MlflowClient
            except ImportError:
                raise _missing("mlflow-skinny", "mlflow") from None
            uri = tracking_uri or (self.out_dir / "mlruns").resolve().as_uri()
            if uri.startswith("file:"):
                # MLflow 3 keeps its file store in maintenance mode and refuses it unless asked;
                # it is the one store that needs no database packages (mlflow-skinny has none).
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            self.client = MlflowClient(tracking_uri=uri)
            self.run_id = state.get("mlflow_run_id") if state.get("tracking_uri") == uri else None
            if self.run_id is None:
                found = self.client.get_experiment_by_name(experiment)
                exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
                run = self.client.create_run(exp_id, run_name=self.out_dir.name,
                                             tags={"lorakit.output_dir": str(self.out_dir.resolve())})
                self.run_id = run.info.run_id
                if config is not None:
                    self._params(flat_params(config))
            else:
                self.client.update_run(self.run_id, status="RUNNING")
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / TRACKING_FILE).write_text(json.dumps(
                {"mlflow_run_id": self.run_id, "tracking_uri": uri, "experiment": experiment}) + "\n")

    def _state(self) -> dict:
        try:
            return json.loads((self.out_dir / TRACKING_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def _params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log(self, row: dict, step: int | None = None) -> None:
        """The numbers of one metrics.jsonl row at its step."""
        step = int(row.get("step", 0) if step is None else step)
        values = numeric(row)
        if not values:
            return
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        if self.client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def log_file(self, path: Path) -> None:
        if self.client is not None:
            self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str = "FINISHED") -> None:
        if self.writer is not None:
            self.writer.close()
        if self.client is not None:
            self.client.set_terminated(self.run_id, status=status)


class NoTracker:
    """What the loop holds when `report_to` is empty (or on a rank that does not write)."""

    def log(self, row: dict, step: int | None = None) -> None:
        pass

    def log_file(self, path: Path) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


def open_tracker(cfg, out_dir: Path, is_main: bool = True, resume: bool = False):
    """The run's tracker from `train.report_to` (NoTracker when empty or not the main rank)."""
    t = cfg.train
    if not t.report_to or not is_main:
        return NoTracker()
    return Tracker(out_dir, list(t.report_to), cfg.to_dict(), t.tracking_uri, t.experiment, resume)


def eval_metrics(report: dict) -> dict[str, float]:
    """The evaluation table as flat numbers: eval/<column>/<metric>, forgetting/*, baseline/*."""
    out = {}
    for column in ("base", "adapter"):
        r = report.get(column) if isinstance(report.get(column), dict) else None
        if r is None and column == "adapter" and "task" in report:
            r = report
        if r is None:
            continue
        for key in ("loss", "perplexity", "exact_match", "normalised_match"):
            if key in r:
                out[f"eval/{column}/{key}"] = r[key]
        for key in ("accuracy", "macro_f1", "weighted_f1"):
            if "report" in r and key in r["report"]:
                out[f"eval/{column}/{key}"] = r["report"][key]
    if isinstance(report.get("forgetting"), dict):
        f = report["forgetting"]
        for key in ("drift", "perplexity_ratio", "unchanged"):
            out[f"forgetting/{key}"] = f[key]
    return {k: float(v) for k, v in out.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _last_step(out_dir: Path) -> int:
    try:
        lines = (Path(out_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def log_evaluation(cfg, out_dir: Path, report: dict, files: list[Path] = ()) -> None:
    """The evaluation table into the run's trackers (the MLflow run training used), at the
    run's last step."""
    if not cfg.train.report_to:
        return
    step = _last_step(out_dir)
    tracker = Tracker(out_dir, list(cfg.train.report_to), None, cfg.train.tracking_uri,
                      cfg.train.experiment, resume=True)
    try:
        tracker.log(eval_metrics(report), step)
        for path in files:
            tracker.log_file(path)
    finally:
        tracker.close()
