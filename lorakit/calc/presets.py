"""Model configs written in, so `lorakit calc` can size well-known models without their files.

Each preset is the subset of the model's `config.json` (transformers field names) that decides
its parameter count and activation memory. Values come from the published config files:
Meta's `meta-llama/Meta-Llama-3-8B` and `meta-llama/Llama-3.1-70B`, HuggingFaceTB's
`SmolLM2-135M-Instruct`, and Brown et al. 2020 ("Language Models are Few-Shot Learners", table
2.1, GPT-3 175B: 96 layers, d_model 12288, 96 heads, context 2048) written as a GPT-2-style
config, since GPT-3 uses the GPT-2 architecture (learned positions, 4x GELU MLP, tied output).

Refer to a preset on the command line as `PRESET:<name>`, e.g. `PRESET:llama-3-8b`.
"""

from __future__ import annotations

import copy

from lorakit.errors import ModelLoadError

PRESET_PREFIX = "PRESET:"

# The bundled base model (`lorakit ... --model smollm2-135m-instruct`) is sized from its preset,
# so `calc` never opens the GGUF file.
BUNDLED_MODEL_PRESETS = {"smollm2-135m-instruct": "smollm2-135m"}

PRESETS: dict[str, dict] = {
    "llama-3-8b": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "llama-3.1-70b": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "gpt3-175b": {
        "model_type": "gpt2",
        "vocab_size": 50257,
        "n_embd": 12288,
        "n_layer": 96,
        "n_head": 96,
        "n_inner": None,  # 4 * n_embd, as GPT-2
        "n_positions": 2048,
        "activation_function": "gelu_new",
        "resid_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "attn_pdrop": 0.1,
        "tie_word_embeddings": True,
    },
    "smollm2-135m": {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
    },
}

# Accepted spellings for presets whose names people write differently.
_ALIASES = {
    "meta-llama-3-8b": "llama-3-8b",
    "llama3-8b": "llama-3-8b",
    "llama-3.1-8b": "llama-3-8b",  # same shapes as Llama-3-8B
    "llama3.1-70b": "llama-3.1-70b",
    "gpt-3-175b": "gpt3-175b",
    "gpt3": "gpt3-175b",
    "smollm2-135m-instruct": "smollm2-135m",
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> dict:
    """A copy of the named preset's config dict (case-insensitive; `PRESET:` prefix optional)."""
    key = name[len(PRESET_PREFIX):] if name.upper().startswith(PRESET_PREFIX) else name
    key = key.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in PRESETS:
        raise ModelLoadError(f"unknown preset {name!r} (expected one of: "
                             f"{', '.join(PRESET_PREFIX + n for n in preset_names())})")
    return copy.deepcopy(PRESETS[key])
