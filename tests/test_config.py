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
                     "extra: unknown section", "train.epochs: got 'lots'", "override 'nodot=1'",
                     "train.lr: got -1.0 (expected > 0)", "train.batch_size: got 0 (expected >= 1)",
                     "data.train: missing"):
        assert fragment in msg, msg
    assert msg.startswith(f"{p}: 8 problem(s)")


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


@pytest.mark.parametrize("override, fragment", [
    ("train.epochs=.inf", "train.epochs: got inf (expected a finite number)"),
    ("lora.lora_alpha=.nan", "lora.lora_alpha: got nan (expected a finite number)"),
    ("lora.lora_alpha=nan", "lora.lora_alpha: got 'nan' (expected a finite number)"),
    ("train.lr=-.inf", "train.lr: got -inf (expected a finite number)"),
    ("train.max_grad_norm=.nan", "train.max_grad_norm: got nan (expected a finite number)"),
    ("train.weight_decay=-0.1", "train.weight_decay: got -0.1 (expected >= 0)"),
    ("train.max_grad_norm=-1", "train.max_grad_norm: got -1.0 (expected >= 0; 0 = no clipping)"),
    ("lora.alpha_pattern={q_proj: .inf}", "lora.alpha_pattern: got {'q_proj': inf} (expected dict[str, float])"),
    ("lora.target_modules=q_proj(", "lora.target_modules: 'q_proj(' is not a valid regular expression "
                                    "(missing ), unterminated subpattern at position 6)"),
    ("train.shuffle='no'", "train.shuffle: got 'no' (expected bool)"),
    ("train.max_steps=true", "train.max_steps: got True (expected int)"),
    ("train.max_steps=99999999999999999999", "train.max_steps: got 99999999999999999999 (expected an int "
                                             "of at most 9223372036854775807)"),
    ("train.lr=[1,", "override 'train.lr=[1,': value '[1,' is not valid YAML"),
    ("eval.batch_size=0", "eval.batch_size: got 0 (expected >= 1)"),
    ("train.threads=2147483648", "train.threads: got 2147483648 (expected 0 to 1024; 0 = torch's default)"),
    ("eval.task=classify", "eval.task: got 'classify' (expected one of auto, classification, generation)"),
    ("model.quantize_base=nf8", "model.quantize_base: got 'nf8' (expected nf4 or null)"),
    ("lora.rank=8", "lora.rank: unknown key (did you mean r?)"),
    ("lora.alpha=8", "lora.alpha: unknown key (did you mean lora_alpha?)"),
    ("train.learning_rate=1e-4", "train.learning_rate: unknown key (did you mean lr?)"),
    ("train.num_epochs=3", "train.num_epochs: unknown key (did you mean epochs?)"),
    ("lora.fan_in_fan_out=true", "lora.fan_in_fan_out: unknown key"),
])
def test_bad_values_are_config_errors_naming_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        build_config({"data": {"train": "x.jsonl"}}, [override])
    assert fragment in str(e.value), str(e.value)


def test_paths_of_the_wrong_kind(tmp_path):
    (tmp_path / "run.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"run.yaml: is a folder \(expected a config YAML file\)"):
        load_config(tmp_path / "run.yaml")
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ConfigError, match=r"train.output_dir: \S+taken is a file \(expected a folder"):
        build_config({"data": {"train": "x.jsonl"}, "train": {"output_dir": str(tmp_path / "taken")}})
    with pytest.raises(ConfigError, match=r"train.output_dir: \S+taken/run is inside \S+taken, which is a file"):
        build_config({"data": {"train": "x.jsonl"}, "train": {"output_dir": str(tmp_path / "taken" / "run")}})
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"data:\n  train: caf\xe9.jsonl\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml: line 2 is not UTF-8 text \(byte 0xe9\)"):
        load_config(latin1)
    deep = tmp_path / "deep.yaml"
    deep.write_text("data: " + "[" * 20000 + "]" * 20000 + "\n")
    with pytest.raises(ConfigError, match="deep.yaml"):
        load_config(deep)


def test_a_utf8_bom_config_loads(tmp_path):
    p = tmp_path / "bom.yaml"
    p.write_bytes("\ufeffdata:\n  train: d.jsonl\n".encode())
    assert load_config(p).data.train == str(tmp_path / "d.jsonl")
