"""Training runs as the web UI sees them: the run folders under the runs root, their status and
metrics, and the `lorakit train` processes the page starts, stops and resumes.

A run folder is what `lorakit train` writes (lorakit/train/loop.py): `config.yaml`,
`metrics.jsonl` (one JSON object per logged step or evaluation), `checkpoints/`, and `adapter/`
(or `model/` for full and freeze) once it finished; `eval/report.json` when its config has an
eval section. A run started from the page also has `launch.yaml` (the config it was started
with), `train.log` (the process's output) and `train.exit` (its exit status, written when it ends).

Status, in this order: running (a process started here is alive, or metrics.jsonl changed in the
last minute), finished (the adapter or model folder is there), interrupted (stopped or killed;
resumable when a complete checkpoint exists), failed (the process exited with an error).

A run is started from the page's form through the one config validator (`build_config`), so the
form gets the same messages as a YAML file; its paths must lie inside the runs or adapters root.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from lorakit.atomic import write_text
from lorakit.errors import ConfigError
from lorakit.serve.protocol import ApiError
from lorakit.ui.roots import Roots

LAUNCH = "launch.yaml"
LOG = "train.log"
EXIT = "train.exit"
RUN_FILES = ("config.yaml", LAUNCH, "metrics.jsonl")
RECENT_S = 60.0  # metrics written this recently: a run started elsewhere is still training
STOP_GRACE_S = 15.0  # after Ctrl-C (SIGINT), the process gets this long before SIGKILL
# Exit statuses of a process that was stopped rather than failing: `lorakit` after Ctrl-C (130),
# and killed by SIGINT, SIGKILL or SIGTERM (Popen's negative signal numbers).
_INTERRUPTED = (130, -signal.SIGINT, -signal.SIGKILL, -signal.SIGTERM)
# Config fields that name files: resolved inside the roots before the validator sees them.
PATH_FIELDS = (("data", "train"), ("data", "validation"), ("eval", "data"), ("eval", "corpus"))


def read_metrics(path: Path, since: int = 0) -> list[dict]:
    """The rows of metrics.jsonl from row `since` on; a line being written (torn) is left out."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows[since:]


def _total_steps(log: Path) -> int | None:
    """The step count the run announced in its log ("..., 40 steps, ..."), if it did."""
    try:
        head = log.read_text(errors="replace")[:20_000]
    except FileNotFoundError:
        return None
    found = re.findall(r"(\d+) steps,", head)
    return int(found[-1]) if found else None


def _tail(path: Path, lines: int = 30) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16_000))
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])


class RunManager:
    """The `lorakit train` processes started from the page, one per run folder at most."""

    def __init__(self, roots: Roots):
        self.roots = roots
        self.procs: dict[str, subprocess.Popen] = {}
        self.stopping: set[str] = set()
        self.lock = threading.Lock()

    # -- reading -----------------------------------------------------------------------------

    def alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def status(self, run: Path) -> dict:
        """{"status", "resumable", "returncode"} of a run folder."""
        from lorakit.train.checkpoint import latest_checkpoint

        exit_info = {}
        if (run / EXIT).is_file():
            try:
                exit_info = json.loads((run / EXIT).read_text())
            except (OSError, json.JSONDecodeError):
                exit_info = {}
        code = exit_info.get("returncode")
        proc = self.procs.get(run.name)
        if code is None and proc is not None:  # ended a moment ago: train.exit is being written
            code, exit_info = proc.poll(), {"stopped": run.name in self.stopping}
        metrics = run / "metrics.jsonl"
        recent = metrics.is_file() and time.time() - metrics.stat().st_mtime < RECENT_S
        if self.alive(run.name):
            status = "running"
        elif (run / "adapter").is_dir() or (run / "model").is_dir():
            status = "finished" if code in (None, 0) else "failed"  # e.g. its evaluation failed
        elif code is None and run.name not in self.procs and recent:
            status = "running"  # started in a terminal, still writing metrics
        elif code is None or exit_info.get("stopped") or code in _INTERRUPTED:
            status = "interrupted"
        else:
            status = "failed"
        resumable = status in ("interrupted", "failed") and \
            latest_checkpoint(run / "checkpoints") is not None
        return {"status": status, "resumable": resumable, "returncode": code}

    def runs(self) -> list[dict]:
        """Every run folder under the runs root, newest first, with its status and last loss."""
        out = []
        for run in self.roots.runs.iterdir():
            if not run.is_dir() or run.name.startswith(".") or \
                    not any((run / f).is_file() for f in RUN_FILES):
                continue
            rows = read_metrics(run / "metrics.jsonl")
            losses = [r for r in rows if "loss" in r]
            out.append({"name": run.name, **self.status(run),
                        "step": losses[-1]["step"] if losses else 0,
                        "total_steps": _total_steps(run / LOG),
                        "loss": losses[-1]["loss"] if losses else None,
                        "val_loss": next((r["val_loss"] for r in reversed(rows) if "val_loss" in r),
                                         None),
                        "has_eval": (run / "eval" / "report.json").is_file(),
                        "modified": max((run / f).stat().st_mtime for f in RUN_FILES
                                        if (run / f).is_file())})
        return sorted(out, key=lambda r: -r["modified"])

    def detail(self, name: str) -> dict:
        run = self.roots.run_dir(name)
        if not run.is_dir():
            raise ApiError(404, f"no run {name!r} under {self.roots.runs}", code="not_found")
        config = next((run / f for f in ("config.yaml", LAUNCH) if (run / f).is_file()), None)
        rows = read_metrics(run / "metrics.jsonl")
        return {"name": name, "path": str(run), **self.status(run),
                "total_steps": _total_steps(run / LOG),
                "step": max((r.get("step", 0) for r in rows), default=0),
                "config": config.read_text(errors="replace") if config else None,
                "log": _tail(run / LOG), "has_eval": (run / "eval" / "report.json").is_file(),
                "adapter": "adapter" if (run / "adapter").is_dir() else None}

    # -- starting ----------------------------------------------------------------------------

    def _model_name(self, name: object) -> str:
        """A bundled model name as it is; anything else is a path that must lie in the roots."""
        from lorakit.models.load import BUNDLED_MODELS

        if isinstance(name, str) and name.lower() in BUNDLED_MODELS:
            return name
        return str(self.roots.resolve(name, "model.name"))

    def build(self, name: str, sections: object, overrides: object = ()):
        """The checked RunConfig of the form: its fields, then its `section.key=value` lines for
        the fields it has no box for, paths resolved inside the roots, output_dir the run folder,
        then the one validator (`lorakit.config.build_config`), whose messages are the YAML
        path's. Raises ApiError 400 with them."""
        from lorakit.config import build_config, parse_override

        run = self.roots.run_dir(name)
        if not isinstance(sections, dict):
            raise ApiError(400, "config: expected a mapping of sections (model, lora, data, train, "
                           "eval)", param="config")
        if not isinstance(overrides, (list, tuple)) or not all(isinstance(x, str) for x in overrides):
            raise ApiError(400, "overrides: expected a list of section.key=value lines",
                           param="overrides")
        raw = {k: dict(v) if isinstance(v, dict) else v for k, v in sections.items()}
        for line in overrides:
            try:
                section, key, value = parse_override(line)
            except ConfigError as e:
                raise ApiError(400, str(e), param="overrides", code="invalid_config") from None
            if not isinstance(raw.setdefault(section, {}), dict):
                raise ApiError(400, f"{section}: expected a mapping of keys", param="config")
            raw[section][key] = value
        model = raw.setdefault("model", {})
        if isinstance(model, dict):
            model["name"] = self._model_name(model.get("name", "smollm2-135m-instruct"))
        for section, key in PATH_FIELDS:
            part = raw.get(section)
            if isinstance(part, dict) and part.get(key) not in (None, ""):
                part[key] = str(self.roots.resolve(part[key], f"{section}.{key}"))
        train = raw.setdefault("train", {})
        if isinstance(train, dict):
            given = train.get("output_dir")
            if given not in (None, "", str(run)):
                raise ApiError(400, f"train.output_dir: the UI writes run {name!r} to {run} "
                               "(leave output_dir out)", param="train.output_dir")
            train["output_dir"] = str(run)
        try:
            return build_config(raw, source="form")
        except ConfigError as e:
            raise ApiError(400, str(e), code="invalid_config") from None

    def start(self, name: str, sections: object, overrides: object = ()) -> dict:
        from lorakit.config import dump_config

        cfg = self.build(name, sections, overrides)
        run = self.roots.run_dir(name)
        with self.lock:
            if self.alive(name):
                raise ApiError(409, f"run {name!r} is already training", code="run_running")
            if run.exists() and any(run.iterdir()):
                raise ApiError(409, f"run {name!r} exists ({run}); choose another name, or resume "
                               "it from the Runs screen", code="run_exists")
            run.mkdir(parents=True, exist_ok=True)
            write_text(run / LAUNCH, f"# lorakit train {run / LAUNCH}\n" + dump_config(cfg))
            self._spawn(name, run, resume=False)
        return self.detail(name)

    def resume(self, name: str) -> dict:
        run = self.roots.run_dir(name)
        with self.lock:
            if self.alive(name):
                raise ApiError(409, f"run {name!r} is already training", code="run_running")
            state = self.status(run)
            if not state["resumable"]:
                raise ApiError(400, f"run {name!r} is {state['status']} and has no complete "
                               "checkpoint to resume from", code="not_resumable")
            if not (run / LAUNCH).is_file():
                raise ApiError(400, f"run {name!r} was not started from the UI (no {LAUNCH}); "
                               f"resume it with `lorakit train CONFIG --resume`")
            self._spawn(name, run, resume=True)
        return self.detail(name)

    def _spawn(self, name: str, run: Path, resume: bool) -> None:
        (run / EXIT).unlink(missing_ok=True)
        self.stopping.discard(name)
        argv = [sys.executable, "-m", "lorakit", "train", str(run / LAUNCH)] + \
            (["--resume"] if resume else [])
        log = open(run / LOG, "ab")
        log.write(f"$ lorakit train {run / LAUNCH}{' --resume' if resume else ''}\n".encode())
        log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "100"}
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.roots.runs,
                                env=env, start_new_session=True)
        log.close()
        self.procs[name] = proc
        threading.Thread(target=self._reap, args=(name, run, proc), daemon=True,
                         name=f"lorakit-ui-{name}").start()

    def _reap(self, name: str, run: Path, proc: subprocess.Popen) -> None:
        code = proc.wait()
        write_text(run / EXIT, json.dumps({"returncode": code, "stopped": name in self.stopping,
                                           "ended": time.time()}) + "\n")

    def stop(self, name: str) -> dict:
        """Ctrl-C the run's process group; SIGKILL after STOP_GRACE_S if it is still there."""
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            raise ApiError(409, f"run {name!r} is not training here", code="run_not_running")
        self.stopping.add(name)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        deadline = time.time() + 5
        while not (self.roots.run_dir(name) / EXIT).is_file() and time.time() < deadline:
            time.sleep(0.05)
        return self.detail(name)

    def shutdown(self) -> None:
        """Stop every run still training when the server ends (they can be resumed)."""
        for name, proc in list(self.procs.items()):
            if proc.poll() is None:
                self.stopping.add(name)
                os.killpg(proc.pid, signal.SIGINT)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
