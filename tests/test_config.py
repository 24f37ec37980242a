"""Run config: YAML + dotted overrides, every problem listed at once, every shipped YAML valid."""

from pathlib import Path

import pytest

from lorakit.config import build_config, dump_config, load_config
from lorakit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_overrides_and_relative_paths(tmp_path):
    p = write(tmp_path, "data:\n  train: d/train.jsonl\ntrain:\n  lr: 1.0e-4\n")
    cfg = load_config(p, ["train.lr=3e-4", "lora.r=32", "lora.target_modules=q_proj,v_proj",
                          "train.epochs=2"])
    assert cfg.train.lr == 3e-4 and cfg.lora.r == 32 and cfg.train.epochs == 2.0
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.train == str(tmp_path / "d" / "train.jsonl")
    again = build_config(__import__("yaml").safe_load(dump_config(cfg)))
    assert again.to_dict() == cfg.to_dict()


def test_every_problem_listed_once(tmp_path):
    p = write(tmp_path, "model:\n  dtyp: bf16\nlora:\n  r: eight\ntrain:\n  lr: -1\n  batch_size: 0\n"
                        "extra:\n  a: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["train.epochs=lots", "nodot=1"])
    msg = str(e.value)
    for fragment in ("model.dtyp: unknown key (did you mean dtype?)", "lora.r: got 'eight' (expected int)",
                     "extra: unknown section", "train.epochs: got 'lots'", "override 'nodot=1'"):
        assert fragment in msg, msg
    assert msg.startswith(f"{p}: 5 problem(s)")


def test_semantic_problems_after_types(tmp_path):
    p = write(tmp_path, "data:\n  train: x.jsonl\ntrain:\n  lr: -1\n  batch_size: 0\nmodel:\n  dtype: fp8\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "train.lr: got -1.0 (expected > 0)" in msg and "train.batch_size: got 0 (expected >= 1)" in msg
    assert "model.dtype: got 'fp8'" in msg


def test_bad_yaml_names_the_line(tmp_path):
    p = write(tmp_path, "train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"run.yaml: line \d+ not valid YAML"):
        load_config(p)


def test_every_shipped_yaml_loads_and_validates():
    shipped = [p for p in ROOT.rglob("*.yaml")
               if ".venv" not in p.parts and ".git" not in p.parts and "runs" not in p.parts]
    run_configs = [p for p in shipped if "data:" in p.read_text()]
    assert run_configs, "the study config ships with the package"
    for p in run_configs:
        first = p.read_text().splitlines()[0]
        assert first.startswith("# lorakit "), f"{p} must start with the command that runs it"
        cfg = load_config(p)
        assert Path(cfg.data.train).exists(), p
