"""`LoraConfig`: what to adapt and how, with PEFT's field names.

Field names and meanings follow PEFT's `LoraConfig` (peft/tuners/lora/config.py) so that an
`adapter_config.json` we write is read by PEFT and vLLM unchanged, and theirs by us. Scaling follows
Hu et al. 2021 (`alpha / r`) and Kalajdzievski 2023, rsLoRA (`alpha / sqrt(r)`).
"""

from __future__ import annotations

import math
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
    "init_lora_weights": None,  # either value: only matters before training
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "megatron_config": None,
    "megatron_core": None,
    "trainable_token_indices": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "use_dora": False,
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
_ANY_VALUE = {"inference_mode", "peft_version", "task_type", "init_lora_weights", "megatron_core",
              "qalora_group_size", "auto_mapping", "revision"}


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
    fan_in_fan_out: bool = False

    @property
    def scaling(self) -> float:
        """The factor on B A x: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def problems(self) -> list[str]:
        """Every invalid field, as `field: what is wrong (expected ...)`; empty when valid."""
        out = []
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            out.append(f"r: got {self.r!r} (expected an integer >= 1)")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            out.append(f"lora_alpha: got {self.lora_alpha!r} (expected a number > 0)")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            out.append(f"lora_dropout: got {self.lora_dropout!r} (expected 0 <= p < 1)")
        tm = self.target_modules
        if isinstance(tm, str):
            if not tm:
                out.append("target_modules: empty string (expected names, a regex or 'all-linear')")
        elif not (isinstance(tm, (list, tuple)) and tm and all(isinstance(t, str) and t for t in tm)):
            out.append(f"target_modules: got {tm!r} (expected a non-empty list of module names, "
                       "a regex string, or 'all-linear')")
        if self.bias != "none":
            out.append(f"bias: got {self.bias!r} (expected 'none'; bias training is not supported)")
        if not isinstance(self.use_rslora, bool):
            out.append(f"use_rslora: got {self.use_rslora!r} (expected true or false)")
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
            "target_modules": sorted(target_modules_resolved),
            "use_rslora": self.use_rslora,
            "bias": self.bias,
            "fan_in_fan_out": self.fan_in_fan_out,
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_dora": False,
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
            cfg = cls(**kwargs)
            problems = cfg.problems()
        if problems:
            raise AdapterError(f"{source}: bad adapter config:\n  " + "\n  ".join(problems))
        return cfg
