"""The Ray backend of `lorakit sweep` on a local Ray runtime (2 CPUs): the same results.jsonl as
the sequential backend, ASHA early stopping, a killed driver resumed, a failing trial recorded."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from lorakit.sweep.plot import plot_results
from lorakit.sweep.results import read_results
from lorakit.sweep.run import run_sweep
from tests import tiny
from tests.ray_local import local_ray
from tests.train.test_loop import write_toy_data


@pytest.fixture(scope="module")
def ray_address():
    return local_ray()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The tiny Llama as a Hugging Face folder (every trial loads it, on Ray or not); its head
    scaled up so that it learns in a few steps."""
    path = tmp_path_factory.mktemp("tiny-base")
    model = tiny.tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    model.save_pretrained(path)
    tiny.tiny_tokenizer().save_pretrained(path)
    return path


def write_sweep(tmp_path, base_dir, grid, name="sweep", **extra):
    write_toy_data(tmp_path / "toy.jsonl")
    base = {"model": {"name": str(base_dir), "dtype": "fp32", "device": "cpu"},
            "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
            "data": {"train": "toy.jsonl", "max_seq_len": 64, "val_fraction": 0.1},
            "train": {"batch_size": 4, "lr": 1e-2, "warmup_ratio": 0.1, "max_steps": 6,
                      "eval_every": 3, "save_every": 3, "threads": 1}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"base": base, "output_dir": str(tmp_path / name), "grid": grid,
                                    **extra}, sort_keys=False))
    return path


def by_id(rows):
    return {r["id"]: r for r in rows}


def test_ray_grid_writes_the_sequential_lines_and_records_a_failing_trial(ray_address, base_dir,
                                                                         tmp_path):
    grid = [{"lora.r": [2, 4], "train.lr": [3e-3, 1e-2]},
            {"lora.target_modules": [["no_such_proj"]]}]
    sequential = run_sweep(write_sweep(tmp_path, base_dir, grid, "seq"), progress=False)
    on_ray = run_sweep(write_sweep(tmp_path, base_dir, grid, "ray",
                                   resources_per_trial={"cpu": 1}), backend="ray")
    assert (on_ray.ran, on_ray.skipped, on_ray.failed) == (5, 0, 1)
    seq, ray_rows = by_id(sequential.rows), by_id(read_results(on_ray.results_path))
    assert sorted(seq) == sorted(ray_rows) and len(seq) == 5
    for tid, want in seq.items():
        got = ray_rows[tid]
        assert got["status"] == want["status"] and got["params"] == want["params"]
        if want["status"] == "error":  # raised inside the trial; the others went on
            assert got["error"] == want["error"]
            assert got["error"].startswith("TargetModulesError: target_modules ['no_such_proj']")
            continue
        for key in ("method", "r", "lora_alpha", "lr", "target_modules", "steps",
                    "trainable_params", "total_params", "tokens"):
            assert got[key] == want[key], key
        for key in ("final_train_loss", "final_val_loss", "best_val_loss"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), key
        assert [s for s, _ in got["loss_curve"]] == list(range(1, 7))
        for (_, a), (_, b) in zip(got["loss_curve"], want["loss_curve"]):
            assert a == pytest.approx(b, abs=1e-6)
        assert got["output_dir"] == want["output_dir"].replace(f"{os.sep}seq{os.sep}", f"{os.sep}ray{os.sep}")
        assert (tmp_path / "ray" / "trials" / tid / "adapter" / "adapter_model.safetensors").exists()
    # The trials learnt something different from each other: the comparison can fail.
    assert len({round(r["final_val_loss"], 4) for r in seq.values() if r["status"] == "ok"}) == 4


def test_asha_stops_the_clearly_worse_trial_early(ray_address, base_dir, tmp_path):
    # One trial at a time (2 CPUs each), the good rate first: at the first rung (step 2) the
    # tiny rate's validation loss is above the good one's, so ASHA stops it there.
    path = write_sweep(tmp_path, base_dir, {"train.lr": [1e-2, 1e-6]},
                       resources_per_trial={"cpu": 2}, scheduler="asha",
                       asha={"grace_period": 2, "reduction_factor": 2})
    result = run_sweep(path, ["train.max_steps=8", "train.eval_every=2"], backend="ray")
    good, bad = result.rows
    assert (good["params"]["train.lr"], bad["params"]["train.lr"]) == (1e-2, 1e-6)
    assert good["status"] == "ok" and good["steps"] == 8
    assert bad["status"] == "stopped" and bad["steps"] == 2, bad
    assert bad["final_val_loss"] > good["val_curve"][0][1]
    assert [s for s, _ in bad["loss_curve"]] == [1, 2] and [s for s, _ in bad["val_curve"]] == [2]
    bad_dir = tmp_path / "sweep" / "trials" / bad["id"]
    assert not (bad_dir / "adapter").exists() and not (bad_dir / "checkpoints").exists()
    again = run_sweep(path, ["train.max_steps=8", "train.eval_every=2"], backend="ray")
    assert (again.ran, again.skipped) == (0, 2)  # a stopped trial is a result, not a gap
    written = plot_results(result.results_path, tmp_path / "plots")
    assert "loss_curves.png" in written
    summary = written["summary.md"].read_text()
    assert "2 trials from" in summary and "1 finished, 1 stopped early, 0 failed" in summary
    assert f"- {bad['id']} (train.lr=1e-06): stopped at step 2" in summary


def test_a_killed_driver_is_resumed_with_only_the_missing_trials(ray_address, base_dir, tmp_path):
    path = write_sweep(tmp_path, base_dir, {"train.lr": [1e-3, 3e-3, 1e-2, 3e-2]},
                       resources_per_trial={"cpu": 2})
    results = tmp_path / "sweep" / "results.jsonl"
    log = tmp_path / "driver.log"
    with open(log, "w") as out:  # a second driver joins the test's Ray runtime, as on a cluster
        driver = subprocess.Popen([sys.executable, "-m", "lorakit", "sweep", str(path),
                                   "--backend", "ray", "--address", ray_address],
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while len(read_results(results)) < 2:
            assert driver.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
    first = read_results(results)
    assert len(first) == 2 and all(r["status"] == "ok" for r in first)
    kept = {r["id"]: (tmp_path / "sweep" / "trials" / r["id"] / "metrics.jsonl").stat().st_mtime_ns
            for r in first}
    resumed = run_sweep(path, backend="ray", address=ray_address)
    assert (resumed.ran, resumed.skipped, resumed.failed) == (2, 2, 0)
    rows = read_results(results)
    assert rows[:2] == first and len(rows) == 4 and len({r["id"] for r in rows}) == 4
    assert {r["params"]["train.lr"] for r in rows} == {1e-3, 3e-3, 1e-2, 3e-2}
    assert all(r["status"] == "ok" and r["steps"] == 6 for r in rows)
    for tid, mtime in kept.items():  # the finished trials were not trained again
        assert (tmp_path / "sweep" / "trials" / tid / "metrics.jsonl").stat().st_mtime_ns == mtime
