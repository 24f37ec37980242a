"""Training runs that meet faults: resuming a finished run, a run killed while writing its
adapter or a metrics line, an output_dir under a file, on a read-only or a full disk."""

import io
import json
import shutil

import pytest
import yaml
from rich.console import Console
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.errors import LorakitError, StorageError
from lorakit.train.loop import TrainingError, train
from tests import tiny
from tests.full_disk import tiny_tmpfs
from tests.train.test_loop import config, leave_as_crashed_after, write_toy_data


def _train(cfg, resume=False):
    """Train the tiny model; returns (result, what the run printed)."""
    out = io.StringIO()
    result = train(cfg, resume=resume, model=tiny.tiny_llama(), tokenizer=tiny.tiny_tokenizer(),
                   console=Console(file=out, width=300))  # long tmp paths stay on one line
    return result, out.getvalue()


def _tensors(adapter_dir):
    # Copies: load_file maps the file, and these tests overwrite it afterwards.
    return {k: v.clone() for k, v in load_file(str(adapter_dir / "adapter_model.safetensors")).items()}


def test_resume_of_a_finished_run_says_so_and_exits_0(tmp_path, capsys, monkeypatch):
    # `lorakit train --resume` of a finished run exited 1 with a TypeError (`train_loss=None`).
    model, tok = tiny.tiny_llama(), tiny.tiny_tokenizer()
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    run = tmp_path / "run"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "model": {"name": str(tmp_path / "base"), "dtype": "fp32", "device": "cpu"},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        "data": {"train": str(write_toy_data(tmp_path / "toy.jsonl")), "max_seq_len": 64,
                 "val_fraction": 0.2},
        "train": {"output_dir": str(run), "batch_size": 4, "max_steps": 4},
    }))
    monkeypatch.setenv("COLUMNS", "400")  # the message names a long tmp path; keep it on one line
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    adapter = run / "adapter" / "adapter_model.safetensors"
    before = (adapter.read_bytes(), adapter.stat().st_mtime_ns)
    capsys.readouterr()

    assert main(["train", str(tmp_path / "run.yaml"), "--resume"]) == 0
    said = capsys.readouterr()
    assert "Traceback" not in said.err
    assert "this run had already finished (4 steps, final loss " in said.out
    assert f"its adapter is in {run / 'adapter'}. Nothing to resume" in said.out
    assert (adapter.read_bytes(), adapter.stat().st_mtime_ns) == before  # not rewritten
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "loss" in r] == [1, 2, 3, 4]


def test_finished_run_killed_while_writing_its_adapter(tmp_path):
    # A kill during the final write leaves the last checkpoint, no adapter and an orphan temporary.
    cfg = config(tmp_path, max_steps=6, save_every=3)
    full, _ = _train(cfg)
    run = tmp_path / "run"
    want = _tensors(full.adapter_dir)
    orphan = run / ".adapter.tmp-99999999-0bad"  # a pid beyond pid_max: its writer is gone
    shutil.move(run / "adapter", orphan)
    (orphan / "adapter_model.safetensors").write_bytes(b"torn")
    stale_ckpt = run / "checkpoints" / ".step-00000006.tmp-99999999-0bad"
    stale_ckpt.mkdir()

    resumed, said = _train(cfg, resume=True)
    assert not resumed.already_finished and resumed.steps == 6
    got = _tensors(resumed.adapter_dir)
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)
    assert not orphan.exists() and not stale_ckpt.exists()
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "checkpoints", "config.yaml",
                                                     "metrics.jsonl"]
    said = " ".join(said.split())
    assert "removed 2 unfinished write(s) of an interrupted run" in said
    assert "the run had finished at step 6; writing its missing adapter from the last checkpoint" in said
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert resumed.train_loss == [r["loss"] for r in rows if "loss" in r][-1]
    assert resumed.val_loss == [r["val_loss"] for r in rows if "val_loss" in r][-1]


def test_a_fresh_run_removes_the_leftovers_of_a_killed_one(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / ".step-00000002.tmp-abc123").mkdir(parents=True)  # older mkdtemp name
    (run / ".adapter.tmp-99999999-0bad").mkdir()
    (run / ".metrics.jsonl.tmp-99999999-0bad").write_text("partial")
    result, said = _train(config(tmp_path, max_steps=2))
    assert result.steps == 2
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "checkpoints", "config.yaml",
                                                     "metrics.jsonl"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]
    assert "removed 3 unfinished write(s) of an interrupted run" in " ".join(said.split())


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path):
    # A kill in the middle of an append left `{"step": 5, "lo`; every resume failed with
    # JSONDecodeError.
    cfg = config(tmp_path, max_steps=8, save_every=4, keep_checkpoints=5)
    full, _ = _train(cfg)
    run = tmp_path / "run"
    full_rows = (run / "metrics.jsonl").read_text().splitlines()
    leave_as_crashed_after(run, 4, "adapter")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "epoch": 0.3, "lo')

    resumed, said = _train(cfg, resume=True)
    assert resumed.steps == 8
    assert f"{run / 'metrics.jsonl'}: dropped a torn last line" in " ".join(said.split())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    # The resumed run logs the same losses as the uninterrupted one (bitwise resume).
    want = [json.loads(line)["loss"] for line in full_rows if '"loss"' in line]
    assert [r["loss"] for r in rows if "loss" in r] == want


def test_a_bad_metrics_line_before_the_last_is_named(tmp_path):
    cfg = config(tmp_path, max_steps=4, save_every=2)
    _train(cfg)
    metrics = tmp_path / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(TrainingError) as info:
        _train(cfg, resume=True)
    assert str(info.value) == (f"{metrics}: line 2 is not a JSON object ('garbage'); expected one "
                               "JSON object per line (fix or delete the line, then resume)")


def test_output_dir_under_a_file(tmp_path):
    # Tests run as root, which ignores chmod; a path under a file fails for everyone.
    blocker = tmp_path / "somefile"
    blocker.write_text("not a folder")
    with pytest.raises(LorakitError) as info:
        _train(config(tmp_path, max_steps=2, output_dir=str(blocker / "run")))
    # The config check names it before anything runs (the writer would too, in one line).
    assert f"inside {blocker}, which is a file" in str(info.value)
    assert blocker.read_text() == "not a folder"


def test_output_dir_on_a_read_only_disk(tmp_path):
    with tiny_tmpfs(tmp_path / "ro", read_only=True) as disk:
        with pytest.raises(StorageError) as info:
            _train(config(tmp_path, max_steps=2, output_dir=str(disk / "run")))
        assert str(info.value) == (f"{disk / 'run'} (train.output_dir): cannot create the folder "
                                   "(the file system is read-only); expected a writable folder "
                                   "with free space")


def test_a_disk_that_fills_up_during_training(tmp_path):
    # 64 KiB hold the config and the metrics but not the first checkpoint (~100 KB).
    with tiny_tmpfs(tmp_path / "disk", size_kib=64) as disk:
        run = disk / "run"
        with pytest.raises(StorageError) as info:
            _train(config(tmp_path, max_steps=4, save_every=2, output_dir=str(run)))
        assert str(info.value).startswith(f"{run / 'checkpoints'}/")
        assert str(info.value).endswith(": cannot write (no space left on the device); expected "
                                        "a writable folder with free space")
        # Nothing half-written is left: the checkpoint's temporary folder is gone.
        assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml",
                                                         "metrics.jsonl"]
        assert list((run / "checkpoints").iterdir()) == []
