"""Model configs written in, so `lorakit calc` can size well-known models without their files.

Each preset is the subset of the model's `config.json` (transformers field names) that decides
its parameter count and activation memory. Values come from the published config files:
Meta's `meta-llama/Meta-Llama-3-8B` and `meta-llama/Llama-3.1-70B`, HuggingFaceTB's
`SmolLM2-135M-Instruct`, and Brown et al. 2020 ("Language Models are Few-Shot Learners", table
2.1, GPT-3 175B: 96 layers, d_model 12288, 96 heads, context 2048) written as a GPT-2-style
config, since GPT-3 uses the GPT-2 architecture (learned positions, 4x GELU MLP, tied output).
One preset per other family of `lorakit.models.families`, from the published `config.json` of
`Qwen/Qwen2.5-7B`, `Qwen/Qwen3-8B`, `mistralai/Mistral-7B-v0.3`, `google/gemma-2-2b`,
`google/gemma-3-1b-pt` and `microsoft/Phi-3-mini-4k-instruct`; their parameter totals equal the
counts the model cards publish (tests/calc/test_family_presets.py).

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
    "qwen2.5-7b": {
        "model_type": "qwen2",
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
    },
    "qwen3-8b": {
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": False,
        "attention_bias": False,
    },
    "mistral-7b-v0.3": {
        "model_type": "mistral",
        "vocab_size": 32768,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
    },
    "gemma-2-2b": {
        "model_type": "gemma2",
        "vocab_size": 256000,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "hidden_activation": "gelu_pytorch_tanh",
    },
    "gemma-3-1b": {
        "model_type": "gemma3_text",
        "vocab_size": 262144,
        "hidden_size": 1152,
        "intermediate_size": 6912,
        "num_hidden_layers": 26,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "hidden_activation": "gelu_pytorch_tanh",
    },
    "phi-3-mini-4k": {
        "model_type": "phi3",
        "vocab_size": 32064,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
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
