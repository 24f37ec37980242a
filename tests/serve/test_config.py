"""ServeConfig: YAML and dotted overrides fill the dataclasses; every bad key is reported at once."""

import pytest

from lorakit.errors import ConfigError
from lorakit.serve.config import ServeConfig, load_serve_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("# lorakit serve --config serve.yaml\n"
                    "model: smollm2-135m-instruct\nadapters_root: adapters\nmax_loras: 3\n"
                    "target_modules: [q_proj, v_proj]\nlimits:\n  max_tokens: 128\n  default_max_tokens: 64\n")
    cfg = load_serve_config(path, ["limits.max_n=2", "port=9001", "api_key=sk-abcdefgh"])
    assert cfg.max_loras == 3 and cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.limits.max_tokens == 128 and cfg.limits.max_n == 2 and cfg.port == 9001
    assert cfg.adapters_root == str((tmp_path / "adapters").resolve())  # relative to the file
    assert cfg.limits.max_body_bytes == ServeConfig().limits.max_body_bytes
    assert cfg.resolved_api_key() == "sk-abcdefgh"


def test_every_problem_listed(tmp_path, monkeypatch):
    path = tmp_path / "bad.yaml"
    path.write_text("max_lora: 3\nmax_loras: 8\nmax_cpu_loras: 4\nlimits:\n  max_tokens: lots\n"
                    "  maxi: 1\n")
    with pytest.raises(ConfigError) as e:
        load_serve_config(path)
    msg = str(e.value)
    assert "max_lora: unknown key" in msg and "limits.maxi: unknown key" in msg
    assert "limits.max_tokens: got 'lots'" in msg
    with pytest.raises(ConfigError, match="max_cpu_loras: got 4 .expected >= max_loras = 8"):
        load_serve_config(None, ["max_loras=8", "max_cpu_loras=4"])
    with pytest.raises(ConfigError, match=r"prefix_cache_mb: got -1 \(expected >= 0; 0 turns it off\)"):
        load_serve_config(None, ["prefix_cache_mb=-1"])
    with pytest.raises(ConfigError, match=r"dtype: got 'bfloat' \(expected one of auto, fp32, bf16, fp16\)"):
        load_serve_config(None, ["dtype=bfloat"])
    with pytest.raises(ConfigError, match=r"pack_weights: got 'maybe' \(expected bool\)"):
        load_serve_config(None, ["pack_weights=maybe"])
    assert load_serve_config(None, ["pack_weights=false"]).pack_weights is False
    with pytest.raises(ConfigError, match=r"prefix_block: got 0 \(expected >= 1\)"):
        load_serve_config(None, ["prefix_block=0"])
    with pytest.raises(ConfigError, match="broken.yaml: line 2 not valid YAML"):
        (tmp_path / "broken.yaml").write_text("a: [\n")
        load_serve_config(tmp_path / "broken.yaml")
    monkeypatch.setenv("LORAKIT_API_KEY", "sk-from-env-1")
    assert load_serve_config(None).resolved_api_key() == "sk-from-env-1"


def test_serve_values_checked_by_the_shared_builder():
    for override, fragment in [("pack_weights='no'", "pack_weights: got 'no' (expected bool)"),
                               ("target_modules=q_proj[", "target_modules: 'q_proj[' is not a valid "
                                                          "regular expression"),
                               ("quantize_base=nf8", "quantize_base: got 'nf8' (expected nf4 or null)"),
                               ("limits=5", "limits: expected a mapping of its keys, got 5"),
                               ("limits.max_tokens=[1,", "override 'limits.max_tokens=[1,'"),
                               ("port=1e99", "port: got '1e99' (expected int)"),
                               ("max_lora=3", "max_lora: unknown key (did you mean max_loras?)")]:
        with pytest.raises(ConfigError) as e:
            load_serve_config(None, [override])
        assert fragment in str(e.value), (override, str(e.value))
