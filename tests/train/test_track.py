"""train.report_to: TensorBoard's event reader and the MLflow client read back the metrics the
loop wrote to metrics.jsonl, the config as parameters, and the evaluation table."""

import json

import pytest

from lorakit.config import build_config
from lorakit.errors import ConfigError
from lorakit.eval.study import evaluate_run
from lorakit.train.loop import train
from lorakit.train.track import TRACKING_FILE
from tests import tiny


def _data(path, n=12):
    path.write_text("".join(json.dumps({"instruction": "label it", "input": f"bike {i}",
                                        "output": "red" if i % 2 else "blue"}) + "\n" for i in range(n)))
    return str(path)


def _raw(tmp_path, report_to, **train):
    return {"model": {"dtype": "fp32", "device": "cpu"},
            "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
            "data": {"train": _data(tmp_path / "t.jsonl"), "validation": _data(tmp_path / "v.jsonl", 4),
                     "max_seq_len": 64},
            "eval": {"data": _data(tmp_path / "e.jsonl", 6), "batch_size": 8},
            "train": {"output_dir": str(tmp_path / "run"), "batch_size": 4, "lr": 1e-2, "max_steps": 4,
                      "eval_every": 2, "report_to": report_to, **train}}


def test_tensorboard_and_mlflow_read_back_the_metrics(tmp_path):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = build_config(_raw(tmp_path, ["tensorboard", "mlflow"]))
    model, tok = tiny.tiny_llama(), tiny.tiny_tokenizer()
    result = train(cfg, model=model, tokenizer=tok, progress=False)
    report = evaluate_run(cfg, result.adapter_dir, model=model, tokenizer=tok)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    vals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    assert len(losses) == 4 and len(vals) == 2

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(s, pytest.approx(v)) for s, v in losses]
    assert [(e.step, e.value) for e in events.Scalars("val_loss")] == [(s, pytest.approx(v)) for s, v in vals]
    assert events.Scalars("eval/adapter/accuracy")[0].value == pytest.approx(report["adapter"]["report"]["accuracy"])
    assert "lr" in events.Tags()["scalars"] and events.Tags()["tensors"]  # the config as text

    tracking = json.loads((tmp_path / "run" / TRACKING_FILE).read_text())
    client = MlflowClient(tracking["tracking_uri"])
    run = client.get_run(tracking["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == losses
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_loss")] == vals
    assert run.data.params["lora.r"] == "4" and run.data.params["train.lr"] == "0.01"
    assert run.data.metrics["eval/base/macro_f1"] == pytest.approx(report["base"]["report"]["macro_f1"])
    assert run.data.metrics["eval/adapter/loss"] == pytest.approx(report["adapter"]["loss"])
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["report.md"]


def test_runs_share_a_store_one_run_each(tmp_path):
    from mlflow import MlflowClient

    store = (tmp_path / "store").resolve().as_uri()
    for name, lr in (("a", 1e-2), ("b", 1e-3)):
        raw = _raw(tmp_path, ["mlflow"], tracking_uri=store, experiment="sweep", lr=lr)
        raw["train"]["output_dir"] = str(tmp_path / name)
        raw["eval"] = {}
        train(build_config(raw), model=tiny.tiny_llama(), tokenizer=tiny.tiny_tokenizer(), progress=False)
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    assert sorted((r.info.run_name, r.data.params["train.lr"]) for r in runs) == [("a", "0.01"), ("b", "0.001")]


def test_unknown_sink_is_refused():
    with pytest.raises(ConfigError, match=r"train.report_to: got \['wandb'\]"):
        build_config({"data": {"train": "t.jsonl"}, "train": {"report_to": ["wandb"]}})
