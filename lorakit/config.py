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
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lorakit.errors import ConfigError
from lorakit.lora.config import LoraConfig
from lorakit.schema import build, parse_value, raise_problems, read_yaml_mapping

__all__ = ["RunConfig", "build_config", "dump_config", "load_config", "parse_override",
           "read_yaml_mapping"]

Dtype = Literal["fp32", "bf16", "fp16"]
Method = Literal["lora", "full", "freeze"]  # see lorakit/train/methods.py
DTYPES = typing.get_args(Dtype)
TRAIN_METHODS = typing.get_args(Method)
MAX_THREADS = 1024  # torch.set_num_threads takes a C int; more than this is a typo


@dataclass
class ModelSection:
    name: str = "smollm2-135m-instruct"  # bundled name, HF directory or .gguf file
    dtype: Dtype = "bf16"  # frozen base weights and compute
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # nf4: store the frozen base linear weights in 4-bit NormalFloat with double quantization
    # (QLoRA; torchao's NF4Tensor, blocks of 64, scales quantized in blocks of 256). lora only.
    quantize_base: Literal["nf4"] | None = None


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
    # Against forgetting (lorakit/data/mix.py): other files mixed into every epoch, each
    # {path: FILE, weight: SHARE}, weight = the share of each epoch's rows (0.2 = 1:4), and
    # replay = the share of rows the base itself answers for the shipped general prompts.
    mix: list[dict] = field(default_factory=list)
    replay: float = 0.0


@dataclass
class TrainSection:
    output_dir: str = "runs/lorakit"
    # What is trained: lora = adapters on a frozen base (the lora section applies); full = every
    # weight; freeze = only the last `layers_to_train` transformer blocks. full and freeze write a
    # whole model directory (output_dir/model) instead of an adapter, and ignore the lora section.
    method: Method = "lora"
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
    lora_compute: Literal["base", "fp32"] = "base"  # base: LoRA matmuls in the base dtype (as autocast); fp32: in fp32
    attn_implementation: Literal["auto", "eager", "sdpa"] = "auto"  # auto: eager on CPU for short rows (p90 <= 256 tokens), else sdpa
    # LoRA+ (Hayou et al. 2024): B matrices (and DoRA magnitudes) learn at ratio x lr; 0 = off.
    loraplus_lr_ratio: float = 0.0
    # Under torchrun (lorakit/train/distributed.py): auto = DDP when WORLD_SIZE > 1; fsdp = FSDP2
    # shards weights, gradients and optimizer state per decoder block. batch_size stays global.
    distributed: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    gradient_checkpointing: bool = False  # recompute each block in the backward pass (less memory)
    # Where the metrics also go (lorakit/train/track.py): TensorBoard event files in
    # output_dir/tensorboard, an MLflow run (local store output_dir/mlruns unless tracking_uri).
    report_to: list[Literal["tensorboard", "mlflow"]] = field(default_factory=list)
    tracking_uri: str | None = None  # MLflow: a server, a database or a shared store (sweeps)
    experiment: str = "lorakit"  # MLflow experiment name


@dataclass
class EvalSection:
    data: str | None = None  # held-out file evaluated after training
    task: Literal["auto", "classification", "generation"] = "auto"
    compare: bool = True  # put the base model beside the adapter
    batch_size: int = 16
    max_examples: int = 0  # 0 = all rows
    # Prompting baselines beside the adapter (lorakit/eval/baselines.py), e.g.
    # "zero-shot,few-shot:5,retrieval:5"; few-shot and retrieval draw from data.train.
    baselines: str = ""
    corpus: str | None = None  # passages for retrieval:K on knowledge tasks (.jsonl "text" or text)
    baseline_rows: int = 0  # a seeded subset (data.seed) of the eval rows for the baselines; 0 = all
    # The forgetting probe beside the task score (lorakit/eval/forgetting.py): the adapter's
    # perplexity on the base's own answers to general prompts, and the share of answers unchanged.
    forgetting: bool = False
    max_new_tokens: int = 0  # generation tasks: greedy answer length; 0 = 2 x longest expected + 16


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    # The YAML file it was read from (set by load_config, not written back).
    source: str | None = field(default=None, metadata={"schema": False})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        d["lora"].pop("fan_in_fan_out")
        return d


_SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig) if f.name != "source"}
_PATH_KEYS = {("data", "train"), ("data", "validation"), ("eval", "data"), ("eval", "corpus")}


def _output_dir_problem(output_dir: str) -> str | None:
    """An output_dir that is a file, or below a file, cannot become a run folder."""
    path = Path(output_dir)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == path else f"is inside {p}, which is a file"
                return f"train.output_dir: {output_dir} {what} (expected a folder or a new path)"
            return None
    return None


def _semantic_problems(cfg: RunConfig) -> list[str]:
    """Ranges and cross-field rules; types and choices were checked by the schema builder."""
    p = [f"lora.{x}" for x in cfg.lora.problems()]
    if not cfg.data.train:
        p.append("data.train: missing (expected a JSONL, JSON or CSV file)")
    if not 0 <= cfg.data.val_fraction < 1:
        p.append(f"data.val_fraction: got {cfg.data.val_fraction} (expected 0 <= x < 1)")
    if cfg.data.validation and cfg.data.val_fraction:
        p.append("data.val_fraction: set together with data.validation (expected one of them: "
                 "a validation file, or a share split off data.train)")
    if cfg.data.max_seq_len < 8:
        p.append(f"data.max_seq_len: got {cfg.data.max_seq_len} (expected >= 8)")
    t = cfg.train
    for name in ("batch_size", "grad_accum", "log_every", "keep_checkpoints", "layers_to_train"):
        if getattr(t, name) < 1:
            p.append(f"train.{name}: got {getattr(t, name)} (expected >= 1)")
    for name in ("max_steps", "eval_every", "save_every", "early_stopping_patience", "threads"):
        if getattr(t, name) < 0:
            p.append(f"train.{name}: got {getattr(t, name)} (expected >= 0)")
    if t.threads > MAX_THREADS:
        p.append(f"train.threads: got {t.threads} (expected 0 to {MAX_THREADS}; 0 = torch's default)")
    if t.max_steps == 0 and t.epochs <= 0:
        p.append(f"train.epochs: got {t.epochs} (expected > 0 when train.max_steps is 0)")
    if not t.lr > 0:
        p.append(f"train.lr: got {t.lr} (expected > 0)")
    if t.weight_decay < 0:
        p.append(f"train.weight_decay: got {t.weight_decay} (expected >= 0)")
    if t.max_grad_norm < 0:
        p.append(f"train.max_grad_norm: got {t.max_grad_norm} (expected >= 0; 0 = no clipping)")
    if not 0 <= t.warmup_ratio < 1:
        p.append(f"train.warmup_ratio: got {t.warmup_ratio} (expected 0 <= x < 1)")
    if not 0 <= t.min_lr_ratio <= 1:
        p.append(f"train.min_lr_ratio: got {t.min_lr_ratio} (expected 0 <= x <= 1)")
    if cfg.model.quantize_base and t.method != "lora":
        p.append(f"model.quantize_base: a quantized base trains only adapters (train.method is "
                 f"{t.method!r}; expected lora)")
    if cfg.model.quantize_base and cfg.lora.pissa_niter is not None:
        p.append("lora.init_lora_weights: PiSSA over a quantized base is not supported "
                 "(model.quantize_base is set)")
    if t.loraplus_lr_ratio < 0:
        p.append(f"train.loraplus_lr_ratio: got {t.loraplus_lr_ratio} (expected >= 0; 0 = off)")
    if t.early_stopping_patience and not (cfg.data.validation or cfg.data.val_fraction):
        p.append("train.early_stopping_patience: needs validation data "
                 "(set data.validation or data.val_fraction)")
    if not t.output_dir:
        p.append("train.output_dir: missing (expected a folder for the run)")
    elif problem := _output_dir_problem(t.output_dir):
        p.append(problem)
    if cfg.eval.batch_size < 1:
        p.append(f"eval.batch_size: got {cfg.eval.batch_size} (expected >= 1)")
    if cfg.eval.max_examples < 0:
        p.append(f"eval.max_examples: got {cfg.eval.max_examples} (expected >= 0; 0 = all rows)")
    if cfg.eval.baselines.strip():
        from lorakit.eval.baselines import baseline_problems

        p += [f"eval.baselines: {x}" for x in baseline_problems(cfg.eval.baselines)]
    if cfg.data.mix or cfg.data.replay:
        from lorakit.data.mix import mix_problems

        p += mix_problems(cfg.data.mix, cfg.data.replay)
    if cfg.eval.max_new_tokens < 0:
        p.append(f"eval.max_new_tokens: got {cfg.eval.max_new_tokens} (expected >= 0; 0 = from the answers)")
    if cfg.eval.baseline_rows < 0:
        p.append(f"eval.baseline_rows: got {cfg.eval.baseline_rows} (expected >= 0; 0 = all rows)")
    return p


def parse_override(text: str) -> tuple[str, str, Any]:
    """`train.lr=1e-4` -> ("train", "lr", 1e-4); the value is read as a YAML scalar or list."""
    key, sep, raw = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name or not section:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. train.lr=1e-4")
    try:
        value = parse_value(raw)
    except ConfigError as e:
        raise ConfigError(f"override {text!r}: {e}") from None
    if isinstance(value, str) and "," in value and name == "target_modules":
        value = [v.strip() for v in value.split(",") if v.strip()]
    return section, name, value


def build_config(raw: dict, overrides: list[str] = (), source: str | None = None,
                 base_dir: Path | None = None) -> RunConfig:
    """Check a raw mapping plus overrides against the schema; raise once listing every problem.

    Data paths from the mapping are resolved against `base_dir` (the config file's folder); paths
    given as overrides are taken as they are (relative to the working directory).
    """
    where = source or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of sections ({', '.join(_SECTIONS)})")
    problems: list[str] = []
    sections: dict[str, Any] = {}
    for section, values in raw.items():
        if section not in _SECTIONS:
            problems.append(f"{section}: unknown section (expected one of {', '.join(_SECTIONS)})")
        elif values is not None and not isinstance(values, dict):
            problems.append(f"{section}: expected a mapping of keys, got {type(values).__name__}")
        else:
            sections[section] = dict(values or {})
    from_cli: set[tuple[str, str]] = set()
    for text in overrides:
        try:
            section, name, value = parse_override(text)
        except ConfigError as e:
            problems.append(str(e))
            continue
        if section not in _SECTIONS:
            problems.append(f"override {text!r}: unknown section {section!r} "
                            f"(expected one of {', '.join(_SECTIONS)})")
            continue
        sections.setdefault(section, {})[name] = value
        from_cli.add((section, name))
    cfg = build(RunConfig, sections, problems)
    cfg.source = source
    for section, name in _PATH_KEYS:
        part = getattr(cfg, section)
        value = getattr(part, name)
        if value and base_dir is not None and (section, name) not in from_cli \
                and not Path(value).is_absolute():
            setattr(part, name, str((base_dir / value).resolve()))
    if base_dir is not None and ("data", "mix") not in from_cli:
        for entry in cfg.data.mix:  # data.mix paths, like the other data paths
            if isinstance(entry, dict) and isinstance(entry.get("path"), str) and entry["path"] \
                    and not Path(entry["path"]).is_absolute():
                entry["path"] = str((base_dir / entry["path"]).resolve())
    problems += _semantic_problems(cfg)  # on the values that passed (defaults for the others)
    raise_problems(where, problems)
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    path = Path(path)
    raw = read_yaml_mapping(path, "config")
    return build_config(raw, overrides, source=str(path), base_dir=path.parent)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
