"""The overfitting watch: fires on a scripted curve, not on a healthy one; in the loop, it is
printed at that step, logged in metrics.jsonl and names the best checkpoint."""

import io
import json

import torch

from lorakit.config import build_config
from lorakit.train.loop import train
from lorakit.train.overfit import OverfitWatch
from tests import tiny


def _run(curve, steps_per_eval=5):
    """Feed (train loss, val loss) pairs: `steps_per_eval` equal training losses, then one evaluation."""
    watch, fired = OverfitWatch(), []
    for i, (t, v) in enumerate(curve, 1):
        for _ in range(steps_per_eval):
            watch.train(t)
        if warning := watch.validation(i * steps_per_eval, v):
            fired.append(warning)
    return fired


def test_fires_when_validation_rises_twice_while_training_falls():
    curve = [(2.0, 1.9), (1.5, 1.4), (1.2, 1.3), (1.0, 1.35), (0.9, 1.5), (0.8, 1.6)]
    fired = _run(curve)
    assert len(fired) == 1  # once per streak
    w = fired[0]
    # Evaluations at steps 5..30; validation rises at 20 (1.3 -> 1.35) and again at 25.
    assert w.step == 25 and w.val_losses == (1.3, 1.35, 1.5) and w.train_losses == (1.2, 1.0, 0.9)
    assert w.best_step == 15 and w.best_val_loss == 1.3
    msg = w.message()
    assert "step 25: overfitting" in msg and "best so far step 15" in msg
    assert "early_stopping_patience" in msg


def test_fires_at_the_second_rise_exactly():
    fired = _run([(2.0, 1.0), (1.8, 1.1), (1.6, 1.2)])
    assert [w.step for w in fired] == [15]
    assert fired[0].val_losses == (1.0, 1.1, 1.2) and fired[0].train_losses == (2.0, 1.8, 1.6)
    assert fired[0].best_step == 5


def test_silent_on_healthy_and_ambiguous_curves():
    assert _run([(2.0, 1.9), (1.5, 1.4), (1.2, 1.1), (1.0, 1.0), (0.9, 0.95)]) == []  # healthy
    assert _run([(2.0, 1.0), (1.8, 1.1), (1.6, 1.05), (1.5, 1.2)]) == []  # one rise at a time
    assert _run([(1.0, 1.0), (1.1, 1.1), (1.2, 1.2)]) == []  # both rise: diverging, not overfitting
    assert _run([(1.0, 1.0), (0.9, 1.1), (0.9, 1.2)]) == []  # training loss flat


def test_fires_again_after_the_streak_breaks():
    curve = [(2.0, 1.0), (1.8, 1.1), (1.6, 1.2), (1.5, 1.3), (1.4, 0.9), (1.3, 1.0), (1.2, 1.1)]
    assert [w.step for w in _run(curve)] == [15, 35]


def test_state_rebuilt_from_metrics_rows():
    rows = [{"step": 1, "loss": 2.0}, {"step": 1, "val_loss": 1.0},
            {"step": 2, "loss": 1.8}, {"step": 2, "val_loss": 1.1}]
    watch = OverfitWatch.from_metrics(rows)
    watch.train(1.6)
    assert watch.validation(3, 1.2).best_step == 1


def _contradicting_data(path, answer, n=12):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": "what colour is the bike?", "input": f"bike {i}",
                                "output": answer}) + "\n")
    return str(path)


def test_loop_says_so_logs_it_and_names_the_best_checkpoint(tmp_path):
    # Validation rows ask the same questions with another answer: the more the adapter learns
    # "red", the less likely "blue" is, so validation loss rises while training loss falls.
    model, tok = tiny.tiny_llama(), tiny.tiny_tokenizer()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    raw = {"model": {"dtype": "fp32", "device": "cpu"},
           "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
           "data": {"train": _contradicting_data(tmp_path / "t.jsonl", "red"),
                    "validation": _contradicting_data(tmp_path / "v.jsonl", "blue"), "max_seq_len": 64},
           "train": {"output_dir": str(tmp_path / "run"), "batch_size": 4, "lr": 1e-2, "max_steps": 12,
                     "eval_every": 1, "save_every": 1, "keep_checkpoints": 20, "warmup_ratio": 0.0}}
    from rich.console import Console

    out = io.StringIO()
    train(build_config(raw), model=model, tokenizer=tok, console=Console(file=out, width=400))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    flagged = [r for r in rows if r.get("overfitting")]
    assert flagged, [r.get("val_loss") for r in rows]
    first = flagged[0]
    vals = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert first["best_val_loss"] == min(v for s, v in vals.items() if s <= first["step"])
    assert first["best_checkpoint"].endswith(f"step-{first['best_step']:08d}")
    assert f"step {first['step']}: overfitting" in out.getvalue()
