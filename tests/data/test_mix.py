"""data.mix and data.replay: the stated share of each epoch's rows comes from each source (counted
on the batch plan the loop trains on), seeded, and never in validation; the config refuses bad
entries in one message."""

import json
import re

import pytest

from lorakit.config import build_config
from lorakit.data.mix import REPLAY_FILE, epoch_counts, mixed_rows, replay_examples
from lorakit.errors import ConfigError
from lorakit.eval.forgetting import probe_prompts, replay_prompts
from lorakit.train.batches import BatchPlan
from lorakit.train.loop import train
from lorakit.train.prepare import encode_rows, prepare_data
from tests import tiny


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(tmp_path, n_task=40, **data):
    task = _write(tmp_path / "task.jsonl", [{"instruction": "label it", "input": f"bike {i}",
                                             "output": "red" if i % 2 else "blue"} for i in range(n_task)])
    general = _write(tmp_path / "general.jsonl", [{"instruction": f"say the number {i}", "output": str(i)}
                                                  for i in range(7)])
    data = {"train": task, "max_seq_len": 64, **{k: v for k, v in data.items()}}
    if "mix" in data:
        data["mix"] = [{"path": general, "weight": w} for w in data["mix"]]
    return build_config({"model": {"dtype": "fp32", "device": "cpu"},
                         "lora": {"r": 2, "lora_alpha": 4, "target_modules": "all-linear"},
                         "data": data,
                         "train": {"output_dir": str(tmp_path / "run"), "batch_size": 8, "max_steps": 3}})


def test_stated_share_of_every_epoch_from_each_source(tmp_path):
    cfg = _cfg(tmp_path, n_task=40, mix=[0.2], replay=0.2, val_fraction=0.25)
    model, tok = tiny.tiny_llama(), tiny.tiny_tokenizer()
    data = prepare_data(cfg, tok)
    replay = replay_examples(cfg, model, tok, tmp_path / "run", max_new_tokens=8)
    mixed = mixed_rows(cfg, len(data.train), lambda ex: encode_rows(ex, tok, cfg), replay)
    n = len(data.train)
    assert n == 30 and mixed.counts == epoch_counts(n, [0.2, 0.2]) == [10, 10]
    pools = [range(0, n), range(n, n + 7), range(n + 7, n + 7 + len(mixed.pools[1]))]
    rows = data.train + mixed.rows
    plan = BatchPlan([len(e.input_ids) for e in rows], 8, 0, True, members=mixed.members)
    assert plan.per_epoch == 7  # 50 rows in batches of 8
    drawn = []
    for epoch in range(3):
        seen = [i for b in range(plan.per_epoch) for i in plan[epoch * plan.per_epoch + b]]
        counted = [sum(i in pool for i in seen) for pool in pools]
        assert counted == [30, 10, 10]  # 20% general file, 20% replay, every task row once
        assert sorted(i for i in seen if i < n) == list(range(n))
        general = sorted(i for i in seen if n <= i < n + 7)
        assert set(general) == set(pools[1])  # 10 rows from a pool of 7: all once, 3 again
        drawn.append([i for i in seen if i >= n + 7])
    assert drawn[0] != drawn[1]  # a fresh draw each epoch ...
    again = mixed_rows(cfg, len(data.train), lambda ex: encode_rows(ex, tok, cfg), replay)
    assert again.members(1) == mixed.members(1)  # ... from the seed alone
    assert all("bike" in "".join(m["content"] for m in ex.messages) for ex in data.validation_examples)
    assert mixed.summary() == ("each epoch: 30 task rows + 10 from general.jsonl (20.0%, drawn from 7) "
                               f"+ 10 replay rows (20.0%, drawn from {len(mixed.pools[1])}) = 50 rows")


def test_replay_rows_are_the_base_answers_to_the_replay_prompts(tmp_path):
    cfg = _cfg(tmp_path, replay=0.1)
    model, tok = tiny.tiny_llama(), tiny.tiny_tokenizer()
    rows = replay_examples(cfg, model, tok, tmp_path / "run", max_new_tokens=8)
    prompts = [ex.messages[0]["content"] for ex in rows]
    assert prompts == replay_prompts() and not set(prompts) & set(probe_prompts())
    written = [json.loads(line) for line in (tmp_path / "run" / REPLAY_FILE).read_text().splitlines()]
    assert [w["answer"] for w in written] == [ex.messages[-1]["content"] for ex in rows]
    # A second start reads the file: same rows without a model.
    assert replay_examples(cfg, None, tok, tmp_path / "run") == rows


def test_training_with_mix_and_replay_notes_the_counts(tmp_path):
    import io

    from rich.console import Console

    cfg = _cfg(tmp_path, n_task=24, mix=[0.1], replay=0.1)
    model, tok = tiny.tiny_llama(), tiny.tiny_tokenizer()
    replay_examples(cfg, model, tok, tmp_path / "run", max_new_tokens=8)  # the run reads it back
    out = io.StringIO()
    result = train(cfg, model=model, tokenizer=tok,
                   console=Console(file=out, width=300))
    assert result.steps == 3
    assert "each epoch: 24 task rows + 3 from general.jsonl" in out.getvalue()
    assert (tmp_path / "run" / REPLAY_FILE).exists()


@pytest.mark.parametrize("mix, replay, message", [
    ([{"path": "g.jsonl", "weight": 1.5}], 0.0, "data.mix[0].weight: got 1.5"),
    ([{"path": "g.jsonl", "share": 0.2, "weight": 0.2}], 0.0, "data.mix[0].share: unknown key"),
    (["g.jsonl"], 0.0, "data.mix: got ['g.jsonl'] (expected list[dict])"),
    ([{"path": "g.jsonl", "weight": 0.6}], 0.5, "add up to 1.1"),
    ([], 1.0, "data.replay: got 1.0"),
])
def test_bad_mix_is_refused_in_one_message(tmp_path, mix, replay, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config({"data": {"train": "t.jsonl", "mix": mix, "replay": replay},
                      "train": {"output_dir": str(tmp_path / "run")}})


def test_mix_paths_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "run.yaml").write_text("data:\n  train: t.jsonl\n  mix:\n  - {path: g.jsonl, weight: 0.2}\n"
                                       f"train:\n  output_dir: {tmp_path / 'run'}\n")
    from lorakit.config import load_config

    assert load_config(tmp_path / "run.yaml").data.mix == [{"path": str(tmp_path / "g.jsonl"), "weight": 0.2}]


def test_data_stats_counts_each_epoch_by_source(tmp_path):
    from lorakit.data.stats import data_stats

    cfg = _cfg(tmp_path, n_task=40)
    general = str(tmp_path / "general.jsonl")
    stats = data_stats(cfg.data.train, tiny.tiny_tokenizer(), mix=[{"path": general, "weight": 0.2}], replay=0.2)
    m = stats["mix"]
    assert m["task_rows"] == 40 and m["rows_per_epoch"] == 40 + 13 + 13
    assert [(s["rows_per_epoch"], s["pool"]) for s in m["sources"]] == [(13, 7), (13, len(replay_prompts()))]
    assert data_stats(cfg.data.train, tiny.tiny_tokenizer())["mix"] is None
