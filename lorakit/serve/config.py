"""`ServeConfig`: what `lorakit serve` serves and its limits; typed dataclasses, stored in YAML.

As for training runs (lorakit/config.py, after litgpt's `args.py`): the dataclasses are the
schema, read by the one builder of lorakit/schema.py; YAML only stores them, dotted overrides
(`limits.max_tokens=256`) change one field, and every unknown key or bad value is collected and
reported at once in one `ConfigError`.

Limit defaults follow what a small CPU deployment can hold; each one maps to an HTTP status
(lorakit/serve/protocol.py): body size and prompt length 413, `max_tokens` and `n` above their
limits 422, a full queue 503.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lorakit.errors import ConfigError
from lorakit.lora.config import target_modules_problem
from lorakit.schema import build, parse_value, raise_problems, read_yaml_mapping, set_dotted

Dtype = Literal["auto", "fp32", "bf16", "fp16"]
DTYPES = typing.get_args(Dtype)


@dataclass
class Limits:
    max_body_bytes: int = 1_000_000  # request body (413 above)
    max_prompt_tokens: int = 2048  # prompt after the chat template (413 above)
    max_tokens: int = 1024  # the most a request may ask for (422 above)
    default_max_tokens: int = 256  # when a request does not say
    max_n: int = 4  # choices per request (422 above)
    max_prompts: int = 16  # prompts in one /v1/completions list
    max_stop: int = 4  # stop strings per request
    max_concurrent: int = 32  # sequences decoded together in one batch
    max_queue: int = 256  # sequences waiting before new requests get 503


@dataclass
class ServeConfig:
    model: str = "smollm2-135m-instruct"  # base: bundled name, HF directory or .gguf file
    adapters_root: str = "adapters"  # adapter paths given over HTTP must stay inside it
    max_loras: int = 4  # adapter slots active in one batch
    max_cpu_loras: int = 16  # adapters kept in host memory (>= max_loras)
    max_lora_rank: int = 64  # slots are this wide; a higher-rank adapter is refused
    target_modules: list[str] | str = "all-linear"  # layers that get adapter slots
    api_key: str | None = None  # Bearer key for every route but /health; env LORAKIT_API_KEY
    dtype: Dtype = "auto"  # auto: bf16 where the device multiplies bf16 natively, else fp32
    device: str = "auto"  # auto: the first CUDA device when there is one, else the CPU
    pack_weights: bool = True  # bf16 on the CPU: frozen weights prepacked for oneDNN (same results, faster)
    quantize_base: Literal["nf4"] | None = None  # nf4: base linear weights in 4-bit NF4 (QLoRA adapters)
    prefix_cache_mb: int = 256  # keys/values of repeated prompt prefixes, per adapter; 0 = off
    prefix_block: int = 8  # tokens per prefix cache block (prefixes are reused in whole blocks)
    host: str = "127.0.0.1"
    port: int = 8000
    limits: Limits = field(default_factory=Limits)

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get("LORAKIT_API_KEY") or None


def _problems(cfg: ServeConfig) -> list[str]:
    """Ranges and cross-field rules; types and choices were checked by the schema builder."""
    out = []
    for name in ("max_loras", "max_cpu_loras", "max_lora_rank"):
        if getattr(cfg, name) < 1:
            out.append(f"{name}: got {getattr(cfg, name)} (expected >= 1)")
    if cfg.max_cpu_loras < cfg.max_loras:
        out.append(f"max_cpu_loras: got {cfg.max_cpu_loras} (expected >= max_loras = {cfg.max_loras})")
    if (problem := target_modules_problem(cfg.target_modules)) is not None:
        out.append(problem)
    if cfg.prefix_cache_mb < 0:
        out.append(f"prefix_cache_mb: got {cfg.prefix_cache_mb} (expected >= 0; 0 turns it off)")
    if cfg.prefix_block < 1:
        out.append(f"prefix_block: got {cfg.prefix_block} (expected >= 1)")
    if not 0 <= cfg.port <= 65535:
        out.append(f"port: got {cfg.port} (expected 0-65535)")
    if cfg.api_key is not None and len(cfg.api_key) < 8:
        out.append("api_key: shorter than 8 characters")
    for f in dataclasses.fields(Limits):
        if getattr(cfg.limits, f.name) < 1:
            out.append(f"limits.{f.name}: got {getattr(cfg.limits, f.name)} (expected >= 1)")
    if cfg.limits.default_max_tokens > cfg.limits.max_tokens:
        out.append(f"limits.default_max_tokens: {cfg.limits.default_max_tokens} is above "
                   f"limits.max_tokens = {cfg.limits.max_tokens}")
    return out


def build_serve_config(raw: dict | None = None, overrides: list[str] = (),
                       source: str = "config") -> ServeConfig:
    """A checked `ServeConfig` from a dict (as read from YAML) and `key.sub=value` overrides."""
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in (raw or {}).items()}
    problems: list[str] = []
    for text in overrides:
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or not key or "" in key.split("."):
            problems.append(f"override {text!r}: expected key=value (e.g. limits.max_tokens=256)")
            continue
        try:
            set_dotted(raw, key, parse_value(value))
        except ConfigError as e:
            problems.append(f"override {text!r}: {e}")
    cfg = build(ServeConfig, raw, problems)
    problems += _problems(cfg)  # on the values that passed (defaults for the others)
    raise_problems(source, problems)
    return cfg


def load_serve_config(path: str | Path | None = None, overrides: list[str] = ()) -> ServeConfig:
    """Read a serve YAML file (or only defaults and overrides when `path` is None).

    `adapters_root` in a file is relative to that file's folder.
    """
    if path is None:
        return build_serve_config({}, overrides, "defaults")
    path = Path(path)
    raw = read_yaml_mapping(path, "serve config")
    cfg = build_serve_config(raw, overrides, str(path))
    if "adapters_root" in raw and not Path(cfg.adapters_root).is_absolute():
        cfg.adapters_root = str((path.parent / cfg.adapters_root).resolve())
    return cfg
