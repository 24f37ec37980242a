"""Base models: `load_base` (bundled name, .gguf file or HF directory) and their identity hash."""

from lorakit.models.head import contiguous_head_input
from lorakit.models.identity import base_identity
from lorakit.models.load import (
    BUNDLED_MODELS,
    DEFAULT_MODEL,
    load_base,
    load_tokenizer,
    resolve_model_dir,
)

__all__ = ["BUNDLED_MODELS", "DEFAULT_MODEL", "base_identity", "contiguous_head_input", "load_base", "load_tokenizer",
           "resolve_model_dir"]
