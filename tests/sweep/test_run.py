"""Sweeps of tiny trials: one results line each, resumable, failures recorded; plots from them."""

import json
import shutil

import pytest
import torch
import yaml

from lorakit.errors import ConfigError
from lorakit.sweep.plot import plot_results
from lorakit.sweep.results import read_results
from lorakit.sweep.run import run_sweep
from tests import tiny
from tests.train.test_loop import write_toy_data

PNG = b"\x89PNG\r\n\x1a\n"


class TinyModels:
    """model_factory for run_sweep: a fresh tiny Llama per trial, counting the trials trained."""

    def __init__(self):
        self.calls = 0

    def __call__(self, cfg):
        self.calls += 1
        model = tiny.tiny_llama()
        with torch.no_grad():
            model.lm_head.weight.mul_(20)  # lets a frozen-head tiny model learn in a few steps
        return model, tiny.tiny_tokenizer()


def write_sweep(tmp_path, grid, **extra):
    write_toy_data(tmp_path / "toy.jsonl")
    base = {"model": {"dtype": "fp32", "device": "cpu"},
            "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
            "data": {"train": "toy.jsonl", "max_seq_len": 64, "val_fraction": 0.1},
            "train": {"batch_size": 4, "lr": 1e-2, "warmup_ratio": 0.1, "max_steps": 6,
                      "eval_every": 3, "save_every": 3}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": base, "output_dir": str(tmp_path / "sweep"), "grid": grid,
                                    **extra}, sort_keys=False))
    return path


def test_three_trials_three_lines_and_a_rerun_trains_nothing(tmp_path):
    path = write_sweep(tmp_path, {"train.lr": [1e-3, 3e-3, 1e-2]})
    models = TinyModels()
    result = run_sweep(path, model_factory=models, progress=False)
    assert models.calls == 3 and (result.ran, result.skipped, result.failed) == (3, 0, 0)
    lines = (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    assert [r["params"] for r in rows] == [{"train.lr": 1e-3}, {"train.lr": 3e-3}, {"train.lr": 1e-2}]
    for row in rows:
        assert row["status"] == "ok" and row["method"] == "lora" and row["steps"] == 6
        assert [s for s, _ in row["loss_curve"]] == list(range(1, 7))
        assert [s for s, _ in row["val_curve"]] == [3, 6]
        assert row["final_val_loss"] == row["val_curve"][-1][1]
        assert row["best_val_loss"] == min(v for _, v in row["val_curve"])
        assert row["final_train_loss"] == row["loss_curve"][-1][1]
        assert row["trainable_params"] > 0 and row["lr"] == row["params"]["train.lr"]
        run_dir = tmp_path / "sweep" / "trials" / row["id"]
        assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
        assert not (run_dir / "checkpoints").exists()  # keep_checkpoints: false
    # A higher rate learns faster in 6 steps: the sweep measured something.
    assert rows[2]["final_val_loss"] < rows[0]["final_val_loss"]

    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "sweep").rglob("metrics.jsonl")}
    again = run_sweep(path, model_factory=models, progress=False)
    assert models.calls == 3 and (again.ran, again.skipped) == (0, 3)
    assert (tmp_path / "sweep" / "results.jsonl").read_text().splitlines() == lines
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert [r["id"] for r in again.rows] == [r["id"] for r in rows]

    # Drop one line (as if that trial never finished): only it runs again, same result.
    (tmp_path / "sweep" / "results.jsonl").write_text("\n".join(lines[:2]) + "\n")
    third = run_sweep(path, model_factory=models, progress=False)
    assert models.calls == 4 and (third.ran, third.skipped) == (1, 2)
    assert third.rows[2]["loss_curve"] == rows[2]["loss_curve"]


def test_a_failing_trial_is_recorded_and_the_rest_still_run(tmp_path):
    path = write_sweep(tmp_path, {"lora.target_modules": [["q_proj"], ["no_such_proj"], ["v_proj"]]})
    models = TinyModels()
    result = run_sweep(path, model_factory=models, progress=False)
    assert models.calls == 3 and (result.ran, result.failed) == (3, 1)
    rows = read_results(tmp_path / "sweep" / "results.jsonl")
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert rows[1]["error"].startswith("TargetModulesError: target_modules ['no_such_proj'] matches no")
    assert rows[1]["params"] == {"lora.target_modules": ["no_such_proj"]}
    again = run_sweep(path, model_factory=models, progress=False)  # recorded failures are not retried
    assert models.calls == 3 and again.skipped == 3


def test_a_rerun_with_another_base_is_refused(tmp_path):
    path = write_sweep(tmp_path, {"train.lr": [1e-3]})
    run_sweep(path, model_factory=TinyModels(), progress=False)
    with pytest.raises(ConfigError, match=r"different base config \(train.max_steps: 6 -> 7\)"):
        run_sweep(path, ["train.max_steps=7"], model_factory=TinyModels(), progress=False)
    other = run_sweep(path, ["train.max_steps=7", f"sweep.output_dir={tmp_path / 'other'}"],
                      model_factory=TinyModels(), progress=False)
    assert other.rows[0]["steps"] == 7


def test_an_interrupted_trial_continues_from_its_checkpoint(tmp_path):
    path = write_sweep(tmp_path, {"train.lr": [1e-2]}, keep_checkpoints=True)
    first = run_sweep(path, model_factory=TinyModels(), progress=False).rows[0]
    # As a crash after step 3 would leave it: no results line, checkpoint 4 only, no adapter.
    run_dir = tmp_path / "sweep" / "trials" / first["id"]
    (tmp_path / "sweep" / "results.jsonl").write_text("")
    for ckpt in (run_dir / "checkpoints").iterdir():
        if ckpt.name != "step-00000003":
            shutil.rmtree(ckpt)
    resumed = run_sweep(path, model_factory=TinyModels(), progress=False).rows[0]
    assert resumed["loss_curve"] == first["loss_curve"] and resumed["val_curve"] == first["val_curve"]


@pytest.fixture(scope="module")
def plotted_sweep(tmp_path_factory):
    """A real tiny sweep: ranks x rates, plus attention-only and MLP-only at one rank and rate."""
    tmp_path = tmp_path_factory.mktemp("plotted")
    grid = [{"rank": [{"lora.r": 2, "lora.lora_alpha": 4}, {"lora.r": 8, "lora.lora_alpha": 16}],
             "train.lr": [3e-3, 1e-2]},
            {"lora.target_modules": [["q_proj", "k_proj", "v_proj", "o_proj"],
                                     ["gate_proj", "up_proj", "down_proj"]],
             "rank": [{"lora.r": 8, "lora.lora_alpha": 16}], "train.lr": [1e-2]}]
    result = run_sweep(write_sweep(tmp_path, grid), model_factory=TinyModels(), progress=False)
    assert result.ran == 6 and result.failed == 0
    return result


def test_plots_and_summary_from_a_real_sweep(plotted_sweep, tmp_path, capsys):
    written = plot_results(plotted_sweep.results_path, tmp_path / "plots")
    assert sorted(written) == ["loss_curves.png", "summary.md", "target_modules.png", "val_loss_vs_lr.png"]
    for name in ("loss_curves.png", "target_modules.png", "val_loss_vs_lr.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    summary = (tmp_path / "plots" / "summary.md").read_text()
    table = [line for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| #")]
    assert len(table) == 6
    best = min(plotted_sweep.rows, key=lambda r: r["final_val_loss"])
    first = [c.strip() for c in table[0].split("|")[1:-1]]
    assert first[:2] == ["1", best["id"]] and first[7] == f"{best['final_val_loss']:.4f}"
    vals = [float(line.split("|")[8]) for line in table]
    assert vals == sorted(vals)
    labels = {line.split("|")[7].strip() for line in table}
    assert labels == {"all-linear", "attention-only", "MLP-only"}
    assert "skipped" not in capsys.readouterr().out


def test_plots_without_their_data_are_skipped_with_a_note(plotted_sweep, tmp_path, capsys):
    # Only the r=2 trials: one target-module setting, so no comparison of target modules.
    rows = [r for r in read_results(plotted_sweep.results_path) if r["r"] == 2]
    one = tmp_path / "results.jsonl"
    one.write_text("".join(json.dumps(r) + "\n" for r in rows[:1]))
    written = plot_results(one, tmp_path / "plots")
    assert sorted(written) == ["loss_curves.png", "summary.md"]
    out = capsys.readouterr().out
    assert "val_loss_vs_lr.png skipped: every setting was tried at a single learning rate" in out
    assert "target_modules.png skipped: a single target-module setting" in out
