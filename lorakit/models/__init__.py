"""Base models: `load_base` (bundled name, .gguf file or HF directory) and their identity hash."""

from lorakit.models.identity import base_identity
from lorakit.models.load import (
    BUNDLED_MODELS,
    DEFAULT_MODEL,
    load_base,
    load_tokenizer,
    resolve_model_dir,
)

__all__ = ["BUNDLED_MODELS", "DEFAULT_MODEL", "base_identity", "load_base", "load_tokenizer",
           "resolve_model_dir"]
