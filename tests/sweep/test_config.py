"""Sweep files: grid and random expansion, stable ids, every problem at once, the shipped sweeps."""

from pathlib import Path

import pytest
import yaml

from lorakit.errors import ConfigError
from lorakit.sweep.config import Trial, expand, load_sweep, plan, trial_id

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, sweep, name="sweep.yaml"):
    (tmp_path / "train.jsonl").write_text('{"instruction": "hi", "output": "there"}\n')
    base = {"data": {"train": "train.jsonl"}, "model": {"device": "cpu"}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"base": base, "output_dir": str(tmp_path / "out"), **sweep},
                                   sort_keys=False))
    return path


def test_grid_order_ids_and_paired_settings(tmp_path):
    grid = {"rank": [{"lora.r": 4, "lora.lora_alpha": 8}, {"lora.r": 16, "lora.lora_alpha": 32}],
            "train.lr": ["1e-4", 3.0e-4, 1.0e-3]}
    trials = expand(load_sweep(write(tmp_path, {"grid": grid})))
    assert [(t.params["lora.r"], t.params["lora.lora_alpha"], t.params["train.lr"]) for t in trials] == [
        (4, 8, 1e-4), (4, 8, 3e-4), (4, 8, 1e-3), (16, 32, 1e-4), (16, 32, 3e-4), (16, 32, 1e-3)]
    # The id is a hash of the settings alone: the same in every run, whatever the key order.
    assert trials[0].id == trial_id({"train.lr": 1e-4, "lora.lora_alpha": 8, "lora.r": 4})
    assert trials[0].id == "b3c54865f9"  # pinned: a changed hash would orphan old results
    assert len({t.id for t in trials}) == 6
    again = expand(load_sweep(write(tmp_path, {"grid": dict(reversed(list(grid.items())))}, "b.yaml")))
    assert sorted(t.id for t in again) == sorted(t.id for t in trials)
    assert [t.params["train.lr"] for t in again[:2]] == [1e-4, 1e-4]  # the last entry varies fastest


def test_a_list_of_grids_is_their_union_with_repeats_once(tmp_path):
    grid = [{"lora.r": [4, 8], "train.lr": [1e-3]},
            {"lora.target_modules": [["q_proj"], "all-linear"], "lora.r": [8], "train.lr": [1e-3]},
            {"lora.r": [8], "train.lr": [1e-3]}]
    trials = expand(load_sweep(write(tmp_path, {"grid": grid})))
    assert [t.params for t in trials] == [
        {"lora.r": 4, "train.lr": 1e-3}, {"lora.r": 8, "train.lr": 1e-3},
        {"lora.target_modules": ["q_proj"], "lora.r": 8, "train.lr": 1e-3},
        {"lora.target_modules": "all-linear", "lora.r": 8, "train.lr": 1e-3}]
    planned = plan(load_sweep(write(tmp_path, {"grid": grid})))
    assert planned[2][1].lora.target_modules == ["q_proj"]
    assert planned[3][1].lora.target_modules == "all-linear"
    assert planned[0][1].train.output_dir == str(tmp_path / "out" / "trials" / trials[0].id)


def test_random_search_is_seeded(tmp_path):
    space = {"train.lr": {"low": 1.0e-5, "high": 1.0e-2, "log": True},
             "lora.r": {"low": 2, "high": 64}}
    a = expand(load_sweep(write(tmp_path, {"random": space, "trials": 20, "seed": 1})))
    b = expand(load_sweep(write(tmp_path, {"random": space, "trials": 20, "seed": 1}, "b.yaml")))
    c = expand(load_sweep(write(tmp_path, {"random": space, "trials": 20, "seed": 2}, "c.yaml")))
    assert [t.params for t in a] == [t.params for t in b] and len(a) == 20
    assert [t.params for t in a] != [t.params for t in c]
    lrs = [t.params["train.lr"] for t in a]
    assert all(1e-5 <= x <= 1e-2 for x in lrs) and min(lrs) < 1e-4 and max(lrs) > 1e-3  # log-uniform
    assert all(isinstance(t.params["lora.r"], int) and 2 <= t.params["lora.r"] <= 64 for t in a)
    # The first draw, pinned: Python's Random(seed) is stable across versions.
    assert a[0].params == {"train.lr": 2.53e-05, "lora.r": 55}


def test_random_values_and_repeated_draws(tmp_path):
    space = {"rank": {"values": [{"lora.r": 4, "lora.lora_alpha": 8}, {"lora.r": 8, "lora.lora_alpha": 16}]}}
    trials = expand(load_sweep(write(tmp_path, {"random": space, "trials": 10, "seed": 0})))
    assert sorted(t.params["lora.r"] for t in trials) == [4, 8]  # 10 draws, 2 distinct trials


def test_every_problem_listed_at_once(tmp_path):
    path = write(tmp_path, {"grid": {"train.lr": [1e-3]}, "random": {}, "trials": 0, "colour": "red"})
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    assert "colour: unknown key" in str(e.value)
    path = write(tmp_path, {"grid": {"train.lr": [1e-3]}, "random": {"train.lr": {"values": [1]}},
                            "seed": 3})
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    msg = str(e.value)
    assert "expected exactly one of them" in msg and "only used by random search" in msg

    grid = {"rank": [{"lora.r": 0}, {"r": 4}], "train.lr": [-1.0, 1e-3], "lora.r": [2]}
    with pytest.raises(ConfigError) as e:
        plan(load_sweep(write(tmp_path, {"grid": grid})))
    msg = str(e.value)
    assert "key 'r' in a mapping value" in msg and "lora.r is set by both 'rank' and 'lora.r'" in msg

    with pytest.raises(ConfigError) as e:
        plan(load_sweep(write(tmp_path, {"grid": {"lora.r": [0, 4], "train.lr": [-1.0]}})),
             ["train.lr=1e-3"])
    msg = str(e.value)
    assert "train.lr is varied by the sweep" in msg


def test_bad_trial_values_are_all_reported_before_any_training(tmp_path):
    with pytest.raises(ConfigError) as e:
        plan(load_sweep(write(tmp_path, {"grid": {"lora.r": [0, 4], "train.method": ["lora", "adapters"]}})))
    msg = str(e.value)
    assert "lora.r: got 0" in msg and "train.method: got 'adapters'" in msg


def test_shipped_sweeps_expand_and_validate():
    shipped = sorted((ROOT / "lorakit" / "examples").glob("sweep_*.yaml"))
    assert shipped
    for path in shipped:
        assert path.read_text().splitlines()[0].startswith(f"# lorakit sweep lorakit/examples/{path.name}")
        assert "data:" not in path.read_text()  # not a run config (tests/test_config.py loads those)
        planned = plan(load_sweep(path))
        assert planned, path
    planned = plan(load_sweep(ROOT / "lorakit" / "examples" / "sweep_rank_lr.yaml"))
    cfgs = [cfg for _, cfg in planned]
    assert len(cfgs) == 11
    assert all(c.lora.lora_alpha == 2 * c.lora.r and c.train.max_steps == 60 for c in cfgs)
    assert sorted({(c.lora.r, c.train.lr) for c in cfgs[:9]}) == sorted(
        (r, lr) for r in (4, 16, 64) for lr in (1e-4, 3e-4, 1e-3))
    targets = {str(c.lora.target_modules) for c in cfgs if (c.lora.r, c.train.lr) == (16, 1e-3)}
    assert targets == {"all-linear", str(["q_proj", "k_proj", "v_proj", "o_proj"]),
                       str(["gate_proj", "up_proj", "down_proj"])}


def test_trial_overrides_round_trip():
    t = Trial("x", {"lora.target_modules": ["q_proj", "v_proj"], "train.lr": 1e-05,
                    "data.system_prompt": "a=b: c"})
    assert t.overrides() == ['lora.target_modules=["q_proj", "v_proj"]', "train.lr=1e-05",
                             'data.system_prompt="a=b: c"']


def test_sweep_keys_checked_by_the_shared_builder(tmp_path):
    path = write(tmp_path, {"grid": {"train.lr": [1e-3]}, "keep_checkpoints": "no", "trials": 1.5,
                            "overrides": [1], "seeds": 2})
    with pytest.raises(ConfigError, match=r"trials: got 1000000000000 \(expected 1 to 10000 with random\)"):
        load_sweep(write(tmp_path, {"random": {"train.lr": {"values": [1e-3]}}, "trials": 10 ** 12},
                         name="many.yaml"))
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    msg = str(e.value)
    for fragment in ("keep_checkpoints: got 'no' (expected bool)", "trials: got 1.5 (expected int)",
                     "overrides: got [1] (expected list[str])", "seeds: unknown key (did you mean seed?)"):
        assert fragment in msg, msg


def test_ray_settings_checked_at_once(tmp_path):
    from lorakit.sweep.run import run_sweep

    path = write(tmp_path, {"grid": {"train.lr": [1e-3]}, "scheduler": "hyperband",
                            "resources_per_trial": {"cpu": 0, "gpu": 0, "tpu": 1},
                            "asha": {"grace_period": 0, "reduction_factor": 1}})
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    msg = str(e.value)
    for text in ("scheduler: got 'hyperband' (expected asha or null)", "resources_per_trial.tpu: unknown key",
                 "resources_per_trial: got cpu=0 gpu=0", "asha.grace_period: got 0",
                 "asha.reduction_factor: got 1"):
        assert text in msg, msg
    sweep = load_sweep(write(tmp_path, {"grid": {"train.lr": [1e-3]}, "scheduler": "asha",
                                        "resources_per_trial": {"cpu": 0.5, "gpu": 1}}))
    assert (sweep.resources_per_trial.cpu, sweep.resources_per_trial.gpu) == (0.5, 1.0)
    assert (sweep.asha.grace_period, sweep.asha.reduction_factor) == (1, 2)
    with pytest.raises(ConfigError, match="scheduler: asha needs the Ray backend"):
        run_sweep(sweep.source)
    with pytest.raises(ConfigError, match="--address: joins a Ray cluster, so it needs --backend ray"):
        run_sweep(sweep.source, address="auto")
    with pytest.raises(ConfigError) as e:  # refused before Ray starts
        run_sweep(sweep.source, backend="ray")
    assert "set data.validation or data.val_fraction" in str(e.value)
    assert "set train.eval_every" in str(e.value)
