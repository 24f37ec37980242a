"""Presets for every family in `lorakit.models.families`: calc's totals equal the parameter
counts the model cards publish (the safetensors totals shown on each Hugging Face model page),
and a tiny model built from the preset's fields (sizes shrunk) has exactly calc's tensors."""

import pytest

from lorakit.calc.params import param_table, shape_from_config
from lorakit.calc.presets import get_preset
from lorakit.models.families import FAMILIES

PUBLISHED = {
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-8b": 8_190_735_360,
    "mistral-7b-v0.3": 7_248_023_552,
    "gemma-2-2b": 2_614_341_888,
    "gemma-3-1b": 999_885_952,
    "phi-3-mini-4k": 3_821_079_552,
    "llama-3-8b": 8_030_261_248,
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_totals_equal_the_published_counts(name):
    assert sum(param_table(shape_from_config(get_preset(name))).values()) == PUBLISHED[name]


def test_every_family_but_gpt2_has_a_modern_preset():
    covered = {get_preset(name)["model_type"] for name in PUBLISHED}
    assert covered == set(FAMILIES) - {"gpt2"}  # GPT-2's is gpt3-175b


@pytest.mark.parametrize("name", [n for n in PUBLISHED if n != "llama-3-8b"])
def test_preset_fields_build_the_model_calc_describes(name):
    """The preset with its sizes shrunk builds in transformers with exactly calc's tensors, so the
    fields the preset leaves out default the same way in both."""
    from transformers import AutoConfig, AutoModelForCausalLM

    small = {**get_preset(name), "vocab_size": 128, "hidden_size": 32, "intermediate_size": 48,
             "num_hidden_layers": 1}
    if "head_dim" in small:
        small["head_dim"] = 8
    fields = {k: v for k, v in small.items() if k != "model_type"}
    fields.update(pad_token_id=0, bos_token_id=0, eos_token_id=0)  # ids inside the small vocabulary
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(small["model_type"], **fields))
    assert param_table(shape_from_config(small)) == {n: p.numel() for n, p in model.named_parameters()}
