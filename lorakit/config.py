"""The run configuration: typed dataclasses are the schema, YAML only stores them.

One `RunConfig` has the sections model, lora, data, train and eval. `load_config(path,
overrides)` reads YAML, applies dotted `section.key=value` overrides (values parsed as YAML
scalars), and checks every key and type against the dataclasses, collecting every problem and
raising one `ConfigError` that lists them all (litgpt's `args.py` / `validate_args` style).
Unknown keys are errors; nothing is silently fixed.

Data paths in a config file are relative to that file's folder, so a shipped config runs from
anywhere; `train.output_dir` is relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorakit.errors import ConfigError
from lorakit.lora.config import LoraConfig

DTYPES = ("fp32", "bf16", "fp16")
TRAIN_METHODS = ("lora", "full", "freeze")  # see lorakit/train/methods.py


@dataclass
class ModelSection:
    name: str = "smollm2-135m-instruct"  # bundled name, HF directory or .gguf file
    dtype: str = "bf16"  # frozen base weights and compute: fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # nf4: store the frozen base linear weights in 4-bit NormalFloat with double quantization
    # (QLoRA; torchao's NF4Tensor, blocks of 64, scales quantized in blocks of 256). lora only.
    quantize_base: str | None = None


@dataclass
class DataSection:
    train: str = ""
    validation: str | None = None
    val_fraction: float = 0.0  # split this share off `train` when `validation` is not given
    system_prompt: str | None = None
    max_seq_len: int = 512
    train_on_inputs: bool = False
    dedupe: bool = True
    seed: int = 0


@dataclass
class TrainSection:
    output_dir: str = "runs/lorakit"
    # What is trained: lora = adapters on a frozen base (the lora section applies); full = every
    # weight; freeze = only the last `layers_to_train` transformer blocks. full and freeze write a
    # whole model directory (output_dir/model) instead of an adapter, and ignore the lora section.
    method: str = "lora"
    layers_to_train: int = 1  # freeze only
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0
    eval_every: int = 0  # steps; 0 = only at the end
    save_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    early_stopping_patience: int = 0  # evaluations without improvement; 0 = off
    log_every: int = 1
    seed: int = 0
    shuffle: bool = True  # a seeded new order each epoch; false keeps the file's order
    group_by_length: bool = True  # batches of similar length: less padding, same examples per epoch
    padding_free: bool = True  # micro-batches packed into one row, attention kept per example
    lean_activations: bool = True  # RMSNorm/SwiGLU keep only their inputs for backward (less memory)
    fused_lora: bool = True  # one autograd function per plain LoRA layer (adapter product added in place)
    loss_on_supervised_only: bool = True  # output head only where labels are set (same loss, less work)
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    # Speed switches that change numerics slightly (the defaults are the fast ones):
    lora_compute: str = "base"  # base: LoRA matmuls in the base dtype (as autocast); fp32: in fp32
    attn_implementation: str = "auto"  # auto: eager on CPU for short rows (p90 <= 256 tokens), else sdpa
    # LoRA+ (Hayou et al. 2024): B matrices (and DoRA magnitudes) learn at ratio x lr; 0 = off.
    loraplus_lr_ratio: float = 0.0


@dataclass
class EvalSection:
    data: str | None = None  # held-out file evaluated after training
    task: str = "auto"  # auto | classification | generation
    compare: bool = True  # put the base model beside the adapter
    batch_size: int = 16
    max_examples: int = 0  # 0 = all rows


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    source: str | None = None  # the YAML file it was read from (not written back)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        d["lora"].pop("fan_in_fan_out")
        return d


_SECTIONS = {"model": ModelSection, "lora": LoraConfig, "data": DataSection,
             "train": TrainSection, "eval": EvalSection}
_PATH_KEYS = {("data", "train"), ("data", "validation"), ("eval", "data")}


def _type_ok(value: Any, annotation: Any) -> bool:
    """Does a YAML value fit a dataclass field's annotation (str, int, float, bool, list[str], unions)?"""
    if isinstance(annotation, str):
        annotation = eval(annotation, {**vars(typing), "LoraConfig": LoraConfig})  # noqa: S307 (our own annotations)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        return isinstance(value, dict) and all(_type_ok(k, key_type) and _type_ok(v, value_type)
                                               for k, v in value.items())
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _yaml12_float(text: str):
    """`1e-4` is a float in YAML 1.2 but a string to PyYAML (YAML 1.1); read it as users mean it."""
    try:
        return float(text)
    except ValueError:
        return text


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _semantic_problems(cfg: RunConfig) -> list[str]:
    p = [f"lora.{x}" for x in cfg.lora.problems()]
    if cfg.model.dtype not in DTYPES:
        p.append(f"model.dtype: got {cfg.model.dtype!r} (expected one of {', '.join(DTYPES)})")
    if not cfg.data.train:
        p.append("data.train: missing (expected a JSONL, JSON or CSV file)")
    if not 0 <= cfg.data.val_fraction < 1:
        p.append(f"data.val_fraction: got {cfg.data.val_fraction} (expected 0 <= x < 1)")
    if cfg.data.max_seq_len < 8:
        p.append(f"data.max_seq_len: got {cfg.data.max_seq_len} (expected >= 8)")
    t = cfg.train
    if t.method not in TRAIN_METHODS:
        p.append(f"train.method: got {t.method!r} (expected one of {', '.join(TRAIN_METHODS)})")
    for name in ("batch_size", "grad_accum", "log_every", "keep_checkpoints", "layers_to_train"):
        if getattr(t, name) < 1:
            p.append(f"train.{name}: got {getattr(t, name)} (expected >= 1)")
    for name in ("max_steps", "eval_every", "save_every", "early_stopping_patience", "threads"):
        if getattr(t, name) < 0:
            p.append(f"train.{name}: got {getattr(t, name)} (expected >= 0)")
    if t.max_steps == 0 and t.epochs <= 0:
        p.append(f"train.epochs: got {t.epochs} (expected > 0 when train.max_steps is 0)")
    if not t.lr > 0:
        p.append(f"train.lr: got {t.lr} (expected > 0)")
    if not 0 <= t.warmup_ratio < 1:
        p.append(f"train.warmup_ratio: got {t.warmup_ratio} (expected 0 <= x < 1)")
    if not 0 <= t.min_lr_ratio <= 1:
        p.append(f"train.min_lr_ratio: got {t.min_lr_ratio} (expected 0 <= x <= 1)")
    if cfg.model.quantize_base not in (None, "nf4"):
        p.append(f"model.quantize_base: got {cfg.model.quantize_base!r} (expected nf4 or null)")
    if cfg.model.quantize_base and t.method != "lora":
        p.append(f"model.quantize_base: a quantized base trains only adapters (train.method is "
                 f"{t.method!r}; expected lora)")
    if cfg.model.quantize_base and cfg.lora.pissa_niter is not None:
        p.append("lora.init_lora_weights: PiSSA over a quantized base is not supported "
                 "(model.quantize_base is set)")
    if t.loraplus_lr_ratio < 0:
        p.append(f"train.loraplus_lr_ratio: got {t.loraplus_lr_ratio} (expected >= 0; 0 = off)")
    if t.lora_compute not in ("base", "fp32"):
        p.append(f"train.lora_compute: got {t.lora_compute!r} (expected base or fp32)")
    if t.attn_implementation not in ("auto", "eager", "sdpa"):
        p.append(f"train.attn_implementation: got {t.attn_implementation!r} "
                 "(expected auto, eager or sdpa)")
    if cfg.eval.task not in ("auto", "classification", "generation"):
        p.append(f"eval.task: got {cfg.eval.task!r} (expected auto, classification or generation)")
    if t.early_stopping_patience and not (cfg.data.validation or cfg.data.val_fraction):
        p.append("train.early_stopping_patience: needs validation data "
                 "(set data.validation or data.val_fraction)")
    return p


def parse_override(text: str) -> tuple[str, str, Any]:
    """`train.lr=1e-4` -> ("train", "lr", 1e-4); the value is read as a YAML scalar or list."""
    key, sep, raw = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. train.lr=1e-4")
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str) and "," in value and name == "target_modules":
        value = [v.strip() for v in value.split(",") if v.strip()]
    return section, name, value


def build_config(raw: dict, overrides: list[str] = (), source: str | None = None,
                 base_dir: Path | None = None) -> RunConfig:
    """Check a raw mapping plus overrides against the schema; raise once listing every problem."""
    where = source or "config"
    problems: list[str] = []
    merged: dict[str, dict] = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of sections (model, lora, data, train, eval)")
    for section, values in raw.items():
        if section not in _SECTIONS:
            problems.append(f"{section}: unknown section (expected one of {', '.join(_SECTIONS)})")
        elif values is not None and not isinstance(values, dict):
            problems.append(f"{section}: expected a mapping of keys, got {type(values).__name__}")
        else:
            merged[section] = dict(values or {})
    for text in overrides:
        try:
            section, name, value = parse_override(text)
        except ConfigError as e:
            problems.append(str(e))
            continue
        if section not in _SECTIONS:
            problems.append(f"override {text!r}: unknown section {section!r}")
            continue
        merged.setdefault(section, {})[name] = value
        if (section, name) in _PATH_KEYS:
            merged[section][f"__cli_{name}"] = True

    built = {}
    for section, cls in _SECTIONS.items():
        values = merged.get(section, {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in values.items():
            if name.startswith("__cli_"):
                continue
            f = fields.get(name)
            if f is not None and f.type in (float, "float") and isinstance(value, str):
                value = _yaml12_float(value)
            if f is None or (cls is LoraConfig and name == "fan_in_fan_out"):
                close = [k for k in fields if k[:3] == name[:3]]
                hint = f" (did you mean {close[0]}?)" if close else ""
                problems.append(f"{section}.{name}: unknown key{hint}")
            elif not _type_ok(value, f.type):
                problems.append(f"{section}.{name}: got {value!r} (expected {_type_name(f.type)})")
            else:
                if (section, name) in _PATH_KEYS and value and base_dir is not None \
                        and not values.get(f"__cli_{name}"):
                    value = str((base_dir / value).resolve()) if not Path(value).is_absolute() else value
                kwargs[name] = float(value) if f.type in (float, "float") and isinstance(value, int) else value
        try:
            built[section] = cls(**kwargs)
        except TypeError as e:
            problems.append(f"{section}: {e}")
            built[section] = cls()
    cfg = RunConfig(**built, source=source)
    problems += _semantic_problems(cfg) if not problems else []
    if problems:
        raise ConfigError(f"{where}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return cfg


def read_yaml_mapping(path: str | Path, what: str = "config") -> dict:
    """The top-level mapping of a YAML file; ConfigError naming the file (and line) otherwise."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such {what} file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{line} not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of {what} settings at the top level")
    return raw


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    path = Path(path)
    raw = read_yaml_mapping(path, "config")
    return build_config(raw, overrides, source=str(path), base_dir=path.parent)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
