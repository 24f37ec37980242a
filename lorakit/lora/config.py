"""`LoraConfig`: what to adapt and how, with PEFT's field names.

Field names and meanings follow PEFT's `LoraConfig` (peft/tuners/lora/config.py) so that an
`adapter_config.json` we write is read by PEFT and vLLM unchanged, and theirs by us. Scaling follows
Hu et al. 2021 (`alpha / r`) and Kalajdzievski 2023, rsLoRA (`alpha / sqrt(r)`).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from lorakit.errors import AdapterError, ConfigError

ALL_LINEAR = "all-linear"

# PEFT adapter_config.json keys that carry no meaning for a plain LoRA adapter when they hold
# their default value. A key outside this table and our own fields is refused, and so is one of
# these with a non-default value (it would change the adapter's meaning and we do not do it yet).
_PEFT_INERT_DEFAULTS: dict[str, Any] = {
    "auto_mapping": None,
    "revision": None,
    "inference_mode": None,  # either value: it only says whether PEFT froze the adapter
    "peft_version": None,  # either value: informational
    "task_type": None,  # any task type: lorakit works on causal LMs
    "exclude_modules": None,
    "modules_to_save": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "megatron_config": None,
    "megatron_core": None,
    "trainable_token_indices": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "qalora_group_size": None,
    "monteclora_config": None,
    "layer_replication": None,
    "lora_bias": False,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}
# Keys whose value is informational: any value is accepted.
_ANY_VALUE = {"inference_mode", "peft_version", "task_type", "megatron_core",
              "qalora_group_size", "auto_mapping", "revision"}


def _pattern_key(pattern: dict, module_name: str) -> str | None:
    """The first key of `pattern` that matches the end of `module_name` (PEFT's rule), or None."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def _is_rank(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _is_alpha(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def target_modules_problem(tm) -> str | None:
    """What is wrong with a `target_modules` value (names, a regex or 'all-linear'), or None."""
    if isinstance(tm, str):
        if not tm:
            return "target_modules: empty string (expected names, a regex or 'all-linear')"
        if tm != ALL_LINEAR:
            try:
                re.compile(tm)
            except (re.error, RecursionError, OverflowError) as e:
                return f"target_modules: {tm!r} is not a valid regular expression ({e})"
        return None
    if not (isinstance(tm, (list, tuple)) and tm and all(isinstance(t, str) and t for t in tm)):
        return (f"target_modules: got {tm!r} (expected a non-empty list of module names, "
                "a regex string, or 'all-linear')")
    return None


@dataclass
class LoraConfig:
    """A LoRA adapter's shape: rank, scaling, dropout and which modules it adapts.

    `target_modules` is a list of module names (a module matches when its full name equals an
    entry or ends with `.entry`, as in PEFT), a regular expression string matched against the full
    module name (`re.fullmatch`), or `"all-linear"` (every linear layer but the output head).
    """

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False
    bias: str = "none"
    # Set when the wrapped layers store weight transposed (transformers' Conv1D, as in GPT-2).
    # Written for PEFT's sake; our layers read the orientation from the module itself.
    fan_in_fan_out: bool = field(default=False, metadata={"schema": False})
    # DoRA (Liu et al. 2024): a trained magnitude per output row over the normalised direction.
    use_dora: bool = False
    # Per-module rank and alpha: {pattern: value}, pattern matched against the end of the full
    # module name as PEFT's `get_pattern_key` does; the first matching pattern wins.
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    # True: A Kaiming-uniform, B zero. "pissa": A and B from the top-r singular vectors of W
    # (Meng et al. 2024), "pissa_niter_N": the same from N subspace iterations (fast, randomised).
    init_lora_weights: bool | str = True

    @property
    def scaling(self) -> float:
        """The factor on B A x: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def r_for(self, module_name: str) -> int:
        """The rank of the module with this full name (`rank_pattern`, else `r`)."""
        key = _pattern_key(self.rank_pattern, module_name)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, module_name: str) -> float:
        key = _pattern_key(self.alpha_pattern, module_name)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    def scaling_for(self, module_name: str) -> float:
        """The scaling of one module: its alpha over its r (or sqrt(r) with rsLoRA)."""
        r = self.r_for(module_name)
        return self.alpha_for(module_name) / (math.sqrt(r) if self.use_rslora else r)

    @property
    def pissa_niter(self) -> int | None:
        """None for plain init; 0 for full-SVD PiSSA; N for `pissa_niter_N`."""
        init = self.init_lora_weights
        if init == "pissa":
            return 0
        if isinstance(init, str) and re.fullmatch(r"pissa_niter_[1-9]\d*", init):
            return int(init[len("pissa_niter_"):])
        return None

    def problems(self) -> list[str]:
        """Every invalid field, as `field: what is wrong (expected ...)`; empty when valid."""
        out = []
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            out.append(f"r: got {self.r!r} (expected an integer >= 1)")
        if not _is_alpha(self.lora_alpha):
            out.append(f"lora_alpha: got {self.lora_alpha!r} (expected a finite number > 0)")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0 <= self.lora_dropout < 1:
            out.append(f"lora_dropout: got {self.lora_dropout!r} (expected 0 <= p < 1)")
        if (problem := target_modules_problem(self.target_modules)) is not None:
            out.append(problem)
        if self.bias != "none":
            out.append(f"bias: got {self.bias!r} (expected 'none'; bias training is not supported)")
        for name in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{name}: got {getattr(self, name)!r} (expected true or false)")
        for name, ok, expected in (("rank_pattern", _is_rank, "an integer >= 1"),
                                   ("alpha_pattern", _is_alpha, "a finite number > 0")):
            pattern = getattr(self, name)
            if not isinstance(pattern, dict):
                out.append(f"{name}: got {pattern!r} (expected a mapping of module pattern to value)")
                continue
            for key, value in pattern.items():
                if not isinstance(key, str) or not key:
                    out.append(f"{name}: key {key!r} (expected a module name or regex)")
                    continue
                try:
                    re.compile(key)
                except (re.error, RecursionError, OverflowError) as e:
                    out.append(f"{name}.{key}: not a valid regular expression ({e})")
                if not ok(value):
                    out.append(f"{name}.{key}: got {value!r} (expected {expected})")
        if self.init_lora_weights is not True and self.pissa_niter is None:
            out.append(f"init_lora_weights: got {self.init_lora_weights!r} (expected true, "
                       "'pissa' or 'pissa_niter_N' with N >= 1)")
        if self.pissa_niter is not None and self.use_dora:
            out.append("init_lora_weights: PiSSA with use_dora is not supported (pick one)")
        return out

    def validate(self) -> LoraConfig:
        problems = self.problems()
        if problems:
            raise ConfigError("invalid LoRA config:\n  " + "\n  ".join(problems))
        return self

    def to_peft_dict(self, target_modules_resolved: list[str], base_model_name: str | None) -> dict:
        """The `adapter_config.json` content PEFT writes for this adapter.

        `target_modules_resolved` is the sorted set of leaf names actually adapted, so the file
        states exactly what it holds (vLLM reads it to decide which layers get LoRA slots).
        """
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": (target_modules_resolved if isinstance(target_modules_resolved, str)
                               else sorted(target_modules_resolved)),
            "use_rslora": self.use_rslora,
            "bias": self.bias,
            "fan_in_fan_out": self.fan_in_fan_out,
            "inference_mode": True,
            "init_lora_weights": self.init_lora_weights,
            "modules_to_save": None,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "use_dora": self.use_dora,
        }

    @classmethod
    def from_peft_dict(cls, d: dict, source: str) -> LoraConfig:
        """Read an `adapter_config.json` dict; refuse what we would silently mis-read.

        `source` names the file in error messages.
        """
        problems = []
        if d.get("peft_type", "LORA") != "LORA":
            problems.append(f"peft_type: got {d.get('peft_type')!r} (expected 'LORA')")
        ours = set(asdict(cls(target_modules=["x"])))
        kwargs = {}
        for key, value in d.items():
            if key in ours:
                kwargs[key] = value
            elif key in ("peft_type", "base_model_name_or_path"):
                continue
            elif key in _PEFT_INERT_DEFAULTS:
                if key in _ANY_VALUE or value == _PEFT_INERT_DEFAULTS[key] or value in (None, {}, []):
                    continue
                problems.append(f"{key}: got {value!r} (lorakit reads plain LoRA adapters; "
                                f"expected {_PEFT_INERT_DEFAULTS[key]!r})")
            else:
                problems.append(f"{key}: unknown key (not a PEFT LoRA config field lorakit knows)")
        for key in ("r", "lora_alpha", "target_modules"):
            if key not in d:
                problems.append(f"{key}: missing (expected in every LoRA adapter_config.json)")
        if not problems:
            if isinstance(kwargs.get("target_modules"), (set, tuple)):
                kwargs["target_modules"] = sorted(kwargs["target_modules"])
            kwargs.setdefault("lora_dropout", 0.0)
            for key in ("rank_pattern", "alpha_pattern"):
                if kwargs.get(key) is None:
                    kwargs[key] = {}
            init = kwargs.get("init_lora_weights", True)
            if init in (True, False, "gaussian", "eva"):
                # These leave the base weights untouched: they only mattered before training.
                kwargs["init_lora_weights"] = True
            elif not (isinstance(init, str) and init.startswith("pissa")):
                problems.append(
                    f"init_lora_weights: got {init!r}; this initialisation changes the base "
                    "weights and the adapter is only right on that changed base. Convert it to a "
                    "plain LoRA in PEFT first (save_pretrained with "
                    "path_initial_model_for_weight_conversion)")
        if not problems:
            cfg = cls(**kwargs)
            problems = cfg.problems()
        if problems:
            raise AdapterError(f"{source}: bad adapter config:\n  " + "\n  ".join(problems))
        return cfg
