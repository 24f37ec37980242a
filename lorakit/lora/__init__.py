"""The LoRA core: config, the training layer, and injection into a loaded model."""

from lorakit.lora.config import ALL_LINEAR, LoraConfig
from lorakit.lora.inject import (
    adapter_parameters,
    count_parameters,
    inject,
    lora_layers,
    lora_state_dict,
    merge,
    merge_and_unload,
    set_adapters_enabled,
    target_names,
    unmerge,
)
from lorakit.lora.layer import LoraLinear

__all__ = [
    "ALL_LINEAR", "LoraConfig", "LoraLinear", "adapter_parameters", "count_parameters", "inject",
    "lora_layers", "lora_state_dict", "merge", "merge_and_unload", "set_adapters_enabled",
    "target_names", "unmerge",
]
