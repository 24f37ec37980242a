"""The sweep file: a base run config, the settings to vary, and where the trials go.

A sweep YAML (documented in docs/sweeps.md) holds

    base: intents.yaml            # a run config YAML, relative to this file, or an inline mapping
    output_dir: runs/my-sweep     # relative to the working directory, like train.output_dir
    overrides: [train.max_steps=60]   # dotted overrides applied to every trial
    grid: {...} or [{...}, ...]   # every combination (a list of grids is their union)
    random: {...}                 # or: `trials` draws from these, with `seed`
    keep_checkpoints: false       # remove each finished trial's checkpoints/ folder

With `lorakit sweep --backend ray` (lorakit/sweep/ray_tune.py) each trial is a Ray Tune trial:

    resources_per_trial: {cpu: 1, gpu: 0}    # what one trial holds; trials run side by side
    scheduler: asha                          # optional: stop bad trials early (ASHA)
    asha: {grace_period: 2, reduction_factor: 2}   # steps before a stop; keep 1/factor per rung

A grid maps a name to a list of values. A plain value sets the config key the name spells
(`train.lr: [1.0e-4, 3.0e-4]`). A mapping value sets several keys at once, and the name is then
only a label: `rank: [{lora.r: 4, lora.lora_alpha: 8}, {lora.r: 16, lora.lora_alpha: 32}]` ties
alpha to the rank. A list of grids is their union, in order, as scikit-learn's `ParameterGrid`.
A random search maps a name to `{values: [...]}` (one drawn uniformly) or `{low, high, log}`
(uniform, or log-uniform with `log: true`; integers when low and high are both integers).

Each trial's parameters are a flat mapping of dotted keys to values. Its id is the first 10 hex
digits of the SHA-256 of that mapping as sorted JSON, so the same settings get the same id and
folder in every run, whatever the order of the file. Every trial's run config is built and
checked before the first one trains, and every problem is reported at once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random as random_module
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lorakit.config import RunConfig, build_config, load_config, parse_override
from lorakit.errors import ConfigError
from lorakit.schema import build, raise_problems, read_yaml_mapping

MAX_TRIALS = 10_000  # draws of a random search; each trial is a training run
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


@dataclass
class TrialResources:
    cpu: float = 1.0  # CPUs one Ray trial holds (its torch threads follow)
    gpu: float = 0.0  # GPUs one Ray trial holds (fractions share a GPU)


@dataclass
class AshaConfig:
    """Asynchronous successive halving (Li et al. 2018, "A System for Massively Parallel
    Hyperparameter Tuning"; Ray Tune's `ASHAScheduler`) on the validation loss, with time in
    optimizer steps: rungs at grace_period * reduction_factor**k steps."""
    grace_period: int = 1  # optimizer steps before any trial may be stopped
    reduction_factor: int = 2  # at each rung, about 1 in reduction_factor trials goes on


@dataclass
class SweepConfig:
    base: str | dict = ""
    output_dir: str = "runs/sweep"
    overrides: list[str] = field(default_factory=list)
    grid: dict | list | None = None
    random: dict | None = None
    trials: int = 0  # random search only: how many draws
    seed: int = 0  # random search only
    keep_checkpoints: bool = False
    resources_per_trial: TrialResources = field(default_factory=TrialResources)  # Ray backend
    scheduler: Literal["asha"] | None = None  # Ray backend: early stopping on validation loss
    asha: AshaConfig = field(default_factory=AshaConfig)
    source: str | None = field(default=None, metadata={"schema": False})  # the YAML file read

    @property
    def base_dir(self) -> Path:
        return Path(self.source).parent if self.source else Path.cwd()


@dataclass(frozen=True)
class Trial:
    id: str
    params: dict[str, Any]  # dotted key -> value

    def overrides(self) -> list[str]:
        """The trial's settings as dotted overrides (values as JSON, which YAML reads back)."""
        return [f"{key}={json.dumps(value)}" for key, value in self.params.items()]


def trial_id(params: dict[str, Any]) -> str:
    text = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _normalize(value: Any) -> Any:
    """`1e-4` is a string to PyYAML (YAML 1.1) but a number to users; read it as one."""
    if isinstance(value, str) and _FLOAT_RE.match(value.strip()) and any(c in value for c in ".eE"):
        return float(value)
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    return value


def _is_dotted(key: Any) -> bool:
    return isinstance(key, str) and re.fullmatch(r"[A-Za-z_]\w*\.[A-Za-z_]\w*", key) is not None


def _settings(name: str, value: Any, where: str, problems: list[str]) -> dict[str, Any]:
    """The dotted keys one grid or random value sets."""
    if isinstance(value, dict):
        bad = [k for k in value if not _is_dotted(k)]
        for k in bad:
            problems.append(f"{where}: key {k!r} in a mapping value (expected section.key, "
                            "e.g. lora.r)")
        return {k: _normalize(v) for k, v in value.items() if k not in bad}
    if not _is_dotted(name):
        problems.append(f"{where}: {name!r} is not a section.key, so its values must be mappings "
                        "of section.key to value (e.g. {lora.r: 4, lora.lora_alpha: 8})")
        return {}
    return {name: _normalize(value)}


def _combine(parts: list[tuple[str, dict]], where: str, problems: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for name, settings in parts:
        for key, value in settings.items():
            if key in params:
                problems.append(f"{where}: {key} is set by both {owner[key]!r} and {name!r}")
            params[key], owner[key] = value, name
    return params


def grid_trials(grid: dict | list, problems: list[str]) -> list[Trial]:
    """Every combination of every grid, in file order (the last entry varies fastest)."""
    grids = grid if isinstance(grid, list) else [grid]
    trials: list[Trial] = []
    for g, entries in enumerate(grids):
        where = f"grid[{g}]" if isinstance(grid, list) else "grid"
        if not isinstance(entries, dict) or not entries:
            problems.append(f"{where}: expected a non-empty mapping of name -> list of values")
            continue
        choices = []
        for name, values in entries.items():
            if not isinstance(values, list) or not values:
                problems.append(f"{where}.{name}: expected a non-empty list of values, got {values!r}")
                break
            choices.append([(name, _settings(name, v, f"{where}.{name}", problems)) for v in values])
        else:
            for combo in itertools.product(*choices):
                params = _combine(list(combo), where, problems)
                trials.append(Trial(trial_id(params), params))
    return trials


def _draw(rng: random_module.Random, name: str, spec: Any, problems: list[str]) -> Any:
    where = f"random.{name}"
    if not isinstance(spec, dict):
        problems.append(f"{where}: expected {{values: [...]}} or {{low, high, log}}, got {spec!r}")
        return None
    extra = set(spec) - {"values", "low", "high", "log"}
    if extra:
        problems.append(f"{where}: unknown key(s) {', '.join(sorted(map(str, extra)))} "
                        "(expected values, or low, high and log)")
        return None
    if "values" in spec:
        values = spec["values"]
        if not isinstance(values, list) or not values or len(spec) > 1:
            problems.append(f"{where}: values must be a non-empty list, alone")
            return None
        return values[rng.randrange(len(values))]
    low, high, log = _normalize(spec.get("low")), _normalize(spec.get("high")), spec.get("log", False)
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (low, high))
    if not numbers or not low < high or not isinstance(log, bool) or (log and low <= 0):
        problems.append(f"{where}: expected numbers low < high (both > 0 with log: true) and "
                        f"log true/false, got low={low!r} high={high!r} log={log!r}")
        return None
    u = rng.random()
    x = math.exp(math.log(low) + u * (math.log(high) - math.log(low))) if log else low + u * (high - low)
    if isinstance(low, int) and isinstance(high, int):
        return min(max(round(x), low), high)
    return float(f"{x:.4g}")  # short, stable values: readable ids and labels


def random_trials(space: dict, n: int, seed: int, problems: list[str]) -> list[Trial]:
    """`n` draws from a seeded generator, names in file order; repeated draws run once."""
    if not isinstance(space, dict) or not space:
        problems.append("random: expected a non-empty mapping of name -> {values} or {low, high}")
        return []
    rng = random_module.Random(seed)
    trials, seen = [], set()
    for i in range(n):
        drawn = []
        for name, spec in space.items():
            value = _draw(rng, name, spec, problems)
            if problems:
                return []
            drawn.append((name, _settings(name, value, f"random.{name}", problems)))
        params = _combine(drawn, "random", problems)
        trial = Trial(trial_id(params), params)
        if trial.id not in seen:
            seen.add(trial.id)
            trials.append(trial)
    return trials


def _semantic_problems(s: SweepConfig) -> list[str]:
    p = []
    if not s.base:
        p.append("base: missing (expected a run config YAML path or an inline run config)")
    if (s.grid is None) == (s.random is None):
        p.append("grid / random: expected exactly one of them")
    if s.random is not None and not 1 <= s.trials <= MAX_TRIALS:
        p.append(f"trials: got {s.trials} (expected 1 to {MAX_TRIALS} with random)")
    if s.grid is not None and (s.trials or s.seed):
        p.append("trials / seed: only used by random search (remove them, or use random)")
    if not s.output_dir:
        p.append("output_dir: missing")
    res = s.resources_per_trial
    if res.cpu < 0 or res.gpu < 0 or res.cpu + res.gpu <= 0:
        p.append(f"resources_per_trial: got cpu={res.cpu:g} gpu={res.gpu:g} (expected cpu >= 0 "
                 "and gpu >= 0, not both 0)")
    if s.asha.grace_period < 1:
        p.append(f"asha.grace_period: got {s.asha.grace_period} (expected >= 1 step)")
    if s.asha.reduction_factor < 2:
        p.append(f"asha.reduction_factor: got {s.asha.reduction_factor} (expected >= 2)")
    return p


def load_sweep(path: str | Path, sweep_overrides: list[str] = ()) -> SweepConfig:
    """Read and check a sweep YAML; `sweep.key=value` overrides set its own top-level keys."""
    path = Path(path)
    raw = read_yaml_mapping(path, "sweep")
    if "overrides" in raw and raw["overrides"] is None:  # `overrides:` with nothing under it
        raw["overrides"] = []
    problems = []
    for text in sweep_overrides:
        try:
            section, name, value = parse_override(text)
        except ConfigError as e:
            problems.append(str(e))
            continue
        if section != "sweep":
            problems.append(f"override {text!r}: expected sweep.key=value")
        else:
            raw[name] = value
    sweep = build(SweepConfig, raw, problems)
    sweep.source = str(path)
    problems += _semantic_problems(sweep)
    raise_problems(str(path), problems)
    return sweep


def expand(sweep: SweepConfig) -> list[Trial]:
    """The sweep's trials in order, each once (a setting repeated across grids runs once)."""
    problems: list[str] = []
    if sweep.grid is not None:
        trials = grid_trials(sweep.grid, problems)
    else:
        trials = random_trials(sweep.random, sweep.trials, sweep.seed, problems)
    if problems:
        raise ConfigError(f"{sweep.source}: {len(problems)} problem(s):\n  "
                          + "\n  ".join(dict.fromkeys(problems)))
    unique: dict[str, Trial] = {}
    for t in trials:
        unique.setdefault(t.id, t)
    return list(unique.values())


def base_config(sweep: SweepConfig, overrides: list[str] = ()) -> RunConfig:
    """The run config every trial starts from: base + the sweep's overrides + `overrides`."""
    all_overrides = [*sweep.overrides, *overrides]
    if isinstance(sweep.base, dict):
        return build_config(sweep.base, all_overrides, source=f"{sweep.source} (base)",
                            base_dir=sweep.base_dir)
    base_path = Path(sweep.base)
    return load_config(base_path if base_path.is_absolute() else sweep.base_dir / base_path,
                       all_overrides)


def _problem_lines(error: ConfigError) -> list[str]:
    """The listed problems of a ConfigError (its lines after the "N problem(s):" header)."""
    lines = str(error).splitlines()
    return [x.strip() for x in lines[1:]] or lines


def trial_dir(sweep: SweepConfig, trial: Trial) -> Path:
    return Path(sweep.output_dir) / "trials" / trial.id


def plan(sweep: SweepConfig, overrides: list[str] = ()) -> list[tuple[Trial, RunConfig]]:
    """Every trial with its checked run config; one ConfigError lists every problem of all of them.

    A key that the trials vary may not also be overridden (the override would be ignored), and
    `train.output_dir` is the sweep's to set.
    """
    trials = expand(sweep)
    problems: list[str] = []
    swept = {k for t in trials for k in t.params}
    for text in [*sweep.overrides, *overrides]:
        key = text.partition("=")[0].strip()
        if key in swept:
            problems.append(f"override {text!r}: {key} is varied by the sweep")
    if "train.output_dir" in swept or any(o.partition("=")[0].strip() == "train.output_dir"
                                          for o in [*sweep.overrides, *overrides]):
        problems.append("train.output_dir: set by the sweep (each trial writes to "
                        "<output_dir>/trials/<id>); set the sweep's output_dir instead")
    planned, per_trial = [], []
    for trial in trials:
        trial_overrides = [*overrides, *trial.overrides(),
                           f"train.output_dir={json.dumps(str(trial_dir(sweep, trial)))}"]
        try:
            planned.append((trial, base_config(sweep, trial_overrides)))
        except ConfigError as e:
            per_trial.append((trial, _problem_lines(e)))
    # A problem every trial has (a bad base or override) is listed once, the others per trial.
    shared = set.intersection(*(set(lines) for _, lines in per_trial)) \
        if per_trial and len(per_trial) == len(trials) else set()
    problems += [x for x in (per_trial[0][1] if per_trial else []) if x in shared]
    problems += [f"trial {t.id} {t.params}: {x}" for t, lines in per_trial
                 for x in lines if x not in shared]
    if problems:
        problems = list(dict.fromkeys(problems))
        raise ConfigError(f"{sweep.source}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return planned
