"""`lorakit train` as a user runs it: a process, a YAML file, a base saved to a folder or a GGUF
file. transformers 5.25's hub kernels crashed every validating run at its end, and tests that
only built models in code never saw it."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests import tiny
from tests.models.tiny_gguf import write_llama_gguf
from tests.train.test_loop import write_toy_data


def _base(tmp_path, form):
    model, tok = tiny.tiny_llama(), tiny.tiny_tokenizer()
    if form == "folder":
        model.save_pretrained(tmp_path / "base")
        tok.save_pretrained(tmp_path / "base")
        return tmp_path / "base"
    return write_llama_gguf(tmp_path / "base.gguf", model, tok)


@pytest.mark.parametrize("form", ["folder", "gguf"])
def test_train_with_validation_writes_the_adapter(tmp_path, form):
    run_config = {
        "model": {"name": str(_base(tmp_path, form)), "dtype": "fp32", "device": "cpu"},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        "data": {"train": str(write_toy_data(tmp_path / "toy.jsonl")), "max_seq_len": 64,
                 "val_fraction": 0.2},
        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 4, "max_steps": 6,
                  "eval_every": 3, "lean_activations": True},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_config))
    env = {**os.environ, "LORAKIT_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-m", "lorakit", "train", str(tmp_path / "run.yaml")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "lean activations off" not in done.stdout + done.stderr
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "val_loss" in r]) == 2
