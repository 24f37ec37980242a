"""`lorakit calc` front end: model resolution, argument parsing, the report and its printout."""

import argparse
import json

import pytest
from rich.console import Console

from lorakit.calc.cli import (
    add_calc_arguments,
    calc_main,
    load_model_config,
    parse_target_modules,
    print_calc,
    run_calc,
)
from lorakit.errors import ConfigError, ModelLoadError, TargetModulesError


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_calc_arguments(parser)
    return parser.parse_args(list(argv))


def test_llama_3_8b_lora_from_the_command_line(capsys):
    assert calc_main(_args("--model", "PRESET:llama-3-8b", "--method", "lora", "--r", "8",
                           "--target-modules", "q_proj,v_proj", "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"]["base"] == 8_030_261_248
    assert report["parameters"]["trainable"] == 3_407_872
    assert report["parameters"]["adapted_modules"] == 64
    assert report["adapter_file_bytes"] == 4 * 3_407_872  # fp32 adapter weights
    mem = report["training_memory"]
    assert mem["total"] == pytest.approx(mem["weights"] + mem["gradients"] + mem["optimizer_states"]
                                         + mem["master_weights"] + mem["activations"])


def test_serving_report_for_15_adapters():
    report = run_calc("PRESET:llama-3-8b", "lora", 8, "all-linear", dtype="fp32", serve_adapters=15)
    serving = report["serving"]
    assert serving["base_bytes"] == 32_121_044_992
    assert serving["adapter_bytes_each"] == 83_886_080
    assert serving["total_bytes"] == 33_379_336_192


def test_bundled_model_uses_the_smollm2_preset_without_weights():
    report = run_calc("smollm2-135m-instruct", "lora", 8, ["q_proj", "v_proj"])
    assert report["source"] == "bundled model, sized from preset smollm2-135m"
    assert report["parameters"]["base"] == 134_515_008
    assert report["parameters"]["trainable"] == 460_800


def test_config_json_and_model_directory(tmp_path, gpt2):
    gpt2.config.save_pretrained(tmp_path)
    from_dir = run_calc(str(tmp_path), "full")
    from_file = run_calc(str(tmp_path / "config.json"), "full")
    expected = sum(p.numel() for p in gpt2.parameters())
    assert from_dir["parameters"]["base"] == from_file["parameters"]["base"] == expected
    assert from_dir["model_type"] == "gpt2"


def test_every_method_reports(tmp_path):
    for method in ("full", "lora", "dora", "qlora", "freeze"):
        report = run_calc("PRESET:smollm2-135m", method, 8, "all-linear", layers_to_train=2,
                          batch=2, seq_len=128, serve_adapters=3)
        p, m = report["parameters"], report["training_memory"]
        assert 0 < p["trainable"] <= p["total"]
        assert 0 < m["total_checkpointed"]
        # Checkpointing keeps every block's input, more than 2 trainable top blocks keep anyway.
        assert (m["total_checkpointed"] < m["total"]) == (method != "freeze")
        assert (m["quantization_constants"] > 0) == (method == "qlora")
    freeze = run_calc("PRESET:smollm2-135m", "freeze", layers_to_train=2)
    assert freeze["parameters"]["trainable"] == 2 * 3_540_096  # one SmolLM2 block: 3,540,096
    assert freeze["parameters"]["trainable_layers"] == [28, 29]


def test_parse_target_modules():
    assert parse_target_modules("q_proj, v_proj") == ["q_proj", "v_proj"]
    assert parse_target_modules("q_proj") == ["q_proj"]
    assert parse_target_modules("all-linear") == "all-linear"
    assert parse_target_modules(r".*\.(q|v)_proj") == r".*\.(q|v)_proj"
    with pytest.raises(ConfigError, match="not a valid regex"):
        parse_target_modules("(q_proj")
    regex = run_calc("PRESET:llama-3-8b", "lora", 8, parse_target_modules(r".*\.(q|v)_proj"))
    assert regex["parameters"]["trainable"] == 3_407_872


def test_errors_name_what_was_wrong(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown preset 'PRESET:llama-9'.*PRESET:llama-3-8b"):
        run_calc("PRESET:llama-9")
    with pytest.raises(ModelLoadError, match="not a preset, the bundled model or an existing"):
        run_calc(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="has no config.json"):
        run_calc(str(tmp_path))
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json: not a readable JSON config"):
        load_model_config(str(bad))
    with pytest.raises(TargetModulesError, match="its linear modules are named"):
        run_calc("PRESET:llama-3-8b", "lora", 8, ["c_attn"])
    with pytest.raises(ConfigError) as e:
        run_calc("PRESET:llama-3-8b", "lora", batch=0, dtype="fp8")
    assert "batch: got 0" in str(e.value) and "dtype: got 'fp8'" in str(e.value)


def test_printout_shows_the_numbers():
    console = Console(record=True, width=120)
    print_calc(run_calc("PRESET:llama-3-8b", "qlora", 8, ["q_proj", "v_proj"], serve_adapters=15),
               console)
    text = console.export_text()
    for needle in ("8,030,261,248", "3,407,872", "quantization constants", "base + 15 adapters",
                   "total, gradient checkpointing", "KV cache"):
        assert needle in text


def test_world_size_adds_a_per_rank_column(capsys):
    from lorakit.calc.cli import run_calc
    from lorakit.errors import ConfigError

    report = run_calc(method="full", batch=8, world_size=2, strategy="fsdp")
    rank = report["distributed"]["training_memory_per_rank"]
    assert report["distributed"]["world_size"] == 2
    assert rank["total"] < report["training_memory"]["total"]
    assert run_calc(batch=8)["distributed"] is None
    assert calc_main(_args("--method", "full", "--world-size", "2", "--strategy", "fsdp")) == 0
    assert "per rank, fsdp x 2" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="world_size: got 0"):
        run_calc(world_size=0)
