"""One builder from YAML mappings to typed config dataclasses (run, serve and sweep files).

The dataclasses are the schema (litgpt's `args.py`): `typing.get_type_hints` gives each field's
type, `Literal[...]` gives its choices, a field whose type is a dataclass is a nested mapping.
`build(cls, raw, problems)` checks every key and value, appends one line per problem to
`problems` (`section.key: got X (expected Y)`), and returns an instance holding the values that
passed and the defaults for the rest, so the caller can go on and report everything at once
(litgpt's `validate_args`). Nothing is coerced behind the user's back: booleans are booleans (a
quoted `"no"` is refused, not read as true), integers are not booleans, floats are finite. The one
reading that differs from PyYAML is YAML 1.2's: `1e-4` is a number (PyYAML 1.1 reads a string).

The file-level helpers are here too: `read_yaml_mapping` (the top-level mapping of a YAML file,
or a ConfigError naming the file and line), `parse_value` for the value of a dotted override,
and `unknown_key`, which suggests the field a user meant, using an alias table of the names
other tools give the same setting (`rank` -> `r`) before string similarity.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from lorakit.errors import ConfigError

INT64_MAX = 2 ** 63 - 1

# Names other tools (PEFT, HF Trainer, torchtune, axolotl, llama.cpp) use for our fields.
ALIASES = {
    "rank": "r", "lora_r": "r", "lora_rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout",
    "lora_dropout_p": "lora_dropout", "rslora": "use_rslora", "dora": "use_dora",
    "lora_target_modules": "target_modules", "target_layers": "target_modules",
    "learning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs",
    "n_epochs": "epochs", "max_grad_clip": "max_grad_norm", "clip_grad_norm": "max_grad_norm",
    "grad_clip": "max_grad_norm", "gradient_accumulation_steps": "grad_accum",
    "gradient_accumulation": "grad_accum", "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size", "warmup": "warmup_ratio", "output": "output_dir",
    "out_dir": "output_dir", "max_length": "max_seq_len", "sequence_len": "max_seq_len",
    "seq_len": "max_seq_len", "cutoff_len": "max_seq_len", "model_name": "name",
    "model_name_or_path": "name", "torch_dtype": "dtype", "precision": "dtype",
    "val_set_size": "val_fraction", "validation_split": "val_fraction", "eval_steps": "eval_every",
    "save_steps": "save_every", "logging_steps": "log_every", "save_total_limit": "keep_checkpoints",
    "max_lora_rank": "max_lora_rank", "api-key": "api_key",
}


def unknown_key(where: str, key: Any, known: list[str]) -> str:
    """`where: unknown key (did you mean X?)`, or the keys there are when nothing is close."""
    if isinstance(key, str):
        alias = ALIASES.get(key.lower().replace("-", "_"))
        close = [alias] if alias in known else difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        if close:
            return f"{where}: unknown key (did you mean {close[0]}?)"
    return f"{where}: unknown key (expected one of {', '.join(known)})"


def type_name(hint: Any) -> str:
    """How a field's type reads in a message: int, bool, str | None, one of a, b, c."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        literals = [a for a in args if typing.get_origin(a) is Literal]
        if literals:
            choices = [str(c) for lit in literals for c in typing.get_args(lit)]
            return " or ".join(choices + ["null"] * (type(None) in args))
        return " | ".join(type_name(a) for a in args)
    if hint is type(None):
        return "None"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in typing.get_args(hint))}]"
    return getattr(hint, "__name__", str(hint))


def _yaml12_float(value: Any) -> Any:
    """`1e-4` is a float in YAML 1.2 but a string to PyYAML (YAML 1.1); read it as users mean it."""
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return value
    return value


_MISMATCH = object()


def check_value(value: Any, hint: Any) -> Any:
    """The value as the field holds it, or `_MISMATCH` when it does not fit `hint`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            out = check_value(value, arg)
            if out is not _MISMATCH:
                return out
        return _MISMATCH
    if origin is Literal:
        ok = any(type(value) is type(a) and value == a for a in typing.get_args(hint))
        return value if ok else _MISMATCH
    if hint is type(None):
        return value if value is None else _MISMATCH
    if hint is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            return _MISMATCH
        (item,) = typing.get_args(hint) or (Any,)
        out = [check_value(v, item) for v in value]
        return _MISMATCH if any(v is _MISMATCH for v in out) else out
    if origin is dict:
        if not isinstance(value, dict):
            return _MISMATCH
        key_type, value_type = typing.get_args(hint) or (Any, Any)
        out = {check_value(k, key_type): check_value(v, value_type) for k, v in value.items()
               if check_value(k, key_type) is not _MISMATCH}
        if len(out) != len(value) or any(v is _MISMATCH for v in out.values()):
            return _MISMATCH
        return out
    if hint is bool:
        return value if isinstance(value, bool) else _MISMATCH
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and -INT64_MAX <= value <= INT64_MAX
        return value if ok else _MISMATCH
    if hint is float:
        value = _yaml12_float(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else _MISMATCH
    if isinstance(hint, type):
        return value if isinstance(value, hint) else _MISMATCH
    return _MISMATCH


def _expected(value: Any, hint: Any) -> str:
    text = type_name(hint)
    if hint is float and isinstance(_yaml12_float(value), (int, float)) and not isinstance(value, bool):
        return "a finite number"
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return f"an int of at most {INT64_MAX}"
    return text


def build(cls: type, raw: Any, problems: list[str], prefix: str = "") -> Any:
    """An instance of the dataclass `cls` from a mapping, every problem appended to `problems`.

    Keys are checked against the dataclass fields, except those marked `metadata={"schema":
    False}` (set by the program, not by a file); a field whose type is a dataclass takes a nested
    mapping (empty: its defaults), its problems reported as `prefix.field.key`.
    """
    where = prefix.rstrip(".") or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping of keys, got {type(raw).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init and f.metadata.get("schema", True)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            problems.append(unknown_key(f"{prefix}{key}", key, fields))
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if value is None or isinstance(value, dict):
                kwargs[key] = build(hint, value, problems, f"{prefix}{key}.")
            else:
                problems.append(f"{prefix}{key}: expected a mapping of its keys, got {value!r}")
            continue
        checked = check_value(value, hint)
        if checked is _MISMATCH:
            problems.append(f"{prefix}{key}: got {_short(value)} (expected {_expected(value, hint)})")
        else:
            kwargs[key] = checked
    return cls(**kwargs)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def parse_value(raw: str) -> Any:
    """The value of a `key=value` override, read as a YAML scalar or flow list/mapping."""
    if not raw.strip():
        return ""
    try:
        return yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError) as e:
        raise ConfigError(f"value {raw!r} is not valid YAML ({getattr(e, 'problem', None) or e})") from None


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """`raw[a][b] = value` for `key` "a.b" (intermediate mappings made as needed)."""
    node = raw
    *parents, leaf = key.split(".")
    for p in parents:
        child = node.get(p)
        if not isinstance(child, dict):
            child = node[p] = {}
        node = child
    node[leaf] = value


def read_yaml_mapping(path: str | Path, what: str = "config") -> dict:
    """The top-level mapping of a YAML file; ConfigError naming the file (and line) otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder (expected a {what} YAML file)")
    if not path.exists():
        raise ConfigError(f"{path}: no such {what} file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the {what} file ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line} is not UTF-8 text (byte 0x{data[e.start]:02x}); "
                          f"expected a UTF-8 {what} YAML file") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{line} not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a {what} file") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of {what} settings at the top level")
    return raw


def raise_problems(where: str, problems: list[str]) -> None:
    """One ConfigError listing every problem (each once, in order), if there are any."""
    if problems:
        problems = list(dict.fromkeys(problems))
        raise ConfigError(f"{where}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
